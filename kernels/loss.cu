// The two task losses on feature-major embeddings, with their gradients: NT-Xent (contrastive,
// on slide-positive views) and cohesion (on slide-negative views). The CPU twins are
// src/engine/cpu/loss.rs.
//
// Inputs are the views z_i, z_j, each feature-major [dim, n] (element (k, a) at k*n + a); the
// 2n samples are the columns of [z_i | z_j], m = 2n. Scratch f is feature-major [dim, m], which
// is also the column-major m x dim matrix (leading dimension m) cuBLAS reads.
//
// NT-Xent (host order, one stream; T the temperature):
//   1. loss_normalize     f = z / max(|z|, 1e-12) per column, norm[a] = max(|z_a|, 1e-12)
//   2. cuBLAS sgemm       sim = f f^T                              (m x m, symmetric)
//   3. ntxent_softmax     per row a (partner p(a) = a +- n, logits l = sim[a, .] / T):
//                           row_loss[a] = log sum_{b != a} exp l_b - l_{p(a)}
//                           grad[a, b]  = (softmax_{b != a}(l)_b - [b == p(a)]) / m,  grad[a, a] = 0
//   4. cuBLAS sgemm x 2   df = (grad + grad^T) f / T              (m x dim, i.e. [dim, m])
//   5. ntxent_backward    dz_a = (df_a - f_a (f_a . df_a)) / norm_a, loss = mean_a row_loss[a]
// Cohesion (linear in m; s = sum_a f_a, pairs = m (m-1)):
//   1. loss_normalize     as above
//   2. cohesion_rowsum    s_k = sum_a f[k, a], and per k the terms s_k^2 and sum_a f[k, a]^2
//   3. cohesion_backward  df_a = -2 (s - f_a) / (pairs T), dz_a as in step 5,
//                         loss = (1 - (|s|^2 - sum_a |f_a|^2) / pairs) / T
//
// Launch contracts (every kernel: block = LOSS_BLOCK threads, checked; n >= 1, dim >= 1):
//   loss_normalize(z_i, z_j, n, dim, f, norm)              grid = ceil(m / LOSS_COLS)
//   ntxent_softmax(sim, n, inv_t, grad, row_loss)          grid = m (inv_t = 1/T in f64)
//   ntxent_backward(f, norm, df, row_loss, n, dim, dz_i, dz_j, loss)   grid = ceil(m / LOSS_COLS)
//   cohesion_rowsum(f, n, dim, s, stats)                   grid = ceil(dim / LOSS_WARPS)
//   cohesion_backward(f, norm, s, stats, n, dim, t, dz_i, dz_j, loss)  grid = ceil(m / LOSS_COLS)
// Sizes: f, df [dim*m] f32; norm [m] f64; sim, grad [m*m] f32; row_loss [m] f64; s [dim] f64;
// stats [2*dim] f64; loss [1] f32; dz_i, dz_j [dim*n] f32 (written, not accumulated).
//
// Deterministic: no atomics; every sum runs in a fixed order that depends only on the shapes
// (per-thread strided loops, then fixed shuffle trees, and warps or feature groups combined in
// index order).
// Sums, the normalization and the softmax are in f64; f, sim, grad and df are f32.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define LOSS_BLOCK 256
#define LOSS_WARPS (LOSS_BLOCK / 32)
// Column kernels: LOSS_COLS columns per block, LOSS_GROUPS feature groups over them.
#define LOSS_COLS 8
#define LOSS_GROUPS (LOSS_BLOCK / LOSS_COLS)
#define NORM_EPS 1e-12

typedef unsigned long long u64;

// Column kernels: thread t owns column a = LOSS_COLS * blockIdx.x + t % LOSS_COLS and visits
// the features k = g, g + LOSS_GROUPS, ... of group g = t / LOSS_COLS. A warp so reads 4 rows
// of 8 consecutive floats: every 32-byte sector it touches is used whole. Returns the column's
// total of v over the groups, summed in group order, to every thread. Starts and ends with a
// barrier.
__device__ __forceinline__ double column_total(double (*part)[LOSS_COLS], double v) {
    const unsigned int col = threadIdx.x % LOSS_COLS;
    __syncthreads();
    part[threadIdx.x / LOSS_COLS][col] = v;
    __syncthreads();
    double total = part[0][col];
    for (unsigned int g = 1; g < LOSS_GROUPS; ++g) total += part[g][col];
    __syncthreads();
    return total;
}

