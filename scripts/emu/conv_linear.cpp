// Host emulation of kernels/conv.cu (conv_im2col, conv_col2im) and kernels/linear.cu
// (linear_bias_act, relu_mask, linear_bias_grad), no GPU needed.
//  - Convolution: the unfolded path of src/engine/cuda/conv.rs (forward, and backward with
//    dw += and dx +=), chunk by chunk of images with its grids (ceil(row_len / CONV_BLOCK)
//    clamped to 1..1024 blocks, one grid row per unfolded row / input channel) and its
//    cuBLAS products as a naive column-major host gemm (C = op(A) op(B) + beta C with
//    leading dimensions, f64 accumulation). The images-per-chunk budget is shrunk (it is
//    64 Mi values in conv.rs) so that the small shapes here run several chunks, the last
//    one partial. Checked against a naive f64 convolution, its weight and input gradients.
//  - Linear: the three kernels launched as src/engine/cuda/linear.rs launches them
//    (elementwise grids clamped to 4096 blocks, one warp per row for the bias gradient);
//    bias_act and relu_mask bit for bit, the bias gradient against an f64 sum.
// Guards around every output checked. Run: scripts/emu/emulate.sh conv_linear
#include "cuda_shim.h"
#include "../../kernels/conv.cu"
#include "../../kernels/linear.cu"
#include <algorithm>
#include <random>
#include <string>

static int fails = 0;
static void check(bool ok, const char* what, double v) {
    if (!ok) fails++;
    printf("  %-36s %.2e %s\n", what, v, ok ? "ok" : "FAIL");
}
static long guards_touched(const emu::Buf& b, size_t off, size_t n) {
    long bad = 0;
    for (size_t i = 0; i < b.cap; i++)
        if ((i < off || i >= off + n) && !emu::is_guard(b.base[i], NAN)) bad++;
    return bad;
}

// cuBLAS semantics, column-major: C[m, n] = op(A)[m, k] op(B)[k, n] + beta C.
static void gemm(int m, int n, int k, const float* A, bool ta, int lda, const float* B, bool tb,
                 int ldb, float beta, float* C, int ldc) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int l = 0; l < k; l++) {
                const float a = ta ? A[l + (size_t)i * lda] : A[i + (size_t)l * lda];
                const float b = tb ? B[j + (size_t)l * ldb] : B[l + (size_t)j * ldb];
                s += (double)a * b;
            }
            float& c = C[i + (size_t)j * ldc];
            c = beta == 0.0f ? (float)s : (float)(s + (double)beta * c);
        }
}

static dim3 rows_grid(size_t rows, size_t row_len) {
    return dim3((unsigned)std::clamp<size_t>((row_len + CONV_BLOCK - 1) / CONV_BLOCK, 1, 1024), (unsigned)rows);
}

struct ConvCase { unsigned batch, cin, cout, h, w, k, s, p, chunk; };

