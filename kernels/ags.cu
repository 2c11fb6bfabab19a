// Adaptive gradient surgery and the optimizer over flat f32 buffers (CPU twins:
// src/engine/cpu/update.rs):
//   ags_dots_partial + ags_dots_finalize   d = g1.g2, a = |g1|^2, b = |g2|^2 from one pass,
//                                          accumulated in f64 and deterministic;
//   ags_sgd_step                           the fused surgery + SGD pass:
//                                          g = alpha g1 + beta g2; d = g + wd p;
//                                          m = mu m + d; p -= lr m (PyTorch's SGD);
//   ags_combine                            out = alpha g1 + beta g2.
//
// Launch contract of the reduction (two launches on one stream):
//   1. ags_dots_partial(g1, g2, n, partials)
//        block = AGS_DOTS_BLOCK threads (checked: any other block size traps);
//        grid  = G blocks, G >= 1 chosen by the caller and kept FIXED: the result is
//                bit-identical for the same (n, G, alignment of g1 and g2), whatever the
//                scheduling, but changes in the last bits with G. A constant (not one derived
//                from the SM count) keeps runs on different GPUs bit-identical too.
//        partials: 3*G doubles, written (not accumulated) as [d_0..d_G | a_0..a_G | b_0..b_G].
//   2. ags_dots_finalize(partials, G, out)
//        block = AGS_DOTS_BLOCK threads, grid = 1 block; out: 3 doubles {d, a, b}.
// Launch contract of the elementwise passes:
//   ags_sgd_step(g1, g2, p, m, n, alpha, beta, lr, mu, wd)  p and m updated in place;
//   ags_combine(g1, g2, out, n, alpha, beta)                out written;
//        block = at most AGS_UPDATE_BLOCK threads, any grid (a grid-stride loop covers n; each
//        element is computed alone, so the result does not depend on the launch shape).
//        Each element is rounded exactly as the CPU twin rounds it (__fmul_rn/__fadd_rn keep
//        the compiler from contracting into FMAs), so the results are bit-identical to it.
// Every buffer must be 4-byte aligned (any float*); n is arbitrary (0 does nothing). The bulk
// is read (and written) with 16-byte accesses when all the buffers of a launch share their
// offset modulo 16 bytes (always the case for cudaMalloc'd buffers at equal offsets);
// otherwise everything goes through 4-byte accesses.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define AGS_DOTS_BLOCK 256
#define AGS_UPDATE_BLOCK 256

typedef unsigned long long u64;

// [0, n) as a scalar head (up to the first 16-byte boundary), a float4 body [head, tail_start)
// of nvec quads, and a scalar tail [tail_start, n). Buffers with different offsets modulo 16
// bytes (same == false): all of it is head. `off` is the common offset in floats (0..3).
struct Quads {
    u64 head, nvec, tail_start, nscalar;
};

__device__ __forceinline__ u64 quad_offset(const void* p) {
    return (reinterpret_cast<u64>(p) >> 2) & 3;
}

__device__ __forceinline__ Quads split_quads(bool same, u64 off, u64 n) {
    Quads q;
    q.head = same ? (4 - off) & 3 : n;
    if (q.head > n) q.head = n;
    q.nvec = (n - q.head) / 4;
    q.tail_start = q.head + 4 * q.nvec;
    q.nscalar = q.head + (n - q.tail_start);
    return q;
}

// The j-th of the q.nscalar scalar elements: the head first, then the tail.
__device__ __forceinline__ u64 scalar_index(const Quads& q, u64 j) {
    return j < q.head ? j : q.tail_start + (j - q.head);
}

// Fixed-shape tree over the block, in shared memory: the summation order depends only on
// the thread index. Leaves the block total in s[k][0]. Ends with a barrier.
__device__ __forceinline__ void block_sum3(double (*s)[AGS_DOTS_BLOCK], double d, double a,
                                           double b) {
    const unsigned int t = threadIdx.x;
    s[0][t] = d;
    s[1][t] = a;
    s[2][t] = b;
    __syncthreads();
#pragma unroll
    for (unsigned int stride = AGS_DOTS_BLOCK / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            s[0][t] += s[0][t + stride];
            s[1][t] += s[1][t + stride];
            s[2][t] += s[2][t + stride];
        }
        __syncthreads();
    }
}

// The products of two floats are exact in f64, so contracting them into DFMA changes nothing.
__device__ __forceinline__ void acc(float x, float y, double& d, double& a, double& b) {
    const double dx = x, dy = y;
    d += dx * dy;
    a += dx * dx;
    b += dy * dy;
}

extern "C" __global__ void __launch_bounds__(AGS_DOTS_BLOCK)
    ags_dots_partial(const float* __restrict__ g1, const float* __restrict__ g2,
                     u64 n, double* __restrict__ partials) {
    if (blockDim.x != AGS_DOTS_BLOCK) __trap();
    __shared__ double s[3][AGS_DOTS_BLOCK];

    const u64 off = quad_offset(g1);
    const Quads q = split_quads(quad_offset(g2) == off, off, n);
    const u64 start = (u64)blockIdx.x * AGS_DOTS_BLOCK + threadIdx.x;
    const u64 stride = (u64)gridDim.x * AGS_DOTS_BLOCK;
    double d = 0.0, a = 0.0, b = 0.0;

    const float4* v1 = reinterpret_cast<const float4*>(g1 + q.head);
    const float4* v2 = reinterpret_cast<const float4*>(g2 + q.head);
    for (u64 i = start; i < q.nvec; i += stride) {
        const float4 x = v1[i];
        const float4 y = v2[i];
        acc(x.x, y.x, d, a, b);
        acc(x.y, y.y, d, a, b);
        acc(x.z, y.z, d, a, b);
        acc(x.w, y.w, d, a, b);
    }
    for (u64 j = start; j < q.nscalar; j += stride) {
        const u64 i = scalar_index(q, j);
        acc(g1[i], g2[i], d, a, b);
    }

    block_sum3(s, d, a, b);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = s[0][0];
        partials[gridDim.x + blockIdx.x] = s[1][0];
        partials[2 * gridDim.x + blockIdx.x] = s[2][0];
    }
}

