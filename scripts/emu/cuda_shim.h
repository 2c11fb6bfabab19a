// Host emulation of the CUDA subset kernels/conv_igemm.cu uses: each block's threads are
// fibers (ucontext) on one OS thread; __syncthreads and the warp-wide mma.sync are barriers
// at which a fiber yields until its peers arrive.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cassert>
#define CONV_IGEMM_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct dim3 { unsigned x = 0, y = 0, z = 0; };
extern dim3 threadIdx, blockIdx, gridDim, blockDim;
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
void __syncthreads();
float to_tf32(float v);
void mma_tf32(float& d0, float& d1, float& d2, float& d3, const unsigned (&a)[4], const unsigned (&b)[2]);
