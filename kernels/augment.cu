// The views of docs/METHOD.md section 2 (Views) on the GPU (CPU twin: render_batch of
// src/data/input/augment/render.rs): u8 HWC RGB patches in device memory become normalized
// f32 views, written straight into the engines' channel-major [C, N, H, W] batches.
//
//   augment_views   one block per view: crop, horizontal flip, the four color-jitter ops in the
//                   drawn order (torchvision's float semantics, clamp to [0, 1] after each),
//                   rotation by +90 degrees, normalize (x - mean[c]) / std[c].
//
// Launch contract:
//   augment_views(pixels, patch_h, patch_w, crop, views, out, vec, m0, m1, m2, s0, s1, s2)
//     block = AUG_BLOCK threads (checked: any other block size traps); grid = one block per
//     view (grid.x = number of views).
//     pixels: patch p at byte p * patch_h * patch_w * 3, HWC RGB.
//     views:  one AugView per block (the host validated every field, see
//             src/engine/cuda/augment.rs; nothing is checked here).
//     out:    view v writes channel ch, row y, column x at
//               out[out_offset + ((ch * out_batch + out_slot) * crop + y) * crop + x],
//             i.e. slot out_slot of a [3, out_batch, crop, crop] batch starting at out_offset.
//     vec:    1 when crop % 4 == 0, out is 16-byte aligned and every out_offset % 4 == 0: rows
//             are then written with 16-byte stores; 0 writes 4-byte stores.
//
// Bit-exactness: every f32 operation is the CPU's, in the CPU's order, with the rounding
// intrinsics (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn) so that nvcc/NVRTC never contract
// into FMAs or use approximate division. Contrast's grayscale mean is the CPU's f64 sum in the
// CPU's order: per 64-pixel chunk of a crop row (source orientation), eight lane sums over
// groups of eight pixels, the lanes added 0..7, plus the remainder's sum; the chunk sums added
// in row-major chunk order by one thread (a fixed sequential order: the only way to reproduce
// f64 rounding in general). The chunk sums are computed in parallel, AUG_WINDOW at a time.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define AUG_BLOCK 256
#define AUG_CHUNK 64
#define AUG_WINDOW 1024

#define AUG_FLIP 1u
#define AUG_ROTATE 2u
#define AUG_JITTER 4u

#define OP_BRIGHTNESS 0u
#define OP_CONTRAST 1u
#define OP_SATURATION 2u
#define OP_HUE 3u

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

// AugView of src/engine/cuda/augment.rs (#[repr(C)], 48 bytes).
struct AugView {
    u32 patch, top, left;
    u32 flags;  // AUG_FLIP | AUG_ROTATE | AUG_JITTER
    u32 order;  // jitter op k (OP_*) in bits 8k..8k+7
    float brightness, contrast, saturation, hue;
    u32 out_offset, out_batch, out_slot;
};

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return __fdiv_rn(a, b); }

// Rust's f32::clamp(x, 0, 1).
__device__ __forceinline__ float clamp01(float x) {
    x = x < 0.0f ? 0.0f : x;
    return x > 1.0f ? 1.0f : x;
}

// torchvision's rgb_to_grayscale: (0.2989 r + 0.587 g) + 0.114 b.
__device__ __forceinline__ float gray(float r, float g, float b) {
    return add(add(mul(0.2989f, r), mul(0.587f, g)), mul(0.114f, b));
}

// torchvision's _blend: clamp(f x + (1 - f) y).
__device__ __forceinline__ float blend(float f, float x, float y) {
    return clamp01(add(mul(f, x), mul(sub(1.0f, f), y)));
}