static void conv_case(const ConvCase& c, std::mt19937& rng) {
    const unsigned oh = (c.h + 2 * c.p - c.k) / c.s + 1, ow = (c.w + 2 * c.p - c.k) / c.s + 1;
    const size_t plane = (size_t)oh * ow, K = (size_t)c.cin * c.k * c.k, ld_y = c.batch * plane;
    printf("conv b%u %u->%u %ux%u k%u s%u p%u, %u images a chunk\n", c.batch, c.cin, c.cout, c.h, c.w, c.k, c.s, c.p, c.chunk);
    std::uniform_real_distribution<float> U(-1, 1);
    const size_t nx = (size_t)c.cin * c.batch * c.h * c.w, nw = c.cout * K, ny = c.cout * ld_y;
    std::vector<float> x(nx), w(nw), dy(ny), dw0(nw), dx0(nx);
    for (auto* v : {&x, &w, &dy, &dw0, &dx0}) for (auto& e : *v) e = U(rng);
    // Naive f64 references: y, dw (+= dw0), dx (+= dx0).
    std::vector<double> y64(ny, 0), dw64(dw0.begin(), dw0.end()), dx64(dx0.begin(), dx0.end());
    for (unsigned co = 0; co < c.cout; co++)
        for (unsigned n = 0; n < c.batch; n++)
            for (unsigned oy = 0; oy < oh; oy++)
                for (unsigned ox = 0; ox < ow; ox++) {
                    const size_t yi = co * ld_y + (n * oh + oy) * ow + ox;
                    for (unsigned ci = 0; ci < c.cin; ci++)
                        for (unsigned ky = 0; ky < c.k; ky++)
                            for (unsigned kx = 0; kx < c.k; kx++) {
                                const int iy = oy * c.s + ky - c.p, ix = ox * c.s + kx - c.p;
                                if (iy < 0 || ix < 0 || iy >= (int)c.h || ix >= (int)c.w) continue;
                                const size_t wi = ((co * c.cin + ci) * c.k + ky) * c.k + kx;
                                const size_t xi = ((ci * c.batch + n) * c.h + iy) * c.w + ix;
                                y64[yi] += (double)w[wi] * x[xi];
                                dw64[wi] += (double)dy[yi] * x[xi];
                                dx64[xi] += (double)dy[yi] * w[wi];
                            }
                }
    const ConvShape shape{c.batch, c.h, c.w, oh, ow, c.k, c.s, c.p};
    emu::Buf yb(ny, NAN), dwb(nw, NAN), dxb(nx, NAN);
    float *y = yb.base, *dw = dwb.base, *dx = dxb.base;
    std::copy(dw0.begin(), dw0.end(), dw);
    std::copy(dx0.begin(), dx0.end(), dx);
    std::vector<float> cols(K * c.chunk * plane + 64, NAN);
    // Forward, as conv2d_forward.
    for (unsigned n0 = 0; n0 < c.batch; n0 += c.chunk) {
        const unsigned nb = std::min(c.chunk, c.batch - n0);
        const size_t cn = nb * plane;
        emu::launch(rows_grid(K, cn), dim3(CONV_BLOCK), [&] { conv_im2col(x.data(), shape, n0, nb, cols.data()); });
        gemm(cn, c.cout, K, cols.data(), false, cn, w.data(), false, K, 0.0f, y + n0 * plane, ld_y);
    }
    // Backward, as conv2d_backward with dx.
    for (unsigned n0 = 0; n0 < c.batch; n0 += c.chunk) {
        const unsigned nb = std::min(c.chunk, c.batch - n0);
        const size_t cn = nb * plane;
        const float* dyc = dy.data() + n0 * plane;
        emu::launch(rows_grid(K, cn), dim3(CONV_BLOCK), [&] { conv_im2col(x.data(), shape, n0, nb, cols.data()); });
        gemm(K, c.cout, cn, cols.data(), true, cn, dyc, false, ld_y, 1.0f, dw, K);
        gemm(cn, K, c.cout, dyc, false, ld_y, w.data(), true, K, 0.0f, cols.data(), cn);
        emu::launch(rows_grid(c.cin, nb * c.h * c.w), dim3(CONV_BLOCK), [&] { conv_col2im(cols.data(), shape, n0, nb, dx); });
    }
    auto rel = [](const float* a, const std::vector<double>& r) {
        double d = 0, s = 0;
        for (size_t i = 0; i < r.size(); i++) { d += (a[i] - r[i]) * (a[i] - r[i]); s += r[i] * r[i]; }
        return std::sqrt(d / std::max(s, 1e-30));
    };
    double e = rel(y, y64);
    check(e < 1e-6, "y vs f64 (rel L2)", e);
    e = rel(dw, dw64);
    check(e < 1e-6, "dw += vs f64 (rel L2)", e);
    e = rel(dx, dx64);
    check(e < 1e-6, "dx += vs f64 (rel L2)", e);
    bool guard = true;
    for (size_t i = K * c.chunk * plane; i < cols.size(); i++) guard &= std::isnan(cols[i]);
    const double g = guards_touched(yb, 0, ny) + guards_touched(dwb, 0, nw) + guards_touched(dxb, 0, nx) + !guard;
    check(g == 0, "guards (y, dw, dx, cols)", g);
}