// Butterfly trees: every lane ends with the same bits (each step adds two equal-shaped halves,
// and a + b == b + a exactly).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum and max: warp trees, then the LOSS_WARPS warp results in index order. Every
// thread gets the result. Start and end with a barrier, so one scratch array serves in turn.
__device__ __forceinline__ double block_sum(double* scratch, double v) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = scratch[0];
#pragma unroll
    for (unsigned int w = 1; w < LOSS_WARPS; ++w) total += scratch[w];
    __syncthreads();
    return total;
}
__device__ __forceinline__ double block_max(double* scratch, double v) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = scratch[0];
#pragma unroll
    for (unsigned int w = 1; w < LOSS_WARPS; ++w) total = fmax(total, scratch[w]);
    __syncthreads();
    return total;
}

// f = z / max(|z|, 1e-12) for every column a of [z_i | z_j] (|z| in f64, the quotient rounded
// once to f32, as the CPU twin); norm[a] = max(|z_a|, 1e-12).
extern "C" __global__ void __launch_bounds__(LOSS_BLOCK)
    loss_normalize(const float* __restrict__ z_i, const float* __restrict__ z_j, unsigned int n,
                   unsigned int dim, float* __restrict__ f, double* __restrict__ norm) {
    if (blockDim.x != LOSS_BLOCK) __trap();
    __shared__ double part[LOSS_GROUPS][LOSS_COLS];
    const unsigned int group = threadIdx.x / LOSS_COLS;
    const unsigned int m = 2 * n;
    const unsigned int a = blockIdx.x * LOSS_COLS + threadIdx.x % LOSS_COLS;
    const bool active = a < m;
    const float* z = a < n ? z_i + a : z_j + (a - n);

    double sq = 0.0;
    if (active)
        for (unsigned int k = group; k < dim; k += LOSS_GROUPS) {
            const double v = z[(u64)k * n];
            sq += v * v;
        }
    const double nrm = fmax(sqrt(column_total(part, sq)), NORM_EPS);
    if (!active) return;
    if (group == 0) norm[a] = nrm;
    for (unsigned int k = group; k < dim; k += LOSS_GROUPS)
        f[(u64)k * m + a] = (float)((double)z[(u64)k * n] / nrm);
}

// One block per row a of sim, in f64 (as the CPU twin: the partner's softmax term is near 1
// and its gradient 1 - p would lose its digits in f32): l_b = sim[a, b] / T over b != a,
// row_loss[a] = max + log sum exp(l_b - max) - l_{p(a)},
// grad[a, b] = (exp(l_b - max) / sum - [b == p(a)]) / m (rounded to f32), grad[a, a] = 0.
extern "C" __global__ void __launch_bounds__(LOSS_BLOCK)
    ntxent_softmax(const float* __restrict__ sim, unsigned int n, double inv_t,
                   float* __restrict__ grad, double* __restrict__ row_loss) {
    if (blockDim.x != LOSS_BLOCK) __trap();
    __shared__ double scratch[LOSS_WARPS];
    const unsigned int m = 2 * n;
    const unsigned int a = blockIdx.x;
    const unsigned int partner = a < n ? a + n : a - n;
    const float* row = sim + (u64)a * m;
    float* out = grad + (u64)a * m;

    double mx = -__longlong_as_double(0x7ff0000000000000ll);
    for (unsigned int b = threadIdx.x; b < m; b += LOSS_BLOCK)
        if (b != a) mx = fmax(mx, row[b] * inv_t);
    mx = block_max(scratch, mx);

    double sum = 0.0;
    for (unsigned int b = threadIdx.x; b < m; b += LOSS_BLOCK)
        if (b != a) sum += exp(row[b] * inv_t - mx);
    sum = block_sum(scratch, sum);

    if (threadIdx.x == 0) row_loss[a] = mx + log(sum) - row[partner] * inv_t;
    for (unsigned int b = threadIdx.x; b < m; b += LOSS_BLOCK) {
        const double p = b == a ? 0.0 : exp(row[b] * inv_t - mx) / sum;
        out[b] = (float)((p - (b == partner ? 1.0 : 0.0)) / m);
    }
}