// shift_hue of src/data/input/augment/ops.rs, expression by expression.
__device__ __forceinline__ void shift_hue(float factor, float& r, float& g, float& b) {
    const float maxc = fmaxf(fmaxf(r, g), b);
    const float minc = fminf(fminf(r, g), b);
    const bool eqc = maxc == minc;
    const float cr = sub(maxc, minc);
    const float s = dvd(cr, eqc ? 1.0f : maxc);
    const float crd = eqc ? 1.0f : cr;
    const float rc = dvd(sub(maxc, r), crd);
    const float gc = dvd(sub(maxc, g), crd);
    const float bc = dvd(sub(maxc, b), crd);
    const float hr = maxc == r ? sub(bc, gc) : 0.0f;
    const float hg = (maxc == g && maxc != r) ? sub(add(2.0f, rc), bc) : 0.0f;
    const float hb = (maxc != g && maxc != r) ? sub(add(4.0f, gc), rc) : 0.0f;
    float x = add(dvd(add(add(hr, hg), hb), 6.0f), 1.0f);
    float h = x >= 1.0f ? sub(x, 1.0f) : x;
    x = add(h, factor);
    h = x < 0.0f ? add(x, 1.0f) : (x >= 1.0f ? sub(x, 1.0f) : x);
    const float v = maxc;
    const float h6 = mul(h, 6.0f);
    // Sums of 0s and 1s: exact in any order.
    const float i = (float)((h6 >= 1.0f) + (h6 >= 2.0f) + (h6 >= 3.0f) + (h6 >= 4.0f) +
                            (h6 >= 5.0f) + (h6 >= 6.0f));
    const float f = sub(h6, i);
    const float p = clamp01(mul(v, sub(1.0f, s)));
    const float q = clamp01(mul(v, sub(1.0f, mul(s, f))));
    const float t = clamp01(mul(v, sub(1.0f, mul(s, sub(1.0f, f)))));
    const float sector = i == 6.0f ? 0.0f : i;
    r = (sector == 0.0f || sector == 5.0f) ? v : sector == 1.0f ? q : sector == 4.0f ? t : p;
    g = sector == 0.0f ? t : sector <= 2.0f ? v : sector == 3.0f ? q : p;
    b = sector <= 1.0f ? p : sector == 2.0f ? t : sector == 5.0f ? q : v;
}

// One jitter op on one pixel; `mean` is contrast's grayscale mean.
__device__ __forceinline__ void apply_op(u32 op, const AugView& v, float mean, float& r, float& g,
                                         float& b) {
    switch (op) {
    case OP_BRIGHTNESS:
        r = clamp01(mul(v.brightness, r));
        g = clamp01(mul(v.brightness, g));
        b = clamp01(mul(v.brightness, b));
        break;
    case OP_CONTRAST:
        r = blend(v.contrast, r, mean);
        g = blend(v.contrast, g, mean);
        b = blend(v.contrast, b, mean);
        break;
    case OP_SATURATION: {
        const float l = gray(r, g, b);
        r = blend(v.saturation, r, l);
        g = blend(v.saturation, g, l);
        b = blend(v.saturation, b, l);
        break;
    }
    default:
        // A hue factor of exactly 0 is the identity (ColorJitter skips it).
        if (v.hue != 0.0f) shift_hue(v.hue, r, g, b);
        break;
    }
}

__device__ __forceinline__ u32 op_at(u32 order, u32 k) { return (order >> (8 * k)) & 0xffu; }

// gray_sum of src/data/input/augment/ops.rs over the n <= AUG_CHUNK pixels at `src`
// (3 bytes apart), after the first `before` jitter ops.
__device__ double chunk_gray_sum(const u8* __restrict__ src, u32 n, u32 before, const AugView& v,
                                 const float* unit) {
    double acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.0;
    const u32 groups = n / 8;
    for (u32 gi = 0; gi < groups; ++gi) {
#pragma unroll
        for (u32 k = 0; k < 8; ++k) {
            const u8* px = src + 3 * (8 * gi + k);
            float r = unit[__ldg(px)], g = unit[__ldg(px + 1)], b = unit[__ldg(px + 2)];
            for (u32 o = 0; o < before; ++o) apply_op(op_at(v.order, o), v, 0.0f, r, g, b);
            acc[k] = __dadd_rn(acc[k], (double)gray(r, g, b));
        }
    }
    double tail = 0.0;
    for (u32 j = 8 * groups; j < n; ++j) {
        const u8* px = src + 3 * j;
        float r = unit[__ldg(px)], g = unit[__ldg(px + 1)], b = unit[__ldg(px + 2)];
        for (u32 o = 0; o < before; ++o) apply_op(op_at(v.order, o), v, 0.0f, r, g, b);
        tail = __dadd_rn(tail, (double)gray(r, g, b));
    }
    double lanes = 0.0;
#pragma unroll
    for (int k = 0; k < 8; ++k) lanes = __dadd_rn(lanes, acc[k]);
    return __dadd_rn(lanes, tail);
}

