// Host emulation of kernels/pool.cu (no GPU needed): max pool forward/backward and global
// average pool forward/backward, launched as src/engine/cuda/pool.rs launches them (one
// thread per output / input value, ceil(n / POOL_BLOCK) blocks), and once more on a grid of
// 3 blocks to run the grid-stride loops. Checked bit for bit against a naive port of the CPU
// twin (src/engine/cpu/pool.rs): windows scanned row by row over their in-image positions
// (padding never wins), the first maximum kept (strictly greater, or NaN), the backward a
// scatter dx[argmax] += dy[o] in output order. Inputs are drawn from a few levels so that
// ties are common; one case has NaN and -inf values. Guards around every output checked.
// Run: scripts/emu/emulate.sh pool
#include "cuda_shim.h"
#include "../../kernels/pool.cu"
#include <algorithm>
#include <random>
#include <string>

static int fails = 0;
static void check(bool ok, const char* what, long bad) {
    if (!ok) fails++;
    printf("  %-40s %ld differ %s\n", what, bad, ok ? "ok" : "FAIL");
}
static long mismatches(const float* a, const float* b, size_t n) {
    long bad = 0;
    for (size_t i = 0; i < n; i++) bad += __float_as_uint(a[i]) != __float_as_uint(b[i]);
    return bad;
}
static long guards_touched(const emu::Buf& b, size_t off, size_t n) {
    long bad = 0;
    for (size_t i = 0; i < b.cap; i++)
        if ((i < off || i >= off + n) && !emu::is_guard(b.base[i], NAN)) bad++;
    return bad;
}
static unsigned blocks_for(size_t n) {
    return (unsigned)std::min<size_t>(std::max<size_t>((n + POOL_BLOCK - 1) / POOL_BLOCK, 1), 1u << 20);
}

struct MaxCase { unsigned planes; int h, w, k, s, p; bool specials; };

// The first maximum of output (oy, ox)'s window, scanned as the CPU twin does.
static int argmax_ref(const float* plane, const MaxCase& c, int oy, int ox) {
    int best = -1;
    float best_val = -INFINITY;
    for (int ky = 0; ky < c.k; ky++)
        for (int kx = 0; kx < c.k; kx++) {
            const int iy = oy * c.s - c.p + ky, ix = ox * c.s - c.p + kx;
            if (iy < 0 || ix < 0 || iy >= c.h || ix >= c.w) continue;  // padding never wins
            const float v = plane[iy * c.w + ix];
            if (best < 0) best = iy * c.w + ix;  // the first in-image position by default
            if (v > best_val || std::isnan(v)) { best = iy * c.w + ix; best_val = v; }
        }
    return best;
}

static void max_case(const MaxCase& c, std::mt19937& rng) {
    const int oh = (c.h + 2 * c.p - c.k) / c.s + 1, ow = (c.w + 2 * c.p - c.k) / c.s + 1;
    const size_t in_plane = (size_t)c.h * c.w, out_plane = (size_t)oh * ow;
    const size_t nin = c.planes * in_plane, nout = c.planes * out_plane;
    printf("maxpool planes %u %dx%d k%d s%d p%d -> %dx%d%s\n", c.planes, c.h, c.w, c.k, c.s, c.p, oh, ow,
           c.specials ? " (NaN, -inf)" : "");
    std::uniform_int_distribution<int> level(0, 3);
    std::uniform_int_distribution<int> pick(0, 40);
    std::normal_distribution<float> N01(0, 1);
    emu::Buf xb(nin, NAN), dyb(nout, NAN);
    float* x = xb.base + 1;  // any 4-byte alignment works: odd offsets
    float* dy = dyb.base + 3;
    for (size_t i = 0; i < nin; i++) {
        x[i] = 0.5f * level(rng) - 1.0f;  // ties everywhere
        if (c.specials) {
            const int r = pick(rng);
            if (r == 0) x[i] = NAN;
            else if (r < 12) x[i] = -INFINITY;
        }
    }
    for (size_t i = 0; i < nout; i++) dy[i] = N01(rng);
    // Reference: forward values and the scatter backward in output order from 0.
    std::vector<float> yref(nout), dxref(nin, 0.0f);
    for (unsigned pl = 0; pl < c.planes; pl++)
        for (int oy = 0; oy < oh; oy++)
            for (int ox = 0; ox < ow; ox++) {
                const float* xp = x + pl * in_plane;
                const int a = argmax_ref(xp, c, oy, ox);
                const size_t o = pl * out_plane + oy * ow + ox;
                yref[o] = xp[a];
                dxref[pl * in_plane + a] += dy[o];
            }
    for (unsigned grid : {blocks_for(nout), 3u}) {
        emu::Buf yb(nout, NAN), dxb(nin, NAN);
        float* y = yb.base + 2;
        float* dx = dxb.base + 1;
        const u64 planes = c.planes;
        emu::launch(dim3(grid), dim3(POOL_BLOCK), [&] { maxpool_forward(x, planes, c.h, c.w, oh, ow, c.k, c.s, c.p, y); });
        const unsigned gb = grid == 3 ? 3 : blocks_for(nin);
        emu::launch(dim3(gb), dim3(POOL_BLOCK), [&] { maxpool_backward(x, dy, planes, c.h, c.w, oh, ow, c.k, c.s, c.p, dx); });
        const std::string tag = grid == 3 ? " (3 blocks)" : "";
        long b = mismatches(y, yref.data(), nout);
        check(b == 0, ("forward y" + tag).c_str(), b);
        b = mismatches(dx, dxref.data(), nin);
        check(b == 0, ("backward dx" + tag).c_str(), b);
        b = guards_touched(yb, 2, nout) + guards_touched(dxb, 1, nin);
        check(b == 0, ("guards" + tag).c_str(), b);
    }
}

