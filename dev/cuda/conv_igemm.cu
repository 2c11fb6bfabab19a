// The forward convolution over a channel-major [C, N, H, W] batch as an implicit GEMM: the
// same result as conv_im2col + a product (kernels/conv.cu, src/engine/cuda/conv.rs), without
// the unfolded matrix in memory. CPU twin: src/engine/cpu/conv.rs.
//
//   y[co, p] = sum_k w[co, k] * x[ci, n, oy*stride - pad + ky, ox*stride - pad + kx]
//   with k = ci*k*k + ky*k + kx (0 outside the image), p = n*Ho*Wo + oy*Wo + ox.
//
// GEMM view: M = Cout, N = batch*Ho*Wo pixels, K = Cin*k*k; A = w, row-major [M, K]; B is
// gathered from x tile by tile. Each block computes a BM x 128 tile of y (BM = 128, or 64 for
// layers with at most 64 output channels) in K-slices of 16: the next slice is loaded from
// global memory into registers while the current one is multiplied out of shared memory
// (two buffers, one barrier per slice). Shared rows are padded to a stride of 8 mod 32
// words, so the tensor-core fragment reads are free of bank conflicts.
//
//   conv_igemm_f32_m{64,128}   exact f32: each thread an 8x8 (BM = 128) or 4x8 (BM = 64)
//                              register tile of FFMAs, k summed in order 0..K-1.
//   conv_igemm_tf32_m{64,128}  TF32 tensor cores: operands rounded to TF32 (cvt.rna) on
//                              their way into shared memory, mma.sync m16n8k8 with f32
//                              accumulation; warps 2 (M) x 4 (N), each a (BM/2) x 32 tile.
//                              Needs sm_80 (traps on older devices).
//
// Launch contract: block = IGEMM_THREADS threads, grid = (ceil(N / IGEMM_BN), ceil(M / BM)),
// no dynamic shared memory. Indices: K and N fit u32, batch*H*W and N fit i32 (the caller
// checks); channel offsets are 64-bit.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.
// CONV_IGEMM_HOST_EMULATION leaves out the two inline-PTX helpers, so that a host harness
// can compile this file as C++ with its own emulation of them.

#define IGEMM_THREADS 256
#define IGEMM_BN 128
#define IGEMM_BK 16
#define IGEMM_PAD 8

typedef unsigned long long u64;

struct IgemmShape {
    unsigned batch, cin, cout, in_h, in_w, out_h, out_w, kernel, stride, pad;
};

#ifndef CONV_IGEMM_HOST_EMULATION
// v rounded to TF32 (10 mantissa bits, nearest, ties away from zero), as an f32.
__device__ __forceinline__ float to_tf32(float v) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return __uint_as_float(r);
#else
    return v;
#endif
}

