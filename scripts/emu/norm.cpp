// Host emulation of kernels/norm.cu (no GPU needed): the batch norm forward (train, eval)
// and backward launched exactly as src/engine/cuda/norm.rs launches them (grid shapes,
// chunks, the f64 scratch [partials][coef], the eval and relu flags, a null or real residual
// and ReLU output), with the rows' views at float offsets 0..3 so that every head / float4
// body / tail split and the all-scalar path of disagreeing alignments run. Checked against
//  - a naive f64 reference (two-pass moments, the CPU engine's formulas of
//    src/engine/cpu/norm.rs): statistics, running update, daffine, coefficients, y and dx
//    within tolerances;
//  - the CPU twin's f32 elementwise formulas fed the kernels' own statistics: y, dx and the
//    ReLU-masked dy bit for bit (the kernels' documented promise);
//  - guards: every value around every output view, past the used scratch, and the inputs
//    untouched.
// Run: scripts/emu/emulate.sh norm
#include "cuda_shim.h"
#include "../../kernels/norm.cu"
#include <algorithm>
#include <random>
#include <string>

struct Case {
    unsigned c, m;
    int ox, oy, ores, od, odx;  // float offsets (mod 4) of x, y (= relu_out), residual, dy, dx
    bool res, relu;
};

static int fails = 0;
static void check(bool ok, const char* what, const std::string& detail) {
    if (!ok) fails++;
    printf("  %-36s %s %s\n", what, detail.c_str(), ok ? "ok" : "FAIL");
}
static std::string fmt(const char* f, double a, double b = 0) {
    char s[160];
    snprintf(s, sizeof s, f, a, b);
    return s;
}

// Bitwise mismatches between a and b over n values.
static long mismatches(const float* a, const float* b, size_t n) {
    long bad = 0;
    for (size_t i = 0; i < n; i++) bad += __float_as_uint(a[i]) != __float_as_uint(b[i]);
    return bad;
}
// Values of buf outside [off, off + n) that are not the guard.
static long guards_touched(const emu::Buf& b, size_t off, size_t n, float guard) {
    long bad = 0;
    for (size_t i = 0; i < b.cap; i++)
        if ((i < off || i >= off + n) && !emu::is_guard(b.base[i], guard)) bad++;
    return bad;
}

