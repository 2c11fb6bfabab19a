// Batch normalization over the channel rows of a [C, N, H, W] batch (channel c is the
// contiguous row x[c*M .. (c+1)*M], M = N*H*W values), with the residual add and ReLU that
// follow it in a ResNet fused in. CPU twins: src/engine/cpu/norm.rs.
//
// Training forward (three launches on one stream):
//   1. bn_stats_partial(x, M, partials)           grid = (chunks, C)
//        per chunk of a row: s1 = sum (x - K), s2 = sum (x - K)^2 in f64, K = x[c*M] (the
//        row's first value: a shift that keeps the one-pass variance free of cancellation).
//   2. bn_stats_finalize(x, M, C, chunks, partials, eps, momentum, saved, running)
//        grid = ceil(C / NORM_WARPS), one warp per channel sums its chunks' partials:
//        mean = K + s1/M, var = s2/M - (s1/M)^2 (biased), saved = [mean; 1/sqrt(var + eps)],
//        running = (1 - momentum) running + momentum [mean; var M/(M-1)] (as PyTorch).
//   3. bn_apply(x, residual, M, affine, stats, eval, relu, y)     grid = (chunks, C)
//        y = act(x a + b [+ r]), with a = gamma invstd, b = beta - mean a from saved (eval = 0),
//        or a = gamma / sqrt(var + eps), b = beta - mean a from running (eval = 1; evaluation
//        forward is this launch alone). residual may be null.
// Training backward (three launches):
//   1. bn_grad_partial(x, relu_out, dy, M, saved, partials)     grid = (chunks, C)
//        dy <- dy [y > 0] in place when relu_out is not null; per chunk: sum dy and
//        sum dy (x - mean) in f64.
//   2. bn_grad_finalize(M, C, chunks, partials, saved, daffine, coef)  grid = ceil(C / NORM_WARPS)
//        dbeta = sum dy, dgamma = invstd sum dy (x - mean); daffine += [dgamma; dbeta];
//        coef = [dbeta / M; dgamma / M] (f64, C each).
//   3. bn_grad_apply(x, dy, M, affine, saved, coef, dx)          grid = (chunks, C)
//        dx = gamma invstd (dy - dbeta/M - xhat dgamma/M), written.
//
// Every kernel: block = NORM_BLOCK threads (checked: any other block size traps). chunks =
// ceil(M / NORM_CHUNK) (at least 1), a function of M alone, and the partials buffer holds
// 2 * C * chunks doubles laid out [c][chunk][2]. Chunk k of a row covers the row's values
// [h + k NORM_CHUNK, h + (k + 1) NORM_CHUNK) (clipped to M), chunk 0 also the head [0, h):
// h is the number of values before the first 16-byte boundary of the row when every buffer
// of the launch has the row at the same offset modulo 16 bytes (then the chunk's body is read
// as float4, its last < 4 values as scalars), else h = 0 and the chunk is read as scalars.
// So any M, any 4-byte aligned views work.
//
// Deterministic: no atomics. Each thread sums its values in a fixed order, each block sums
// its threads with a fixed shuffle tree and its warps in index order, and each finalize warp
// sums the chunks with a fixed strided loop and shuffle tree: the result depends only on the
// shapes and on the rows' alignment, never on scheduling.
// The elementwise passes round as the CPU twin does (__fmul_rn / __fadd_rn keep the compiler
// from contracting into FMAs), so given the same statistics they agree with it bit for bit.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define NORM_BLOCK 256
#define NORM_WARPS (NORM_BLOCK / 32)
// Values per chunk of a row: 4 float4 per thread.
#define NORM_CHUNK 4096

typedef unsigned long long u64;

__device__ __forceinline__ unsigned int quad_offset(const void* p) {
    return (unsigned int)((reinterpret_cast<u64>(p) >> 2) & 3);
}

// The part of a row one chunk covers: scalar values [s0, s1) and [t0, t1), and nq float4
// starting at value q0 (16-byte aligned when nq > 0).
struct Span {
    u64 s0, s1, q0, nq, t0, t1;
};

