// Adaptive gradient surgery: the three inner products d = g1.g2, a = |g1|^2, b = |g2|^2
// of two flat f32 gradient buffers, from one pass, accumulated in f64 and deterministic.
//
// Launch contract (two launches on one stream):
//   1. ags_dots_partial(g1, g2, n, partials)
//        block = AGS_DOTS_BLOCK threads (checked: any other block size traps);
//        grid  = G blocks, G >= 1 chosen by the caller and kept FIXED: the result is
//                bit-identical for the same (n, G, alignment of g1 and g2), whatever the
//                scheduling, but changes in the last bits with G. A constant (not one derived
//                from the SM count) keeps runs on different GPUs bit-identical too.
//        partials: 3*G doubles, written (not accumulated) as [d_0..d_G | a_0..a_G | b_0..b_G].
//   2. ags_dots_finalize(partials, G, out)
//        block = AGS_DOTS_BLOCK threads, grid = 1 block; out: 3 doubles {d, a, b}.
// g1 and g2 must be 4-byte aligned (any float*); n is arbitrary (0 gives zeros). The bulk is
// read with 16-byte loads when g1 and g2 share their offset modulo 16 bytes (always the case
// for cudaMalloc'd buffers at equal offsets); otherwise everything is read with 4-byte loads.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define AGS_DOTS_BLOCK 256

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
                     unsigned long long n, double* __restrict__ partials) {
    if (blockDim.x != AGS_DOTS_BLOCK) __trap();
    __shared__ double s[3][AGS_DOTS_BLOCK];

    // Split [0, n) into a scalar head (up to the first 16-byte boundary), a float4 body and
    // a scalar tail. Different offsets of g1 and g2 modulo 16 bytes: all of it is head.
    const unsigned long long off1 = (reinterpret_cast<unsigned long long>(g1) >> 2) & 3;
    const unsigned long long off2 = (reinterpret_cast<unsigned long long>(g2) >> 2) & 3;
    unsigned long long head = off1 == off2 ? (4 - off1) & 3 : n;
    if (head > n) head = n;
    const unsigned long long nvec = (n - head) / 4;
    const unsigned long long tail_start = head + 4 * nvec;
    const unsigned long long nscalar = head + (n - tail_start);

    const unsigned long long start = (unsigned long long)blockIdx.x * AGS_DOTS_BLOCK + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * AGS_DOTS_BLOCK;
    double d = 0.0, a = 0.0, b = 0.0;

    const float4* v1 = reinterpret_cast<const float4*>(g1 + head);
    const float4* v2 = reinterpret_cast<const float4*>(g2 + head);
    for (unsigned long long i = start; i < nvec; i += stride) {
        const float4 x = v1[i];
        const float4 y = v2[i];
        acc(x.x, y.x, d, a, b);
        acc(x.y, y.y, d, a, b);
        acc(x.z, y.z, d, a, b);
        acc(x.w, y.w, d, a, b);
    }
    for (unsigned long long j = start; j < nscalar; j += stride) {
        const unsigned long long i = j < head ? j : tail_start + (j - head);
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