static void avg_case(unsigned planes, unsigned spatial, std::mt19937& rng) {
    printf("avgpool planes %u spatial %u\n", planes, spatial);
    std::normal_distribution<float> N(1, 2);
    const size_t n = (size_t)planes * spatial;
    emu::Buf xb(n, NAN), dyb(planes, NAN);
    float* x = xb.base + 3;
    float* dy = dyb.base + 1;
    for (size_t i = 0; i < n; i++) x[i] = N(rng);
    for (unsigned i = 0; i < planes; i++) dy[i] = N(rng);
    std::vector<float> yref(planes), dxref(n);
    const float inv = 1.0f / (float)spatial;
    for (unsigned p = 0; p < planes; p++) {
        double s = 0;
        for (unsigned j = 0; j < spatial; j++) s += (double)x[(size_t)p * spatial + j];
        yref[p] = (float)(s / spatial);
        for (unsigned j = 0; j < spatial; j++) dxref[(size_t)p * spatial + j] = dy[p] * inv;
    }
    for (unsigned grid : {0u, 3u}) {
        emu::Buf yb(planes, NAN), dxb(n, NAN);
        float* y = yb.base + 2;
        float* dx = dxb.base;
        const u64 pl = planes, sp = spatial;
        emu::launch(dim3(grid ? grid : blocks_for(planes)), dim3(POOL_BLOCK), [&] { avgpool_forward(x, pl, sp, y); });
        emu::launch(dim3(grid ? grid : blocks_for(n)), dim3(POOL_BLOCK), [&] { avgpool_backward(dy, pl, sp, dx); });
        const std::string tag = grid ? " (3 blocks)" : "";
        long b = mismatches(y, yref.data(), planes);
        check(b == 0, ("forward y" + tag).c_str(), b);
        b = mismatches(dx, dxref.data(), n);
        check(b == 0, ("backward dx" + tag).c_str(), b);
        b = guards_touched(yb, 2, planes) + guards_touched(dxb, 0, n);
        check(b == 0, ("guards" + tag).c_str(), b);
    }
}

int main() {
    std::mt19937 rng(3);
    const MaxCase cases[] = {
        {2, 13, 11, 3, 2, 1, false},  // the ResNet stem's pool, odd sizes
        {3, 8, 8, 2, 2, 0, false},    // non-overlapping windows
        {2, 9, 7, 3, 1, 1, true},     // overlapping, NaN and -inf values
        {1, 5, 6, 5, 3, 2, false},    // windows mostly padding
        {5, 1, 1, 1, 1, 0, true},     // 1x1
        {2, 10, 12, 4, 3, 2, true},   // even k, maximal padding
        {1, 33, 35, 3, 2, 1, false},  // more than one block of outputs
    };
    for (const MaxCase& c : cases) max_case(c, rng);
    avg_case(1, 1, rng);
    avg_case(7, 49, rng);
    avg_case(300, 3, rng);  // more planes than one block
    avg_case(3, 1000, rng);
    printf("%d failures, %lld launches, %lld blocks, %lld fiber switches\n", fails, emu::launches,
           emu::blocks_run, emu::swaps);
    return fails != 0;
}