// `head` is h (0..3), or -1 when the buffers disagree on alignment (all scalar).
__device__ __forceinline__ Span chunk_span(u64 m, int head, unsigned int k) {
    Span sp;
    const u64 h = head < 0 ? 0 : (u64)head;
    const u64 hh = h < m ? h : m;
    u64 start = hh + (u64)k * NORM_CHUNK;
    u64 end = start + NORM_CHUNK;
    if (start > m) start = m;
    if (end > m) end = m;
    if (head < 0) {
        sp.s0 = start;
        sp.s1 = end;
        sp.q0 = end;
        sp.nq = 0;
    } else {
        sp.s0 = k == 0 ? 0 : start;
        sp.s1 = k == 0 ? hh : start;
        sp.q0 = start;
        sp.nq = (end - start) / 4;
    }
    sp.t0 = sp.q0 + 4 * sp.nq;
    sp.t1 = head < 0 ? sp.t0 : end;
    return sp;
}

// Visits the chunk's values owned by this thread, in a fixed order: its float4s (f4), then
// its scalars (f1, given the value's index in the row).
template <typename F4, typename F1>
__device__ __forceinline__ void for_chunk(const Span& sp, F4 f4, F1 f1) {
    const unsigned int t = threadIdx.x;
    for (u64 i = t; i < sp.nq; i += NORM_BLOCK) f4(sp.q0 + 4 * i);
    const u64 n0 = sp.s1 - sp.s0;
    const u64 ns = n0 + (sp.t1 - sp.t0);
    for (u64 j = t; j < ns; j += NORM_BLOCK) f1(j < n0 ? sp.s0 + j : sp.t0 + (j - n0));
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block totals of a and b (fixed order), written by thread 0 to out[0], out[1].
__device__ __forceinline__ void block_sum2_store(double a, double b, double* out) {
    __shared__ double part[2][NORM_WARPS];
    a = warp_sum(a);
    b = warp_sum(b);
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        part[0][warp] = a;
        part[1][warp] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ta = part[0][0], tb = part[1][0];
        for (unsigned int w = 1; w < NORM_WARPS; ++w) {
            ta += part[0][w];
            tb += part[1][w];
        }
        out[0] = ta;
        out[1] = tb;
    }
}

__device__ __forceinline__ int row_head(bool same, const float* row) {
    return same ? (int)((4 - quad_offset(row)) & 3) : -1;
}

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_stats_partial(const float* __restrict__ x, u64 m, double* __restrict__ partials) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.y, k = blockIdx.x;
    const float* row = x + (u64)c * m;
    const double shift = row[0];
    const Span sp = chunk_span(m, row_head(true, row), k);
    double s1 = 0.0, s2 = 0.0;
    for_chunk(
        sp,
        [&](u64 i) {
            const float4 v = *reinterpret_cast<const float4*>(row + i);
            const double d0 = v.x - shift, d1 = v.y - shift, d2 = v.z - shift,
                         d3 = v.w - shift;
            s1 += d0;
            s1 += d1;
            s1 += d2;
            s1 += d3;
            s2 += d0 * d0;
            s2 += d1 * d1;
            s2 += d2 * d2;
            s2 += d3 * d3;
        },
        [&](u64 i) {
            const double d = row[i] - shift;
            s1 += d;
            s2 += d * d;
        });
    block_sum2_store(s1, s2, partials + 2 * ((u64)c * gridDim.x + k));
}