// d += a b for one warp: a 16x8 row-major TF32 fragment, b 8x8 column-major, d 16x8 f32.
__device__ __forceinline__ void mma_tf32(float& d0, float& d1, float& d2, float& d3,
                                         const unsigned (&a)[4], const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
#endif

// H consecutive floats from 16-byte (H = 4) or 8-byte (H = 2) aligned shared memory.
template <int H>
__device__ __forceinline__ void load_vec(const float* p, float* out) {
    if constexpr (H == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else {
        const float2 v = *reinterpret_cast<const float2*>(p);
        out[0] = v.x, out[1] = v.y;
    }
}

template <int BM, bool TF32>
__device__ __forceinline__ void conv_igemm(const float* __restrict__ x,
                                           const float* __restrict__ w,
                                           float* __restrict__ y, const IgemmShape& s) {
    constexpr int BN = IGEMM_BN, BK = IGEMM_BK;
    constexpr int SA = BM + IGEMM_PAD, SB = BN + IGEMM_PAD;
    constexpr int A_PER = BM * BK / IGEMM_THREADS;  // weights per thread per slice: 8 or 4
    constexpr int A_TPR = BK / A_PER;               // threads per weight row: 2 or 4
    __shared__ __align__(16) float As[2][BK][SA];   // [k][m]
    __shared__ __align__(16) float Bs[2][BK][SB];   // [k][n]

    const unsigned tid = threadIdx.x;
    const unsigned kk = s.kernel * s.kernel, K = s.cin * kk;
    const unsigned out_plane = s.out_h * s.out_w, np = s.batch * out_plane;
    const unsigned m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const u64 channel = (u64)s.batch * s.in_h * s.in_w;

    // Weights: thread loads row a_m, columns a_k .. a_k + A_PER of each slice.
    const unsigned a_m = tid / A_TPR, a_k = tid % A_TPR * A_PER;
    const bool a_row = m0 + a_m < s.cout;
    const float* a_src = w + (u64)(m0 + a_m) * K + a_k;

    // Input: thread gathers pixels b_n + 32j (j < 4) at slice rows b_k and b_k + 8.
    const unsigned b_n = tid % 32, b_k = tid / 32;
    int pix_y[4], pix_x[4], pix_off[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const unsigned p = n0 + b_n + 32 * j;
        if (p < np) {
            const unsigned img = p / out_plane, q = p % out_plane;
            pix_y[j] = (int)(q / s.out_w * s.stride) - (int)s.pad;
            pix_x[j] = (int)(q % s.out_w * s.stride) - (int)s.pad;
            pix_off[j] = (int)(img * s.in_h * s.in_w) + pix_y[j] * (int)s.in_w + pix_x[j];
        } else {
            pix_y[j] = -(1 << 30), pix_x[j] = 0, pix_off[j] = 0;  // never in the image
        }
    }

    float a_reg[A_PER], b_reg[8];
    auto load = [&](unsigned k0) {
#pragma unroll
        for (int j = 0; j < A_PER; j++)
            a_reg[j] = a_row && k0 + a_k + j < K ? a_src[k0 + j] : 0.0f;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const unsigned k = k0 + b_k + 8 * r;
            const unsigned ci = k / kk, rem = k - ci * kk;
            const unsigned ky = rem / s.kernel, kx = rem - ky * s.kernel;
            const float* src = x + ci * channel + ky * s.in_w + kx;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int iy = pix_y[j] + (int)ky, ix = pix_x[j] + (int)kx;
                const bool in = k < K && (unsigned)iy < s.in_h && (unsigned)ix < s.in_w;
                b_reg[4 * r + j] = in ? src[pix_off[j]] : 0.0f;
            }
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int j = 0; j < A_PER; j++)
            As[buf][a_k + j][a_m] = TF32 ? to_tf32(a_reg[j]) : a_reg[j];
#pragma unroll
        for (int r = 0; r < 2; r++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                Bs[buf][b_k + 8 * r][b_n + 32 * j] =
                    TF32 ? to_tf32(b_reg[4 * r + j]) : b_reg[4 * r + j];
    };

    // Exact path: thread (ty, tx) owns rows ty*H + i and BM/2 + ty*H + i (i < H) and columns
    // tx*4 + j and 64 + tx*4 + j (j < 4).
    constexpr int H = BM / 32;
    const unsigned ty = tid / 16, tx = tid % 16;
    // Tensor-core path: warp (wm, wn) owns rows wm*WM .. +WM and columns wn*32 .. +32, as
    // MI x 4 fragments of 16x8; lane = 4g + t.
    constexpr int WM = BM / 2, MI = WM / 16;
    const unsigned lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
    const unsigned wm = warp % 2, wn = warp / 2;

    constexpr int ACC_M = TF32 ? MI : 2 * H, ACC_N = TF32 ? 16 : 8;
    float acc[ACC_M][ACC_N];
#pragma unroll
    for (int i = 0; i < ACC_M; i++)
#pragma unroll
        for (int j = 0; j < ACC_N; j++) acc[i][j] = 0.0f;

    const unsigned slices = (K + BK - 1) / BK;
    load(0);
    store(0);
    __syncthreads();
    for (unsigned slice = 0; slice < slices; slice++) {
        const int buf = slice & 1;
        const bool more = slice + 1 < slices;
        if (more) load((slice + 1) * BK);
        if constexpr (TF32) {
#pragma unroll
            for (int k8 = 0; k8 < BK; k8 += 8) {
                unsigned a[MI][4], b[4][2];
#pragma unroll
                for (int i = 0; i < MI; i++) {
                    const unsigned row = wm * WM + i * 16 + g;
                    a[i][0] = __float_as_uint(As[buf][k8 + t][row]);
                    a[i][1] = __float_as_uint(As[buf][k8 + t][row + 8]);
                    a[i][2] = __float_as_uint(As[buf][k8 + t + 4][row]);
                    a[i][3] = __float_as_uint(As[buf][k8 + t + 4][row + 8]);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const unsigned col = wn * 32 + j * 8 + g;
                    b[j][0] = __float_as_uint(Bs[buf][k8 + t][col]);
                    b[j][1] = __float_as_uint(Bs[buf][k8 + t + 4][col]);
                }
#pragma unroll
                for (int i = 0; i < MI; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        mma_tf32(acc[i][4 * j], acc[i][4 * j + 1], acc[i][4 * j + 2],
                                 acc[i][4 * j + 3], a[i], b[j]);
            }
        } else {
#pragma unroll
            for (int kq = 0; kq < BK; kq++) {
                float a[2 * H], b[8];
                load_vec<H>(&As[buf][kq][ty * H], a);
                load_vec<H>(&As[buf][kq][BM / 2 + ty * H], a + H);
                load_vec<4>(&Bs[buf][kq][tx * 4], b);
                load_vec<4>(&Bs[buf][kq][64 + tx * 4], b + 4);
#pragma unroll
                for (int i = 0; i < 2 * H; i++)
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
        }
        if (more) store(buf ^ 1);
        __syncthreads();
    }

    if constexpr (TF32) {
#pragma unroll
        for (int i = 0; i < MI; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const unsigned m = m0 + wm * WM + i * 16 + g + (e >= 2 ? 8 : 0);
                    const unsigned n = n0 + wn * 32 + j * 8 + 2 * t + (e & 1);
                    if (m < s.cout && n < np) y[(u64)m * np + n] = acc[i][4 * j + e];
                }
    } else {
#pragma unroll
        for (int i = 0; i < 2 * H; i++) {
            const unsigned m = m0 + (i < H ? 0 : BM / 2) + ty * H + i % H;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned n = n0 + (j < 4 ? 0 : 64) + tx * 4 + j % 4;
                if (m < s.cout && n < np) y[(u64)m * np + n] = acc[i][j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(IGEMM_THREADS)
conv_igemm_f32_m128(const float* __restrict__ x, const float* __restrict__ w, IgemmShape s,
                    float* __restrict__ y) {
    conv_igemm<128, false>(x, w, y, s);
}

extern "C" __global__ void __launch_bounds__(IGEMM_THREADS)
conv_igemm_f32_m64(const float* __restrict__ x, const float* __restrict__ w, IgemmShape s,
                   float* __restrict__ y) {
    conv_igemm<64, false>(x, w, y, s);
}

// Two blocks per multiprocessor: ptxas fits it in 128 registers without spills (157 on
// sm_90 unbounded). The exact m128 kernel would spill there, so it keeps one.
extern "C" __global__ void __launch_bounds__(IGEMM_THREADS, 2)
conv_igemm_tf32_m128(const float* __restrict__ x, const float* __restrict__ w, IgemmShape s,
                     float* __restrict__ y) {
    conv_igemm<128, true>(x, w, y, s);
}

extern "C" __global__ void __launch_bounds__(IGEMM_THREADS)
conv_igemm_tf32_m64(const float* __restrict__ x, const float* __restrict__ w, IgemmShape s,
                    float* __restrict__ y) {
    conv_igemm<64, true>(x, w, y, s);
}
