// The unfolding of a convolution over a channel-major [C, N, H, W] batch (CPU twin:
// src/engine/cpu/conv.rs), around cuBLAS products:
//   conv_im2col   cols[ci*k*k + ky*k + kx, (n - n0)*Ho*Wo + oy*Wo + ox]
//                   = x[ci, n, oy*stride - pad + ky, ox*stride - pad + kx]   (0 outside)
//                 for the images n0 .. n0+nb of the batch;
//   conv_col2im   dx[ci, n, iy, ix] += sum over (ky, kx, oy, ox) with
//                   oy*stride - pad + ky = iy and ox*stride - pad + kx = ix
//                 of dcols[ci*k*k + ky*k + kx, (n - n0)*Ho*Wo + oy*Wo + ox]
//                 (the adjoint of conv_im2col). A gather: each input element sums its own
//                 terms in a fixed order, so the result is deterministic without atomics.
// Launch contract: block = CONV_BLOCK threads, any grid (grid-stride loops over the
// nb*Ho*Wo (resp. nb*H*W) pixels of one row; blockIdx.y is the row: ci*k*k + ky*k + kx for
// im2col, ci for col2im). Rows are at most 65535 per launch (gridDim.y), which the caller
// checks.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define CONV_BLOCK 256

typedef unsigned long long u64;

struct ConvShape {
    unsigned batch, in_h, in_w, out_h, out_w, kernel, stride, pad;
};

extern "C" __global__ void __launch_bounds__(CONV_BLOCK)
conv_im2col(const float* __restrict__ x, ConvShape s, unsigned n0, unsigned nb,
            float* __restrict__ cols) {
    const unsigned row = blockIdx.y;
    const unsigned kk = s.kernel * s.kernel;
    const unsigned ci = row / kk, ky = row % kk / s.kernel, kx = row % s.kernel;
    const unsigned out_plane = s.out_h * s.out_w;
    const u64 row_len = (u64)nb * out_plane;
    const float* src = x + ((u64)ci * s.batch + n0) * s.in_h * s.in_w;
    float* dst = cols + row * row_len;
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < row_len;
         j += (u64)gridDim.x * blockDim.x) {
        const unsigned img = j / out_plane, p = j % out_plane;
        const int iy = (int)(p / s.out_w * s.stride + ky) - (int)s.pad;
        const int ix = (int)(p % s.out_w * s.stride + kx) - (int)s.pad;
        float v = 0.0f;
        if (iy >= 0 && iy < (int)s.in_h && ix >= 0 && ix < (int)s.in_w)
            v = src[((u64)img * s.in_h + iy) * s.in_w + ix];
        dst[j] = v;
    }
}

extern "C" __global__ void __launch_bounds__(CONV_BLOCK)
conv_col2im(const float* __restrict__ dcols, ConvShape s, unsigned n0, unsigned nb,
            float* __restrict__ dx) {
    const unsigned ci = blockIdx.y;
    const unsigned k = s.kernel;
    const unsigned in_plane = s.in_h * s.in_w, out_plane = s.out_h * s.out_w;
    const u64 row_len = (u64)nb * out_plane;
    const u64 pixels = (u64)nb * in_plane;
    float* dst = dx + ((u64)ci * s.batch + n0) * in_plane;
    const float* rows = dcols + (u64)ci * k * k * row_len;
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < pixels;
         j += (u64)gridDim.x * blockDim.x) {
        const unsigned img = j / in_plane, p = j % in_plane;
        const int iy = p / s.in_w + s.pad, ix = p % s.in_w + s.pad;
        float acc = 0.0f;
        for (unsigned ky = 0; ky < k; ky++) {
            const int ty = iy - (int)ky;
            if (ty < 0 || ty % (int)s.stride != 0) continue;
            const unsigned oy = ty / s.stride;
            if (oy >= s.out_h) continue;
            for (unsigned kx = 0; kx < k; kx++) {
                const int tx = ix - (int)kx;
                if (tx < 0 || tx % (int)s.stride != 0) continue;
                const unsigned ox = tx / s.stride;
                if (ox >= s.out_w) continue;
                acc += rows[(ky * k + kx) * row_len + (u64)img * out_plane + oy * s.out_w + ox];
            }
        }
        dst[j] += acc;
    }
}