// One warp per channel: the chunks' partials of channel c summed in a fixed order, to lane 0.
__device__ __forceinline__ void channel_totals(const double* partials, unsigned int c,
                                               unsigned int chunks, double& a, double& b) {
    const unsigned int lane = threadIdx.x % 32;
    const double* p = partials + 2 * (u64)c * chunks;
    a = 0.0;
    b = 0.0;
    for (unsigned int k = lane; k < chunks; k += 32) {
        a += p[2 * k];
        b += p[2 * k + 1];
    }
    a = warp_sum(a);
    b = warp_sum(b);
}

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_stats_finalize(const float* __restrict__ x, u64 m, unsigned int channels,
                      unsigned int chunks, const double* __restrict__ partials, float eps,
                      float momentum, float* __restrict__ saved, float* __restrict__ running) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.x * NORM_WARPS + threadIdx.x / 32;
    if (c >= channels) return;
    double s1, s2;
    channel_totals(partials, c, chunks, s1, s2);
    if (threadIdx.x % 32 != 0) return;
    const double n = (double)m;
    const double d = s1 / n;
    const double mean = (double)x[(u64)c * m] + d;
    double var = s2 / n - d * d;
    if (var < 0.0) var = 0.0;
    const double mom = momentum;
    const double unbias = n / (n - 1.0 > 1.0 ? n - 1.0 : 1.0);
    saved[c] = (float)mean;
    saved[channels + c] = (float)(1.0 / sqrt(var + (double)eps));
    running[c] = (float)((1.0 - mom) * (double)running[c] + mom * mean);
    running[channels + c] =
        (float)((1.0 - mom) * (double)running[channels + c] + mom * var * unbias);
}

__device__ __forceinline__ float act1(float x, float a, float b, float r, bool res, bool relu) {
    float v = __fadd_rn(__fmul_rn(x, a), b);
    if (res) v = __fadd_rn(v, r);
    return relu ? fmaxf(v, 0.0f) : v;
}

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_apply(const float* __restrict__ x, const float* __restrict__ residual, u64 m,
             const float* __restrict__ affine, const float* __restrict__ stats, float eps,
             int eval, int relu, float* __restrict__ y) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.y, channels = gridDim.y;
    const float gamma = affine[c], beta = affine[channels + c];
    const float mean = stats[c], second = stats[channels + c];
    // As the CPU twin: train a = gamma invstd; eval a = gamma / sqrt(var + eps).
    const float a = eval ? __fdiv_rn(gamma, __fsqrt_rn(__fadd_rn(second, eps)))
                         : __fmul_rn(gamma, second);
    const float b = __fsub_rn(beta, __fmul_rn(mean, a));
    const u64 base = (u64)c * m;
    const float* xr = x + base;
    float* yr = y + base;
    const bool res = residual != nullptr;
    const float* rr = res ? residual + base : xr;
    const bool rl = relu != 0;
    const bool same = quad_offset(yr) == quad_offset(xr) && quad_offset(rr) == quad_offset(xr);
    const Span sp = chunk_span(m, row_head(same, xr), blockIdx.x);
    for_chunk(
        sp,
        [&](u64 i) {
            const float4 v = *reinterpret_cast<const float4*>(xr + i);
            float4 r = {0.0f, 0.0f, 0.0f, 0.0f};
            if (res) r = *reinterpret_cast<const float4*>(rr + i);
            float4 o;
            o.x = act1(v.x, a, b, r.x, res, rl);
            o.y = act1(v.y, a, b, r.y, res, rl);
            o.z = act1(v.z, a, b, r.z, res, rl);
            o.w = act1(v.w, a, b, r.w, res, rl);
            *reinterpret_cast<float4*>(yr + i) = o;
        },
        [&](u64 i) { yr[i] = act1(xr[i], a, b, res ? rr[i] : 0.0f, res, rl); });
}