extern "C" __global__ void __launch_bounds__(AUG_BLOCK)
    augment_views(const u8* __restrict__ pixels, u32 patch_h, u32 patch_w, u32 crop,
                  const AugView* __restrict__ views, float* __restrict__ out, u32 vec, float m0,
                  float m1, float m2, float s0, float s1, float s2) {
    if (blockDim.x != AUG_BLOCK) __trap();
    __shared__ float unit[256];
    __shared__ float norm[3][256];
    __shared__ double sums[AUG_WINDOW];
    __shared__ float contrast_mean;

    const u32 t = threadIdx.x;
    const AugView v = views[blockIdx.x];
    {
        // ToTensor (u8 / 255, a division) and the no-jitter lookup (x - mean) / std.
        const float x = dvd((float)t, 255.0f);
        unit[t] = x;
        norm[0][t] = dvd(sub(x, m0), s0);
        norm[1][t] = dvd(sub(x, m1), s1);
        norm[2][t] = dvd(sub(x, m2), s2);
    }
    const u64 row = (u64)patch_w * 3;
    const u8* __restrict__ src =
        pixels + (u64)v.patch * patch_h * row + (u64)v.top * row + (u64)v.left * 3;
    const bool jitter = (v.flags & AUG_JITTER) != 0;
    __syncthreads();

    if (jitter) {
        // Contrast's mean over the image the ops before contrast leave.
        u32 before = 0;
        while (before < 4 && op_at(v.order, before) != OP_CONTRAST) ++before;
        const u32 per_row = (crop + AUG_CHUNK - 1) / AUG_CHUNK;
        const u32 chunks = crop * per_row;
        double running = 0.0;
        for (u32 w0 = 0; w0 < chunks; w0 += AUG_WINDOW) {
            const u32 wn = min((u32)AUG_WINDOW, chunks - w0);
            for (u32 j = t; j < wn; j += AUG_BLOCK) {
                const u32 c = w0 + j;
                const u32 sy = c / per_row;
                const u32 x0 = (c - sy * per_row) * AUG_CHUNK;
                sums[j] = chunk_gray_sum(src + sy * row + 3 * x0, min((u32)AUG_CHUNK, crop - x0),
                                         before, v, unit);
            }
            __syncthreads();
            if (t == 0)
                for (u32 j = 0; j < wn; ++j) running = __dadd_rn(running, sums[j]);
            __syncthreads();
        }
        if (t == 0)
            contrast_mean = __double2float_rn(__ddiv_rn(running, (double)crop * (double)crop));
        __syncthreads();
    }
    const float mean = jitter ? contrast_mean : 0.0f;

    // Output pixel (y, x) reads crop pixel: none (y, x), flip (y, c-1-x), rotate (x, c-1-y),
    // both (x, y). Each thread renders four consecutive pixels of an output row.
    const bool flip = (v.flags & AUG_FLIP) != 0, rotate = (v.flags & AUG_ROTATE) != 0;
    const u32 quads_per_row = (crop + 3) / 4;
    const u32 quads = crop * quads_per_row;
    const u64 plane = (u64)crop * crop;
    const u64 channel = (u64)v.out_batch * plane;
    float* __restrict__ dst = out + v.out_offset + (u64)v.out_slot * plane;
    for (u32 qi = t; qi < quads; qi += AUG_BLOCK) {
        const u32 y = qi / quads_per_row;
        const u32 x0 = (qi - y * quads_per_row) * 4;
        const u32 n = min(4u, crop - x0);
        float o[3][4];
#pragma unroll
        for (u32 i = 0; i < 4; ++i) {
            o[0][i] = o[1][i] = o[2][i] = 0.0f;
            if (i >= n) continue;
            const u32 x = x0 + i;
            const u32 sy = rotate ? x : y;
            const u32 sx = rotate ? (flip ? y : crop - 1 - y) : (flip ? crop - 1 - x : x);
            const u8* px = src + sy * row + 3 * sx;
            const u32 br = __ldg(px), bg = __ldg(px + 1), bb = __ldg(px + 2);
            if (!jitter) {
                o[0][i] = norm[0][br];
                o[1][i] = norm[1][bg];
                o[2][i] = norm[2][bb];
                continue;
            }
            float r = unit[br], g = unit[bg], b = unit[bb];
#pragma unroll
            for (u32 k = 0; k < 4; ++k) apply_op(op_at(v.order, k), v, mean, r, g, b);
            o[0][i] = dvd(sub(r, m0), s0);
            o[1][i] = dvd(sub(g, m1), s1);
            o[2][i] = dvd(sub(b, m2), s2);
        }
        float* at = dst + (u64)y * crop + x0;
#pragma unroll
        for (u32 ch = 0; ch < 3; ++ch) {
            float* p = at + ch * channel;
            if (vec) {
                *reinterpret_cast<float4*>(p) = make_float4(o[ch][0], o[ch][1], o[ch][2], o[ch][3]);
            } else {
                for (u32 i = 0; i < n; ++i) p[i] = o[ch][i];
            }
        }
    }
}