extern "C" __global__ void __launch_bounds__(AGS_DOTS_BLOCK)
    ags_dots_finalize(const double* __restrict__ partials, unsigned int num_partials,
                      double* __restrict__ out) {
    if (blockDim.x != AGS_DOTS_BLOCK || gridDim.x != 1) __trap();
    __shared__ double s[3][AGS_DOTS_BLOCK];

    double d = 0.0, a = 0.0, b = 0.0;
    for (unsigned int i = threadIdx.x; i < num_partials; i += AGS_DOTS_BLOCK) {
        d += partials[i];
        a += partials[num_partials + i];
        b += partials[2 * num_partials + i];
    }

    block_sum3(s, d, a, b);
    if (threadIdx.x < 3) out[threadIdx.x] = s[threadIdx.x][0];
}

// One element of the fused update, rounded as the CPU twin: d = (alpha x + beta y) + wd p;
// m = mu m + d; p = p - lr m.
struct Sgd {
    float alpha, beta, lr, mu, wd;
};

__device__ __forceinline__ void sgd1(const Sgd& u, float x, float y, float& p, float& m) {
    const float d =
        __fadd_rn(__fadd_rn(__fmul_rn(u.alpha, x), __fmul_rn(u.beta, y)), __fmul_rn(u.wd, p));
    m = __fadd_rn(__fmul_rn(u.mu, m), d);
    p = __fsub_rn(p, __fmul_rn(u.lr, m));
}

extern "C" __global__ void __launch_bounds__(AGS_UPDATE_BLOCK)
    ags_sgd_step(const float* __restrict__ g1, const float* __restrict__ g2,
                 float* __restrict__ p, float* __restrict__ m, u64 n, float alpha, float beta,
                 float lr, float mu, float wd) {
    const Sgd u = {alpha, beta, lr, mu, wd};
    const u64 off = quad_offset(g1);
    const bool same = quad_offset(g2) == off && quad_offset(p) == off && quad_offset(m) == off;
    const Quads q = split_quads(same, off, n);
    const u64 start = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;

    const float4* v1 = reinterpret_cast<const float4*>(g1 + q.head);
    const float4* v2 = reinterpret_cast<const float4*>(g2 + q.head);
    float4* vp = reinterpret_cast<float4*>(p + q.head);
    float4* vm = reinterpret_cast<float4*>(m + q.head);
    for (u64 i = start; i < q.nvec; i += stride) {
        const float4 x = v1[i];
        const float4 y = v2[i];
        float4 pp = vp[i];
        float4 mm = vm[i];
        sgd1(u, x.x, y.x, pp.x, mm.x);
        sgd1(u, x.y, y.y, pp.y, mm.y);
        sgd1(u, x.z, y.z, pp.z, mm.z);
        sgd1(u, x.w, y.w, pp.w, mm.w);
        vp[i] = pp;
        vm[i] = mm;
    }
    for (u64 j = start; j < q.nscalar; j += stride) {
        const u64 i = scalar_index(q, j);
        float pp = p[i], mm = m[i];
        sgd1(u, g1[i], g2[i], pp, mm);
        p[i] = pp;
        m[i] = mm;
    }
}

// out = alpha g1 + beta g2, rounded as the CPU twin: each product, then the sum.
__device__ __forceinline__ float comb1(float alpha, float beta, float x, float y) {
    return __fadd_rn(__fmul_rn(alpha, x), __fmul_rn(beta, y));
}

extern "C" __global__ void __launch_bounds__(AGS_UPDATE_BLOCK)
    ags_combine(const float* __restrict__ g1, const float* __restrict__ g2,
                float* __restrict__ out, u64 n, float alpha, float beta) {
    const u64 off = quad_offset(g1);
    const Quads q = split_quads(quad_offset(g2) == off && quad_offset(out) == off, off, n);
    const u64 start = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;

    const float4* v1 = reinterpret_cast<const float4*>(g1 + q.head);
    const float4* v2 = reinterpret_cast<const float4*>(g2 + q.head);
    float4* vo = reinterpret_cast<float4*>(out + q.head);
    for (u64 i = start; i < q.nvec; i += stride) {
        const float4 x = v1[i];
        const float4 y = v2[i];
        float4 o;
        o.x = comb1(alpha, beta, x.x, y.x);
        o.y = comb1(alpha, beta, x.y, y.y);
        o.z = comb1(alpha, beta, x.z, y.z);
        o.w = comb1(alpha, beta, x.w, y.w);
        vo[i] = o;
    }
    for (u64 j = start; j < q.nscalar; j += stride) {
        const u64 i = scalar_index(q, j);
        out[i] = comb1(alpha, beta, g1[i], g2[i]);
    }
}