__device__ __forceinline__ float relu_mask(float g, float y) { return y <= 0.0f ? 0.0f : g; }

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_grad_partial(const float* __restrict__ x, const float* __restrict__ relu_out,
                    float* __restrict__ dy, u64 m, const float* __restrict__ saved,
                    double* __restrict__ partials) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.y, k = blockIdx.x;
    const double mean = saved[c];
    const u64 base = (u64)c * m;
    const float* xr = x + base;
    float* gr = dy + base;
    const bool mask = relu_out != nullptr;
    const float* yr = mask ? relu_out + base : xr;
    const bool same = quad_offset(gr) == quad_offset(xr) && quad_offset(yr) == quad_offset(xr);
    const Span sp = chunk_span(m, row_head(same, xr), k);
    double sg = 0.0, sgx = 0.0;
    for_chunk(
        sp,
        [&](u64 i) {
            const float4 v = *reinterpret_cast<const float4*>(xr + i);
            float4 g = *reinterpret_cast<const float4*>(gr + i);
            if (mask) {
                const float4 yv = *reinterpret_cast<const float4*>(yr + i);
                g.x = relu_mask(g.x, yv.x);
                g.y = relu_mask(g.y, yv.y);
                g.z = relu_mask(g.z, yv.z);
                g.w = relu_mask(g.w, yv.w);
                *reinterpret_cast<float4*>(gr + i) = g;
            }
            sg += (double)g.x;
            sg += (double)g.y;
            sg += (double)g.z;
            sg += (double)g.w;
            sgx += (double)g.x * ((double)v.x - mean);
            sgx += (double)g.y * ((double)v.y - mean);
            sgx += (double)g.z * ((double)v.z - mean);
            sgx += (double)g.w * ((double)v.w - mean);
        },
        [&](u64 i) {
            float g = gr[i];
            if (mask) {
                g = relu_mask(g, yr[i]);
                gr[i] = g;
            }
            sg += (double)g;
            sgx += (double)g * ((double)xr[i] - mean);
        });
    block_sum2_store(sg, sgx, partials + 2 * ((u64)c * gridDim.x + k));
}

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_grad_finalize(u64 m, unsigned int channels, unsigned int chunks,
                     const double* __restrict__ partials, const float* __restrict__ saved,
                     float* __restrict__ daffine, double* __restrict__ coef) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.x * NORM_WARPS + threadIdx.x / 32;
    if (c >= channels) return;
    double sg, sgx;
    channel_totals(partials, c, chunks, sg, sgx);
    if (threadIdx.x % 32 != 0) return;
    const double dbeta = sg, dgamma = sgx * (double)saved[channels + c];
    daffine[c] = __fadd_rn(daffine[c], (float)dgamma);
    daffine[channels + c] = __fadd_rn(daffine[channels + c], (float)dbeta);
    coef[c] = dbeta / (double)m;
    coef[channels + c] = dgamma / (double)m;
}

// dx = scale (g - mean_dy - ((x - mu) istd) mean_dyx), rounded as the CPU twin.
__device__ __forceinline__ float dx1(float x, float g, float mu, float istd, float scale,
                                     float mdy, float mdyx) {
    const float xhat = __fmul_rn(__fsub_rn(x, mu), istd);
    return __fmul_rn(scale, __fsub_rn(__fsub_rn(g, mdy), __fmul_rn(xhat, mdyx)));
}

extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
    bn_grad_apply(const float* __restrict__ x, const float* __restrict__ dy, u64 m,
                  const float* __restrict__ affine, const float* __restrict__ saved,
                  const double* __restrict__ coef, float* __restrict__ dx) {
    if (blockDim.x != NORM_BLOCK) __trap();
    const unsigned int c = blockIdx.y, channels = gridDim.y;
    const float mu = saved[c], istd = saved[channels + c];
    const float scale = __fmul_rn(affine[c], istd);
    const float mdy = (float)coef[c], mdyx = (float)coef[channels + c];
    const u64 base = (u64)c * m;
    const float* xr = x + base;
    const float* gr = dy + base;
    float* dr = dx + base;
    const bool same = quad_offset(gr) == quad_offset(xr) && quad_offset(dr) == quad_offset(xr);
    const Span sp = chunk_span(m, row_head(same, xr), blockIdx.x);
    for_chunk(
        sp,
        [&](u64 i) {
            const float4 v = *reinterpret_cast<const float4*>(xr + i);
            const float4 g = *reinterpret_cast<const float4*>(gr + i);
            float4 o;
            o.x = dx1(v.x, g.x, mu, istd, scale, mdy, mdyx);
            o.y = dx1(v.y, g.y, mu, istd, scale, mdy, mdyx);
            o.z = dx1(v.z, g.z, mu, istd, scale, mdy, mdyx);
            o.w = dx1(v.w, g.w, mu, istd, scale, mdy, mdyx);
            *reinterpret_cast<float4*>(dr + i) = o;
        },
        [&](u64 i) { dr[i] = dx1(xr[i], gr[i], mu, istd, scale, mdy, mdyx); });
}