static unsigned elementwise(size_t n) { return (unsigned)std::clamp<size_t>((n + LINEAR_BLOCK - 1) / LINEAR_BLOCK, 1, 4096); }

static void linear_case(unsigned rows, unsigned cols, std::mt19937& rng) {
    printf("linear %u x %u\n", rows, cols);
    std::normal_distribution<float> N(0, 1);
    const size_t n = (size_t)rows * cols;
    std::vector<float> b(rows), y0(n), dy0(n), db0(rows);
    for (auto* v : {&b, &y0, &dy0, &db0}) for (auto& e : *v) e = N(rng);
    for (int relu = 0; relu < 2; relu++) {
        emu::Buf yb(n, NAN), dyb(n, NAN), dbb(rows, NAN);
        float *y = yb.base + 1, *dy = dyb.base + 1, *db = dbb.base + 1;
        std::copy(y0.begin(), y0.end(), y);
        std::copy(dy0.begin(), dy0.end(), dy);
        std::copy(db0.begin(), db0.end(), db);
        emu::launch(dim3(elementwise(n)), dim3(LINEAR_BLOCK), [&] { linear_bias_act(y, b.data(), rows, cols, relu); });
        long bad = 0;
        std::vector<float> want(n);
        for (size_t i = 0; i < n; i++) {
            float v = y0[i] + b[i / cols];
            want[i] = relu ? std::max(v, 0.0f) : v;
            bad += __float_as_uint(want[i]) != __float_as_uint(y[i]);
        }
        check(bad == 0, relu ? "bias_act relu (mismatches)" : "bias_act (mismatches)", bad);
        if (relu) {
            emu::launch(dim3(elementwise(n)), dim3(LINEAR_BLOCK), [&] { relu_mask(dy, y, (u64)n); });
            bad = 0;
            for (size_t i = 0; i < n; i++) bad += __float_as_uint(dy[i]) != __float_as_uint(want[i] <= 0.0f ? 0.0f : dy0[i]);
            check(bad == 0, "relu_mask (mismatches)", bad);
        }
        emu::launch(dim3((rows + LINEAR_BLOCK / 32 - 1) / (LINEAR_BLOCK / 32)), dim3(LINEAR_BLOCK),
                    [&] { linear_bias_grad(dy, rows, cols, db); });
        double worst = 0;
        for (unsigned r = 0; r < rows; r++) {
            double s = 0, mag = std::fabs(db0[r]);
            for (unsigned j = 0; j < cols; j++) { s += dy[(size_t)r * cols + j]; mag += std::fabs(dy[(size_t)r * cols + j]); }
            worst = std::max(worst, std::fabs(db[r] - (db0[r] + s)) / std::max(mag, 1e-30));
        }
        check(worst < 2e-7, "bias_grad db += vs f64 (rel)", worst);
        const double g = guards_touched(yb, 1, n) + guards_touched(dyb, 1, n) + guards_touched(dbb, 1, rows);
        check(g == 0, "guards (y, dy, db)", g);
    }
}

int main() {
    std::mt19937 rng(5);
    const ConvCase cases[] = {
        {3, 3, 8, 13, 11, 7, 2, 3, 2},  // stem-like, chunks of 2 then 1
        {4, 4, 5, 9, 9, 3, 1, 1, 3},
        {3, 5, 4, 9, 7, 3, 2, 1, 1},    // one image a chunk
        {2, 6, 3, 7, 8, 1, 2, 0, 2},    // strided 1x1 (unfolded, not the pointwise path)
        {2, 2, 3, 11, 13, 5, 3, 2, 2},  // stride 3: col2im's divisibility tests
        {1, 2, 2, 40, 40, 3, 1, 1, 1},  // rows longer than one block
    };
    for (const ConvCase& c : cases) conv_case(c, rng);
    linear_case(1, 1, rng);
    linear_case(10, 37, rng);    // two warps' rows in one block, odd columns
    linear_case(9, 300, rng);    // two blocks of rows, columns past 256
    linear_case(70, 64, rng);    // several blocks
    printf("%d failures, %lld launches, %lld blocks, %lld fiber switches\n", fails, emu::launches,
           emu::blocks_run, emu::swaps);
    return fails != 0;
}