// Back through the normalization, per column a of [dim, m]: with g = f_a . df_a (0 where the
// norm floor is active), dz[k, a] = (df[k, a] - f[k, a] g) / norm[a], in f64, rounded once.
// Block 0 first writes loss = mean_a row_loss[a].
extern "C" __global__ void __launch_bounds__(LOSS_BLOCK)
    ntxent_backward(const float* __restrict__ f, const double* __restrict__ norm,
                    const float* __restrict__ df, const double* __restrict__ row_loss,
                    unsigned int n, unsigned int dim, float* __restrict__ dz_i,
                    float* __restrict__ dz_j, float* __restrict__ loss) {
    if (blockDim.x != LOSS_BLOCK) __trap();
    __shared__ double part[LOSS_GROUPS][LOSS_COLS];
    const unsigned int group = threadIdx.x / LOSS_COLS;
    const unsigned int m = 2 * n;
    const unsigned int a = blockIdx.x * LOSS_COLS + threadIdx.x % LOSS_COLS;
    const bool active = a < m;

    if (blockIdx.x == 0) {
        double total = 0.0;
        for (unsigned int b = threadIdx.x; b < m; b += LOSS_BLOCK) total += row_loss[b];
        total = block_sum(&part[0][0], total);
        if (threadIdx.x == 0) *loss = (float)(total / m);
    }

    double along = 0.0;
    if (active)
        for (unsigned int k = group; k < dim; k += LOSS_GROUPS)
            along += (double)f[(u64)k * m + a] * (double)df[(u64)k * m + a];
    along = column_total(part, along);
    if (!active) return;

    const double nrm = norm[a];
    if (!(nrm > NORM_EPS)) along = 0.0;
    float* dz = a < n ? dz_i + a : dz_j + (a - n);
    for (unsigned int k = group; k < dim; k += LOSS_GROUPS) {
        const u64 i = (u64)k * m + a;
        dz[(u64)k * n] = (float)(((double)df[i] - (double)f[i] * along) / nrm);
    }
}

// One warp per feature row k of f [dim, m]: s[k] = sum_a f[k, a], stats[k] = s[k]^2,
// stats[dim + k] = sum_a f[k, a]^2 (f64).
extern "C" __global__ void __launch_bounds__(LOSS_BLOCK)
    cohesion_rowsum(const float* __restrict__ f, unsigned int n, unsigned int dim,
                    double* __restrict__ s, double* __restrict__ stats) {
    if (blockDim.x != LOSS_BLOCK) __trap();
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int m = 2 * n;
    const unsigned int k = blockIdx.x * LOSS_WARPS + (threadIdx.x >> 5);
    if (k >= dim) return;  // the whole warp
    const float* row = f + (u64)k * m;
    double sum = 0.0, sq = 0.0;
    for (unsigned int a = lane; a < m; a += 32) {
        const double v = row[a];
        sum += v;
        sq += v * v;
    }
    sum = warp_sum(sum);
    sq = warp_sum(sq);
    if (lane == 0) {
        s[k] = sum;
        stats[k] = sum * sum;
        stats[dim + k] = sq;
    }
}

// Per column a: df[k, a] = -2 (s[k] - f[k, a]) / (pairs T), then dz as in ntxent_backward.
// Block 0 first writes loss = (1 - (sum_k stats[k] - sum_k stats[dim + k]) / pairs) / T.
extern "C" __global__ void __launch_bounds__(LOSS_BLOCK)
    cohesion_backward(const float* __restrict__ f, const double* __restrict__ norm,
                      const double* __restrict__ s, const double* __restrict__ stats,
                      unsigned int n, unsigned int dim, double t, float* __restrict__ dz_i,
                      float* __restrict__ dz_j, float* __restrict__ loss) {
    if (blockDim.x != LOSS_BLOCK) __trap();
    __shared__ double part[LOSS_GROUPS][LOSS_COLS];
    const unsigned int group = threadIdx.x / LOSS_COLS;
    const unsigned int m = 2 * n;
    const unsigned int a = blockIdx.x * LOSS_COLS + threadIdx.x % LOSS_COLS;
    const bool active = a < m;
    const double pairs = (double)m * (double)(m - 1);
    const double scale = -2.0 / (pairs * t);

    if (blockIdx.x == 0) {
        double ss = 0.0, qq = 0.0;
        for (unsigned int k = threadIdx.x; k < dim; k += LOSS_BLOCK) {
            ss += stats[k];
            qq += stats[dim + k];
        }
        ss = block_sum(&part[0][0], ss);
        qq = block_sum(&part[0][0], qq);
        if (threadIdx.x == 0) *loss = (float)((1.0 - (ss - qq) / pairs) / t);
    }

    double along = 0.0;
    if (active)
        for (unsigned int k = group; k < dim; k += LOSS_GROUPS) {
            const double v = f[(u64)k * m + a];
            along += v * (scale * (s[k] - v));
        }
    along = column_total(part, along);
    if (!active) return;

    const double nrm = norm[a];
    if (!(nrm > NORM_EPS)) along = 0.0;
    float* dz = a < n ? dz_i + a : dz_j + (a - n);
    for (unsigned int k = group; k < dim; k += LOSS_GROUPS) {
        const double v = f[(u64)k * m + a];
        const double g = scale * (s[k] - v);
        dz[(u64)k * n] = (float)((g - v * along) / nrm);
    }
}