static void run_case(const Case& k, std::mt19937& rng) {
    const unsigned C = k.c;
    const u64 M = k.m;
    const size_t n = (size_t)C * M;
    const float eps = 1e-5f, momentum = 0.1f;
    const unsigned chunks = (unsigned)((M + NORM_CHUNK - 1) / NORM_CHUNK);
    printf("C %u M %llu chunks %u offsets x%d y%d r%d dy%d dx%d%s%s\n", C, M, chunks, k.ox, k.oy,
           k.ores, k.od, k.odx, k.res ? " residual" : "", k.relu ? " relu" : "");
    std::normal_distribution<float> N01(0, 1);
    std::uniform_real_distribution<float> U(-1, 1);
    const float G = NAN;
    emu::Buf xb(n + 4, G), yb(n + 4, G), rb(n + 4, G), dyb(n + 4, G), dxb(n + 4, G);
    float* x = xb.base + k.ox;
    float* y = yb.base + k.oy;
    float* r = rb.base + k.ores;
    float* dy = dyb.base + k.od;
    float* dx = dxb.base + k.odx;
    for (unsigned c = 0; c < C; c++) {
        const float mu = 3.0f * U(rng) + 4.0f, sd = 0.5f + U(rng) * 0.4f;  // offset rows
        for (u64 i = 0; i < M; i++) x[c * M + i] = mu + sd * N01(rng);
    }
    for (size_t i = 0; i < n; i++) r[i] = 0.5f * N01(rng);
    for (size_t i = 0; i < n; i++) dy[i] = N01(rng);
    std::vector<float> affine(2 * C), running(2 * C), running0, daffine(2 * C), daffine0;
    for (unsigned c = 0; c < C; c++) {
        affine[c] = 1.0f + 0.5f * U(rng);
        affine[C + c] = 0.3f * U(rng);
        running[c] = U(rng);
        running[C + c] = 1.0f + 0.5f * U(rng);
        daffine[c] = U(rng);
        daffine[C + c] = U(rng);
    }
    running0 = running;
    daffine0 = daffine;
    const std::vector<float> x0(x, x + n), r0(r, r + n), dy0(dy, dy + n);
    // The scratch as norm.rs sizes it: 2 C (chunks + 1) doubles; NaN-filled to show that
    // nothing is read before it is written, and guards after it.
    const size_t scratch_len = 2 * (size_t)C * (chunks + 1);
    std::vector<double> scratch(scratch_len + 16, NAN);
    std::vector<float> saved(2 * C + 4, NAN);
    running.resize(2 * C + 4, NAN);
    daffine.resize(2 * C + 4, NAN);
    const dim3 rows(chunks, C), fin((C + NORM_WARPS - 1) / NORM_WARPS), blk(NORM_BLOCK);
    double* partials = scratch.data();

    // ---- training forward: the three launches of batchnorm_forward in training mode.
    const float* resp = k.res ? r : nullptr;
    emu::launch(rows, blk, [&] { bn_stats_partial(x, M, partials); });
    emu::launch(fin, blk, [&] {
        bn_stats_finalize(x, M, C, chunks, partials, eps, momentum, saved.data(), running.data());
    });
    emu::launch(rows, blk, [&] { bn_apply(x, resp, M, affine.data(), saved.data(), eps, 0, k.relu, y); });

    // Reference statistics: two-pass f64 as src/engine/cpu/norm.rs.
    std::vector<double> mean(C), var(C);
    double worst_mean = 0, worst_istd = 0, worst_run = 0;
    const double unbias = (double)M / std::max((double)M - 1.0, 1.0);
    for (unsigned c = 0; c < C; c++) {
        double s = 0, q = 0;
        for (u64 i = 0; i < M; i++) s += x[c * M + i];
        mean[c] = s / M;
        for (u64 i = 0; i < M; i++) q += (x[c * M + i] - mean[c]) * (x[c * M + i] - mean[c]);
        var[c] = q / M;
        const double sd = std::sqrt(var[c] + eps), istd = 1.0 / sd;
        worst_mean = std::max(worst_mean, std::fabs(saved[c] - mean[c]) / (std::fabs(mean[c]) + sd));
        worst_istd = std::max(worst_istd, std::fabs(saved[C + c] - istd) / istd);
        const double rm = (1.0 - momentum) * running0[c] + momentum * mean[c];
        const double rv = (1.0 - momentum) * running0[C + c] + momentum * var[c] * unbias;
        worst_run = std::max(worst_run, std::fabs(running[c] - rm) / (std::fabs(rm) + sd));
        worst_run = std::max(worst_run, std::fabs(running[C + c] - rv) / rv);
    }
    check(worst_mean < 2e-7, "saved mean vs f64", fmt("rel %.2e", worst_mean));
    check(worst_istd < 2e-7, "saved invstd vs f64", fmt("rel %.2e", worst_istd));
    check(worst_run < 2e-7, "running [mean; var] vs f64", fmt("rel %.2e", worst_run));
    {
        long g = 0;
        for (unsigned i = 2 * C; i < 2 * C + 4; i++) g += !std::isnan(saved[i]) + !std::isnan(running[i]);
        for (size_t i = 2 * (size_t)C * chunks; i < scratch.size(); i++) g += !std::isnan(scratch[i]);
        check(g == 0, "no write past saved/running/partials", fmt("%.0f stray", g));
    }
    // y: the CPU twin's f32 formulas with the kernels' statistics (bit for bit), and the f64
    // normalization with the reference statistics (tolerance).
    auto expect_y = [&](const float* stats, bool eval, std::vector<float>& want) {
        want.assign(n, 0);
        for (unsigned c = 0; c < C; c++) {
            const float g = affine[c], be = affine[C + c];
            const float a = eval ? g / std::sqrt(stats[C + c] + eps) : g * stats[C + c];
            const float b = be - stats[c] * a;
            for (u64 i = 0; i < M; i++) {
                const size_t j = c * M + i;
                float v = x[j] * a + b;
                if (k.res) v = v + r[j];
                want[j] = k.relu ? std::max(v, 0.0f) : v;
            }
        }
    };
    std::vector<float> want;
    expect_y(saved.data(), false, want);
    check(mismatches(y, want.data(), n) == 0, "train y vs CPU formulas (bitwise)",
          fmt("%.0f differ", mismatches(y, want.data(), n)));
    {
        double mx = 0, scale = 0;
        for (unsigned c = 0; c < C; c++)
            for (u64 i = 0; i < M; i++) {
                const size_t j = c * M + i;
                const double a = affine[c] / std::sqrt(var[c] + eps);
                double v = a * (x[j] - mean[c]) + affine[C + c];
                if (k.res) v += r[j];
                if (k.relu) v = std::max(v, 0.0);
                mx = std::max(mx, std::fabs(y[j] - v));
                // The f32 affine form x a + b rounds at the scale of x a, not of y.
                scale = std::max({scale, std::fabs(v), std::fabs(a * x[j])});
            }
        check(mx <= 4e-6 * std::max(scale, 1.0), "train y vs f64", fmt("max abs %.2e (scale %.1f)", mx, scale));
    }
    check(guards_touched(yb, k.oy, n, G) == 0, "train y guards", "");

    // ---- evaluation forward: bn_apply alone, with the running [mean; var].
    const std::vector<float> run_now(running.begin(), running.begin() + 2 * C);
    emu::Buf eb(n + 4, G);
    float* ye = eb.base + k.oy;
    emu::launch(rows, blk, [&] { bn_apply(x, resp, M, affine.data(), run_now.data(), eps, 1, k.relu, ye); });
    expect_y(run_now.data(), true, want);
    check(mismatches(ye, want.data(), n) == 0, "eval y vs CPU formulas (bitwise)",
          fmt("%.0f differ", mismatches(ye, want.data(), n)));
    {
        double mx = 0, scale = 0;
        for (unsigned c = 0; c < C; c++)
            for (u64 i = 0; i < M; i++) {
                const size_t j = c * M + i;
                const double a = affine[c] / std::sqrt((double)run_now[C + c] + eps);
                double v = a * (x[j] - (double)run_now[c]) + affine[C + c];
                if (k.res) v += r[j];
                if (k.relu) v = std::max(v, 0.0);
                mx = std::max(mx, std::fabs(ye[j] - v));
                scale = std::max({scale, std::fabs(v), std::fabs(a * x[j])});
            }
        check(mx <= 4e-6 * std::max(scale, 1.0), "eval y vs f64", fmt("max abs %.2e (scale %.1f)", mx, scale));
    }
    check(guards_touched(eb, k.oy, n, G) == 0, "eval y guards", "");

    // ---- training backward: the three launches of batchnorm_train_backward, relu_out = y
    // when the forward had a ReLU; the scratch reused as norm.rs does (partials, then coef).
    std::fill(scratch.begin(), scratch.end(), NAN);
    double* coef = scratch.data() + 2 * (size_t)C * chunks;
    const float* relu_out = k.relu ? y : nullptr;
    emu::launch(rows, blk, [&] { bn_grad_partial(x, relu_out, dy, M, saved.data(), partials); });
    emu::launch(fin, blk, [&] {
        bn_grad_finalize(M, C, chunks, partials, saved.data(), daffine.data(), coef);
    });
    emu::launch(rows, blk, [&] { bn_grad_apply(x, dy, M, affine.data(), saved.data(), coef, dx); });

    // dy masked in place: exactly dy0 [y > 0].
    std::vector<float> g(dy0);
    if (k.relu)
        for (size_t i = 0; i < n; i++) if (y[i] <= 0.0f) g[i] = 0.0f;
    check(mismatches(dy, g.data(), n) == 0, "dy after ReLU undo (bitwise)", fmt("%.0f differ", mismatches(dy, g.data(), n)));
    check(guards_touched(dyb, k.od, n, G) == 0, "dy guards", "");
    // Reference sums with the saved f32 statistics (as the CPU twin), in f64.
    double worst_aff = 0, worst_coef = 0, dx_err = 0, dx_scale = 0;
    std::vector<float> want_dx(n);
    for (unsigned c = 0; c < C; c++) {
        const float mu = saved[c], istd = saved[C + c];
        double dbeta = 0, dgamma = 0, mag_b = 0, mag_g = 0;
        for (u64 i = 0; i < M; i++) {
            const size_t j = c * M + i;
            dbeta += g[j];
            dgamma += (double)g[j] * ((double)x[j] - mu) * (double)istd;
            mag_b += std::fabs(g[j]);
            mag_g += std::fabs((double)g[j] * ((double)x[j] - mu) * (double)istd);
        }
        // daffine += [dgamma; dbeta] in f32: one rounding of the f64 sum, then the add.
        const double eg = std::fabs(daffine[c] - (daffine0[c] + dgamma));
        const double eb_ = std::fabs(daffine[C + c] - (daffine0[C + c] + dbeta));
        worst_aff = std::max(worst_aff, eg / (mag_g + std::fabs(daffine0[c]) + 1e-30));
        worst_aff = std::max(worst_aff, eb_ / (mag_b + std::fabs(daffine0[C + c]) + 1e-30));
        worst_coef = std::max(worst_coef, std::fabs(coef[c] - dbeta / M) / (mag_b / M + 1e-30));
        worst_coef = std::max(worst_coef, std::fabs(coef[C + c] - dgamma / M) / (mag_g / M + 1e-30));
        // The CPU twin's dx formula with the kernels' coefficients: bit for bit.
        const float scale = affine[c] * istd, mdy = (float)coef[c], mdyx = (float)coef[C + c];
        for (u64 i = 0; i < M; i++) {
            const size_t j = c * M + i;
            want_dx[j] = scale * (g[j] - mdy - (x[j] - mu) * istd * mdyx);
        }
        // f64: dx = gamma invstd / M (M dy - dbeta - xhat dgamma) from the reference stats.
        const double istd64 = 1.0 / std::sqrt(var[c] + eps);
        double db64 = 0, dg64 = 0;
        for (u64 i = 0; i < M; i++) {
            db64 += g[c * M + i];
            dg64 += g[c * M + i] * (x[c * M + i] - mean[c]) * istd64;
        }
        for (u64 i = 0; i < M; i++) {
            const size_t j = c * M + i;
            const double xhat = (x[j] - mean[c]) * istd64;
            const double v = affine[c] * istd64 / M * (M * (double)g[j] - db64 - xhat * dg64);
            dx_err = std::max(dx_err, std::fabs(dx[j] - v));
            dx_scale = std::max(dx_scale, std::fabs(affine[c] * istd64 * g[j]));
        }
    }
    check(worst_aff < 1e-6, "daffine accumulated vs f64", fmt("rel %.2e", worst_aff));
    check(worst_coef < 1e-12, "coef [dbeta/M; dgamma/M] vs f64", fmt("rel %.2e", worst_coef));
    check(mismatches(dx, want_dx.data(), n) == 0, "dx vs CPU formulas (bitwise)",
          fmt("%.0f differ", mismatches(dx, want_dx.data(), n)));
    check(dx_err <= 1e-5 * std::max(dx_scale, 1e-3), "dx vs f64", fmt("max abs %.2e (scale %.2e)", dx_err, dx_scale));
    check(guards_touched(dxb, k.odx, n, G) == 0, "dx guards", "");
    {
        long gd = 0;
        for (unsigned i = 2 * C; i < 2 * C + 4; i++) gd += !std::isnan(daffine[i]);
        for (size_t i = 2 * (size_t)C * (chunks + 1); i < scratch.size(); i++) gd += !std::isnan(scratch[i]);
        check(gd == 0, "no write past daffine/coef", fmt("%.0f stray", gd));
    }
    const bool inputs = mismatches(x, x0.data(), n) == 0 && mismatches(r, r0.data(), n) == 0 &&
                        guards_touched(xb, k.ox, n, G) == 0 && guards_touched(rb, k.ores, n, G) == 0;
    check(inputs, "x, residual untouched", "");
}

