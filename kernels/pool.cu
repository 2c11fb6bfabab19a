// Max pooling (square window, stride, padding that never wins) and global average pooling
// over the planes of a [C, N, H, W] batch. CPU twins: src/engine/cpu/pool.rs.
//
//   maxpool_forward(x, planes, h, w, oh, ow, k, s, p, y)     one thread per output
//        y = the first maximum of its window (row by row, a value wins only when strictly
//        greater, or NaN: PyTorch's rule).
//   maxpool_backward(x, dy, planes, h, w, oh, ow, k, s, p, dx)  one thread per input value
//        a gather, so no atomics: dx[i] = sum of dy over the windows whose first maximum
//        (recomputed from x) is i, in increasing output order from 0.0, the CPU twin's order,
//        so the result is bit-identical to it. Every dx value is written.
//   avgpool_forward(x, planes, spatial, y)                   one thread per plane
//        y = (sum of the plane in f64, in order) / spatial: bit-identical to the CPU twin.
//   avgpool_backward(dy, planes, spatial, dx)                one thread per input value
//        dx = dy * (1 / spatial), written.
// Launch contract: block = POOL_BLOCK threads (checked), any grid (grid-stride loops over
// u64 indices). Window parameters are ints with k >= 1, s >= 1, 0 <= p <= k / 2 (so every
// window holds at least one image value); h, w, oh, ow, k, s, p fit an int.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define POOL_BLOCK 256

typedef unsigned long long u64;

struct Pool {
    int h, w, oh, ow, k, s, p;
};

// The index (in its plane) of the first maximum of output (oy, ox)'s window.
__device__ __forceinline__ int window_argmax(const float* __restrict__ plane, const Pool& q,
                                             int oy, int ox) {
    const int ys = oy * q.s - q.p, xs = ox * q.s - q.p;
    const int y0 = ys > 0 ? ys : 0, x0 = xs > 0 ? xs : 0;
    const int y1 = ys + q.k < q.h ? ys + q.k : q.h, x1 = xs + q.k < q.w ? xs + q.k : q.w;
    int best = y0 * q.w + x0;
    float best_val = __int_as_float(0xff800000);  // -inf
    for (int iy = y0; iy < y1; ++iy) {
        for (int ix = x0; ix < x1; ++ix) {
            const float v = plane[iy * q.w + ix];
            if (v > best_val || v != v) {
                best = iy * q.w + ix;
                best_val = v;
            }
        }
    }
    return best;
}

extern "C" __global__ void __launch_bounds__(POOL_BLOCK)
    maxpool_forward(const float* __restrict__ x, u64 planes, int h, int w, int oh, int ow,
                    int k, int s, int p, float* __restrict__ y) {
    if (blockDim.x != POOL_BLOCK) __trap();
    const Pool q = {h, w, oh, ow, k, s, p};
    const u64 out_plane = (u64)oh * ow, in_plane = (u64)h * w;
    const u64 n = planes * out_plane;
    for (u64 i = (u64)blockIdx.x * POOL_BLOCK + threadIdx.x; i < n;
         i += (u64)gridDim.x * POOL_BLOCK) {
        const u64 plane = i / out_plane;
        const int o = (int)(i - plane * out_plane);
        const float* xp = x + plane * in_plane;
        y[i] = xp[window_argmax(xp, q, o / ow, o % ow)];
    }
}

// First and last output index along one axis whose window holds input index i.
__device__ __forceinline__ void covering(int i, int k, int s, int p, int out, int& lo,
                                         int& hi) {
    // o s - p <= i < o s - p + k  <=>  (i + p - k) / s < o <= (i + p) / s
    const int a = i + p - k + 1;
    lo = a <= 0 ? 0 : (a + s - 1) / s;
    hi = (i + p) / s;
    if (hi > out - 1) hi = out - 1;
}

extern "C" __global__ void __launch_bounds__(POOL_BLOCK)
    maxpool_backward(const float* __restrict__ x, const float* __restrict__ dy, u64 planes,
                     int h, int w, int oh, int ow, int k, int s, int p,
                     float* __restrict__ dx) {
    if (blockDim.x != POOL_BLOCK) __trap();
    const Pool q = {h, w, oh, ow, k, s, p};
    const u64 out_plane = (u64)oh * ow, in_plane = (u64)h * w;
    const u64 n = planes * in_plane;
    for (u64 i = (u64)blockIdx.x * POOL_BLOCK + threadIdx.x; i < n;
         i += (u64)gridDim.x * POOL_BLOCK) {
        const u64 plane = i / in_plane;
        const int at = (int)(i - plane * in_plane);
        const int iy = at / w, ix = at % w;
        const float* xp = x + plane * in_plane;
        const float* gp = dy + plane * out_plane;
        int oy0, oy1, ox0, ox1;
        covering(iy, k, s, p, oh, oy0, oy1);
        covering(ix, k, s, p, ow, ox0, ox1);
        float sum = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            for (int ox = ox0; ox <= ox1; ++ox) {
                if (window_argmax(xp, q, oy, ox) == at) sum = __fadd_rn(sum, gp[oy * ow + ox]);
            }
        }
        dx[i] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(POOL_BLOCK)
    avgpool_forward(const float* __restrict__ x, u64 planes, u64 spatial,
                    float* __restrict__ y) {
    if (blockDim.x != POOL_BLOCK) __trap();
    for (u64 i = (u64)blockIdx.x * POOL_BLOCK + threadIdx.x; i < planes;
         i += (u64)gridDim.x * POOL_BLOCK) {
        const float* xp = x + i * spatial;
        double sum = 0.0;
        for (u64 j = 0; j < spatial; ++j) sum += (double)xp[j];
        y[i] = (float)(sum / (double)spatial);
    }
}

extern "C" __global__ void __launch_bounds__(POOL_BLOCK)
    avgpool_backward(const float* __restrict__ dy, u64 planes, u64 spatial,
                     float* __restrict__ dx) {
    if (blockDim.x != POOL_BLOCK) __trap();
    const float inv = __fdiv_rn(1.0f, (float)spatial);
    const u64 n = planes * spatial;
    for (u64 i = (u64)blockIdx.x * POOL_BLOCK + threadIdx.x; i < n;
         i += (u64)gridDim.x * POOL_BLOCK) {
        dx[i] = __fmul_rn(dy[i / spatial], inv);
    }
}
