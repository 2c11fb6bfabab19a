// Host emulation of dev/cuda/conv_igemm.cu (no GPU needed): every kernel on every shape
// below against a naive f64 convolution, the 64 values past the output checked untouched.
// Each block runs its 256 threads as fibers (ucontext) on one OS thread; __syncthreads and
// the warp-wide mma.sync (emulated from the PTX ISA fragment layout of m16n8k8 .tf32) are
// barriers. Run: scripts/emu/conv_igemm.sh (about a minute).
#include "cuda_shim.h"
#include "../../dev/cuda/conv_igemm.cu"
#include <cstdio>
#include <random>
#include <string>

static const int NT = 256;

float to_tf32(float v) {  // cvt.rna.tf32.f32 for finite values
    unsigned u = __float_as_uint(v);
    u = (u + 0x1000u) & ~0x1fffu;
    return __uint_as_float(u);
}
static long long mma_count = 0;
struct WarpX { unsigned a[32][4], b[32][2]; };
static WarpX wx[NT / 32];
using emu::warp_wait;
void mma_tf32(float& d0, float& d1, float& d2, float& d3, const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int lane = emu::lane(), warp = emu::warp();
    for (int i = 0; i < 4; i++) { wx[warp].a[lane][i] = a[i]; assert((a[i] & 0x1fff) == 0); }
    for (int i = 0; i < 2; i++) { wx[warp].b[lane][i] = b[i]; assert((b[i] & 0x1fff) == 0); }
    warp_wait();
    if (lane == 0) mma_count++;
    // PTX ISA, m16n8k8 .tf32: A(r, c) in lane (r%8)*4 + c%4, reg (r>=8) + 2*(c>=4);
    // B(k, n) in lane n*4 + k%4, reg (k>=4); D(r, c) in lane (r%8)*4 + c/2, reg 2*(r>=8) + c%2.
    auto A = [&](int r, int c) { return __uint_as_float(wx[warp].a[(r % 8) * 4 + c % 4][(r >= 8) + 2 * (c >= 4)]); };
    auto B = [&](int k, int n) { return __uint_as_float(wx[warp].b[n * 4 + k % 4][k >= 4]); };
    float* d[4] = {&d0, &d1, &d2, &d3};
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; e++) {
        const int r = g + (e >= 2 ? 8 : 0), c = 2 * t + (e & 1);
        double s = *d[e];
        for (int k = 0; k < 8; k++) s += (double)A(r, k) * B(k, c);
        *d[e] = (float)s;
    }
    warp_wait();
}

static void launch(void (*k)(const float*, const float*, IgemmShape, float*), dim3 grid,
                   const float* x, const float* w, IgemmShape s, float* y) {
    emu::launch(grid, dim3(NT), [&] { k(x, w, s, y); });
}

struct Case { unsigned batch, cin, cout, h, w, k, stride, pad; };

static void reference(const Case& c, const std::vector<float>& x, const std::vector<float>& w, std::vector<double>& y, unsigned oh, unsigned ow) {
    const unsigned np = c.batch * oh * ow;
    for (unsigned co = 0; co < c.cout; co++)
        for (unsigned n = 0; n < c.batch; n++)
            for (unsigned oy = 0; oy < oh; oy++)
                for (unsigned ox = 0; ox < ow; ox++) {
                    double s = 0;
                    for (unsigned ci = 0; ci < c.cin; ci++)
                        for (unsigned ky = 0; ky < c.k; ky++)
                            for (unsigned kx = 0; kx < c.k; kx++) {
                                int iy = oy * c.stride + ky - c.pad, ix = ox * c.stride + kx - c.pad;
                                if (iy < 0 || ix < 0 || iy >= (int)c.h || ix >= (int)c.w) continue;
                                s += (double)w[((co * c.cin + ci) * c.k + ky) * c.k + kx] *
                                     x[((ci * c.batch + n) * c.h + iy) * c.w + ix];
                            }
                    y[co * np + (n * oh + oy) * ow + ox] = s;
                }
}

int main(int argc, char** argv) {
    std::vector<Case> cases = {
        {2, 3, 8, 13, 11, 7, 2, 3},   {3, 8, 8, 9, 9, 3, 1, 1},    {3, 8, 16, 9, 7, 3, 2, 1},
        {3, 8, 16, 9, 9, 1, 2, 0},    {4, 16, 8, 5, 5, 1, 1, 0},   {1, 1, 1, 1, 1, 1, 1, 0},
        {2, 4, 4, 2, 2, 3, 1, 1},     {2, 3, 64, 32, 32, 7, 2, 3}, {2, 64, 64, 14, 14, 3, 1, 1},
        {1, 64, 128, 14, 14, 3, 2, 1},{2, 64, 128, 14, 14, 1, 2, 0}, {1, 32, 130, 9, 10, 3, 1, 1},
        {1, 20, 200, 7, 7, 3, 1, 1},  {1, 256, 256, 4, 4, 3, 1, 1}, {3, 5, 65, 11, 13, 5, 3, 2},
    };
    int fails = 0;
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> U(-1, 1);
    for (const Case& c : cases) {
        const unsigned oh = (c.h + 2 * c.pad - c.k) / c.stride + 1, ow = (c.w + 2 * c.pad - c.k) / c.stride + 1;
        const unsigned np = c.batch * oh * ow;
        std::vector<float> x(c.cin * c.batch * c.h * c.w), w(c.cout * c.cin * c.k * c.k);
        for (auto& v : x) v = U(rng);
        for (auto& v : w) v = U(rng);
        std::vector<double> ref(c.cout * np);
        reference(c, x, w, ref, oh, ow);
        IgemmShape s{c.batch, c.cin, c.cout, c.h, c.w, oh, ow, c.k, c.stride, c.pad};
        struct K { const char* name; void (*f)(const float*, const float*, IgemmShape, float*); unsigned bm; double tol; };
        K ks[] = {{"f32_m128", conv_igemm_f32_m128, 128, 1e-6}, {"f32_m64", conv_igemm_f32_m64, 64, 1e-6},
                  {"tf32_m128", conv_igemm_tf32_m128, 128, 1e-2}, {"tf32_m64", conv_igemm_tf32_m64, 64, 1e-2}};
        for (const K& k : ks) {
            std::vector<float> y(c.cout * np + 64, NAN);  // 64 guard values after the end
            mma_count = 0;
            launch(k.f, dim3{(np + 127) / 128, (c.cout + k.bm - 1) / k.bm, 1}, x.data(), w.data(), s, y.data());
            double d2 = 0, r2 = 0, mx = 0;
            bool finite = true;
            for (size_t i = 0; i < ref.size(); i++) {
                if (!std::isfinite(y[i])) finite = false;
                d2 += (y[i] - ref[i]) * (y[i] - ref[i]); r2 += ref[i] * ref[i];
                mx = std::max(mx, std::fabs(y[i] - ref[i]));
            }
            bool guard = true;
            for (int i = 0; i < 64; i++) if (!std::isnan(y[ref.size() + i])) guard = false;
            const double rel = std::sqrt(d2 / std::max(r2, 1e-30));
            const bool ok = finite && guard && rel < k.tol;
            fails += !ok;
            printf("%-9s b%u %3u->%3u %2ux%-2u k%u s%u p%u: rel L2 %.2e max abs %.2e mma %lld %s\n", k.name, c.batch, c.cin, c.cout,
                   c.h, c.w, c.k, c.stride, c.pad, rel, mx, mma_count, ok ? "ok" : "FAIL");
        }
    }
    printf("%d failures, %lld fiber switches\n", fails, emu::swaps);
    return fails != 0;
}