int main() {
    // Offsets mod 4 of x, y/relu_out, residual, dy, dx: equal ones take the float4 body with a
    // head of (4 - offset) % 4 values; any disagreement takes the all-scalar path.
    const std::vector<Case> cases = {
        {3, 1, 0, 0, 0, 0, 0, false, true},          // M = 1: unbias clamp, no body
        {9, 5, 1, 1, 1, 1, 1, true, true},           // head 3, tail 2; two finalize blocks
        {2, 2, 3, 3, 3, 3, 3, false, false},         // head 1, tail 1
        {4, 3, 2, 2, 2, 2, 2, true, false},          // head 2, tail 1
        {17, 30, 3, 3, 3, 3, 0, true, true},         // dx misaligned: scalar grad_apply only
        {1, 4096, 0, 0, 0, 0, 0, false, false},      // exactly one chunk, all float4
        {2, 8195, 2, 2, 2, 2, 2, true, true},        // three chunks with a head of 2
        {2, 4097, 1, 2, 1, 1, 1, true, false},       // y misaligned: scalar forward
        {3, 12289, 0, 0, 1, 0, 0, true, true},       // residual misaligned; 4 chunks
        {5, 4099, 3, 3, 3, 1, 3, false, true},       // dy misaligned: scalar backward
        {8, 77, 1, 1, 1, 1, 1, false, false},        // finalize: exactly one block
    };
    std::mt19937 rng(7);
    for (const Case& k : cases) run_case(k, rng);
    printf("%d failures, %lld launches, %lld blocks, %lld fiber switches\n", fails, emu::launches,
           emu::blocks_run, emu::swaps);
    return fails != 0;
}
