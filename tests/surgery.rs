//! Adaptive gradient surgery on hand-made gradients.
//!
//! `Surgery::combine` reduces the method to two scalars, `g = alpha g1 + beta g2`, computed
//! from three inner products. Every case here recomputes the combined gradient the long way,
//! on the actual vectors in f64 (project each task off the other's original gradient when
//! they conflict, sum, rescale to `|g1 + g2|` for AGS), and holds `alpha g1 + beta g2`, the
//! logged figures and the engine passes (`grad_dots`, `combine_grads`) to it. Cases: aligned,
//! opposed, orthogonal, exactly anti-parallel, one or both gradients zero, and random
//! high-dimensional gradients, conflicting or not.

mod common;

use common::in_pool;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::input::batch::HostBatch;
use slam_ags::engine::GradDots;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::model::surgery::Combination;
use slam_ags::model::{ModelState, StepBatch, StepConfig, Surgery, Trainer};

/// The method's epsilon (docs/METHOD.md section 5, Gradient surgery).
const EPS: f64 = 1e-10;
const MODES: [Surgery; 3] = [Surgery::Ags, Surgery::Pcgrad, Surgery::None];

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// `x + c y`
fn axpy(x: &[f64], c: f64, y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| a + c * b).collect()
}

fn dots_of(g1: &[f64], g2: &[f64]) -> GradDots {
    GradDots {
        g1g2: dot(g1, g2),
        g1g1: dot(g1, g1),
        g2g2: dot(g2, g2),
    }
}

/// The combined gradient computed on the vectors themselves.
fn reference(mode: Surgery, g1: &[f64], g2: &[f64]) -> Vec<f64> {
    let plain_sum = axpy(g1, 1.0, g2);
    if mode == Surgery::None {
        return plain_sum;
    }
    let d = dot(g1, g2);
    let g = if d < 0.0 {
        let g1p = axpy(g1, -d / (dot(g2, g2) + EPS), g2);
        let g2p = axpy(g2, -d / (dot(g1, g1) + EPS), g1);
        axpy(&g1p, 1.0, &g2p)
    } else {
        plain_sum.clone()
    };
    let n = norm(&g);
    if mode == Surgery::Ags && n > 0.0 {
        let scale = norm(&plain_sum) / (n + EPS);
        g.iter().map(|v| v * scale).collect()
    } else {
        g
    }
}

/// `alpha g1 + beta g2` in f64.
fn apply(c: &Combination, g1: &[f64], g2: &[f64]) -> Vec<f64> {
    g1.iter()
        .zip(g2)
        .map(|(x, y)| c.alpha * x + c.beta * y)
        .collect()
}

fn dist(x: &[f64], y: &[f64]) -> f64 {
    norm(&axpy(x, -1.0, y))
}

fn assert_finite(c: &Combination) {
    for (what, v) in [
        ("alpha", c.alpha),
        ("beta", c.beta),
        ("cosine", c.cosine),
        ("norm_g1", c.norm_g1),
        ("norm_g2", c.norm_g2),
        ("norm_sum", c.norm_sum),
        ("norm_combined", c.norm_combined),
    ] {
        assert!(v.is_finite(), "{what} is {v} in {c:?}");
    }
}

/// Checks one combination against the reference for every mode: the vector, the logged
/// norms and cosine, and the projection properties when the gradients conflict.
fn check_all_modes(g1: &[f64], g2: &[f64], tol: f64) {
    let scale = norm(g1) + norm(g2);
    let d = dot(g1, g2);
    for mode in MODES {
        let c = mode.combine(dots_of(g1, g2));
        assert_finite(&c);
        let got = apply(&c, g1, g2);
        let want = reference(mode, g1, g2);
        assert!(
            dist(&got, &want) <= tol * scale,
            "{mode}: alpha g1 + beta g2 is {} away from the reference (|g1|+|g2| = {scale}), {c:?}",
            dist(&got, &want)
        );
        assert!(
            (c.norm_combined - norm(&got)).abs() <= tol * scale,
            "{mode}: norm_combined {} but |alpha g1 + beta g2| = {}",
            c.norm_combined,
            norm(&got)
        );
        assert!((c.norm_g1 - norm(g1)).abs() <= 1e-12 * scale);
        assert!((c.norm_g2 - norm(g2)).abs() <= 1e-12 * scale);
        assert!((c.norm_sum - norm(&axpy(g1, 1.0, g2))).abs() <= 1e-9 * scale);
        let want_cos = if norm(g1) > 0.0 && norm(g2) > 0.0 {
            d / (norm(g1) * norm(g2))
        } else {
            0.0
        };
        assert!((c.cosine - want_cos).abs() <= 1e-12, "{mode}: {c:?}");
        assert_eq!(c.fired, mode != Surgery::None && d < 0.0, "{mode}: {c:?}");
        if mode == Surgery::None {
            assert_eq!((c.alpha, c.beta), (1.0, 1.0), "plain sum: {c:?}");
        }
        if c.fired {
            // The combined gradient conflicts with neither task any more (two-task PCGrad:
            // g.g1 = |g1|^2 - d^2/|g2|^2 >= 0, and likewise for g2), up to the method's eps,
            // which leaves g1'.g2 = d eps/(|g2|^2 + eps) (and g2'.g1 likewise).
            let (a, b) = (dot(g1, g1), dot(g2, g2));
            let rescale = (c.alpha / (1.0 - d / (a + EPS))).abs();
            let slack = 1e-9 * scale * scale + rescale * d.abs() * EPS / (a.min(b) + EPS);
            assert!(dot(&got, g1) >= -slack, "{mode}: g.g1 = {}", dot(&got, g1));
            assert!(dot(&got, g2) >= -slack, "{mode}: g.g2 = {}", dot(&got, g2));
        }
        if mode == Surgery::Ags && norm(&want) > 0.0 {
            assert!(
                (norm(&got) - norm(&axpy(g1, 1.0, g2))).abs() <= 1e-8 * scale,
                "AGS must restore |g1 + g2|: {c:?}"
            );
        }
    }
    // PCGrad's coefficients are exactly the projections: alpha = 1 - c2, beta = 1 - c1, so
    // g1' = g1 - (1 - beta) g2 is orthogonal to g2 and g2' = g2 - (1 - alpha) g1 to g1.
    let pc = Surgery::Pcgrad.combine(dots_of(g1, g2));
    let ags = Surgery::Ags.combine(dots_of(g1, g2));
    if pc.fired {
        let g1p = axpy(g1, -(1.0 - pc.beta), g2);
        let g2p = axpy(g2, -(1.0 - pc.alpha), g1);
        let (d, a, b) = (dot(g1, g2), dot(g1, g1), dot(g2, g2));
        let tol = 1e-9 * scale * scale;
        let (r1, r2) = (dot(&g1p, g2), dot(&g2p, g1));
        assert!((r1 - d * EPS / (b + EPS)).abs() <= tol, "g1'.g2 = {r1}");
        assert!((r2 - d * EPS / (a + EPS)).abs() <= tol, "g2'.g1 = {r2}");
        // A conflict (c1, c2 < 0) makes both coefficients grow.
        assert!(pc.beta > 1.0 && pc.alpha > 1.0);
    } else {
        assert_eq!(
            (pc.alpha, pc.beta),
            (1.0, 1.0),
            "no conflict, no projection"
        );
    }
    // AGS points where PCGrad points (same ratio of coefficients).
    if pc.norm_combined > 1e-6 * scale {
        assert!(
            (ags.alpha * pc.beta - ags.beta * pc.alpha).abs()
                <= 1e-9 * (ags.alpha.abs() + ags.beta.abs()) * (pc.alpha + pc.beta),
            "AGS and PCGrad directions differ: {ags:?} {pc:?}"
        );
    }
    // Task order does not matter: swapping the tasks swaps the coefficients.
    for mode in MODES {
        let (c, s) = (mode.combine(dots_of(g1, g2)), mode.combine(dots_of(g2, g1)));
        assert!(
            (c.alpha - s.beta).abs() <= 1e-12 * c.alpha.abs().max(1.0)
                && (c.beta - s.alpha).abs() <= 1e-12 * c.beta.abs().max(1.0),
            "{mode}: {c:?} vs swapped {s:?}"
        );
        assert_eq!(c.fired, s.fired);
    }
}

fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn aligned_gradients_are_not_projected() {
    let g1 = [1.0, 2.0, -0.5, 0.25];
    let g2 = [0.5, 1.5, 0.5, -1.0];
    assert!(dot(&g1, &g2) > 0.0);
    check_all_modes(&g1, &g2, 1e-12);
    let ags = Surgery::Ags.combine(dots_of(&g1, &g2));
    assert!(!ags.fired);
    // Only the epsilon of the rescale separates AGS from the plain sum here.
    assert!((ags.alpha - 1.0).abs() < 1e-9 && (ags.beta - 1.0).abs() < 1e-9);
    assert_eq!(ags.alpha, ags.beta);
    let pc = Surgery::Pcgrad.combine(dots_of(&g1, &g2));
    assert_eq!((pc.alpha, pc.beta, pc.fired), (1.0, 1.0, false));
}

#[test]
fn opposed_gradients_are_projected() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for k in [0.1, 0.5, 1.0, 3.0] {
        // g2 = -k g1 plus random noise: a conflict of varying strength.
        let g1 = random_vec(&mut rng, 64);
        let noise = random_vec(&mut rng, 64);
        let g2 = axpy(&noise, -k, &g1);
        assert!(dot(&g1, &g2) < 0.0);
        check_all_modes(&g1, &g2, 1e-10);
        let ags = Surgery::Ags.combine(dots_of(&g1, &g2));
        assert!(ags.fired && ags.cosine < 0.0);
    }
    // A 2-d case by hand: g1 = (1, 0), g2 = (-1, 1): d = -1, a = 1, b = 2.
    // g1' = g1 + g2/2 = (1/2, 1/2), g2' = g2 + g1 = (0, 1), g = (1/2, 3/2),
    // |g1 + g2| = 1 so AGS gives g / |g| = (1, 3)/sqrt(10).
    let (g1, g2) = ([1.0, 0.0], [-1.0, 1.0]);
    let pc = apply(&Surgery::Pcgrad.combine(dots_of(&g1, &g2)), &g1, &g2);
    assert!(dist(&pc, &[0.5, 1.5]) < 1e-9, "{pc:?}");
    let ags = apply(&Surgery::Ags.combine(dots_of(&g1, &g2)), &g1, &g2);
    let s = 10f64.sqrt();
    assert!(dist(&ags, &[1.0 / s, 3.0 / s]) < 1e-9, "{ags:?}");
    check_all_modes(&g1, &g2, 1e-12);
}

#[test]
fn orthogonal_gradients_are_not_projected() {
    // Disjoint supports: g1.g2 is exactly zero, in f64 and through the engine's f32 pass.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 1001;
    // Nonzero on alternate entries: g1 on the even ones, g2 on the odd ones.
    let [g1, g2]: [Vec<f64>; 2] = [0, 1].map(|parity| {
        (0..n)
            .map(|i| match i % 2 == parity {
                true => rng.random_range(-1.0..1.0),
                false => 0.0,
            })
            .collect()
    });
    let (g1, g2) = (to_f64(&to_f32(&g1)), to_f64(&to_f32(&g2)));
    let dots = CpuEngine.grad_dots(&to_f32(&g1), &to_f32(&g2)).unwrap();
    assert_eq!(dots.g1g2, 0.0);
    for mode in MODES {
        let c = mode.combine(dots);
        assert!(!c.fired, "{mode}: {c:?}");
        assert_eq!(c.cosine, 0.0);
        assert!((c.alpha - 1.0).abs() < 1e-9 && (c.beta - 1.0).abs() < 1e-9);
    }
    check_all_modes(&g1, &g2, 1e-12);
}

#[test]
fn exactly_antiparallel_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for k in [1.0f32, 0.5, 2.0, 3.0, 0.3] {
        let g1: Vec<f32> = (0..1000).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g2: Vec<f32> = g1.iter().map(|v| -k * v).collect();
        let (x, y) = (to_f64(&g1), to_f64(&g2));
        let scale = norm(&x) + norm(&y);
        let dots = CpuEngine.grad_dots(&g1, &g2).unwrap();
        for mode in MODES {
            let c = mode.combine(dots);
            assert_finite(&c);
            assert!((c.cosine + 1.0).abs() < 1e-6, "k {k} {mode}: {c:?}");
            assert_eq!(c.fired, mode != Surgery::None);
            // What is logged is what is applied, and it is never longer than |g1 + g2|,
            // also through the engine's f32 pass.
            let mut out = vec![0.0f32; g1.len()];
            CpuEngine
                .combine_grads((c.alpha as f32, c.beta as f32), &g1, &g2, &mut out)
                .unwrap();
            let applied = norm(&to_f64(&out));
            assert!(
                applied <= c.norm_sum.max(c.norm_combined) + 1e-5 * scale,
                "k {k} {mode}: the applied gradient has norm {applied}, |g1 + g2| = {}, {c:?}",
                c.norm_sum
            );
            assert!(
                (applied - c.norm_combined).abs() <= 1e-5 * scale,
                "k {k} {mode}: logs |g| = {} but applies a gradient of norm {applied}, {c:?}",
                c.norm_combined
            );
            if mode == Surgery::Pcgrad {
                // Each task projected off the other leaves nothing.
                assert!(applied <= 1e-5 * scale, "k {k}: {applied}, {c:?}");
            }
        }
    }
}

#[test]
fn one_zero_gradient() {
    let g1 = [0.5, -1.0, 2.0, 0.0, 3.0];
    let zero = [0.0; 5];
    for (a, b) in [(&g1, &zero), (&zero, &g1)] {
        for mode in MODES {
            let c = mode.combine(dots_of(a, b));
            assert_finite(&c);
            assert!(!c.fired, "{mode}: {c:?}");
            assert_eq!(c.cosine, 0.0);
            // Nothing is projected off the non-zero gradient.
            let got = apply(&c, a, b);
            assert!(dist(&got, &g1) < 1e-9, "{mode}: {got:?}");
        }
        check_all_modes(a, b, 1e-12);
    }
}

#[test]
fn both_gradients_zero() {
    let zero = [0.0; 7];
    for mode in MODES {
        let c = mode.combine(dots_of(&zero, &zero));
        assert_finite(&c);
        assert!(!c.fired);
        assert_eq!(
            (c.cosine, c.norm_g1, c.norm_g2, c.norm_sum, c.norm_combined),
            (0.0, 0.0, 0.0, 0.0, 0.0)
        );
    }
    let c = Surgery::Ags.combine(GradDots::default());
    assert_finite(&c);
    let mut out = vec![1.0f32; 7];
    CpuEngine
        .combine_grads(
            (c.alpha as f32, c.beta as f32),
            &[0.0; 7],
            &[0.0; 7],
            &mut out,
        )
        .unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn random_high_dimensional_cases() {
    let dim = 20_000;
    for seed in 0..8u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        let g1 = random_vec(&mut rng, dim);
        let noise = random_vec(&mut rng, dim);
        // Half the seeds conflict (g2 leans against g1), half agree; scales differ.
        let lean = if seed % 2 == 0 { -0.8 } else { 0.6 };
        let size = [1e-3, 1.0, 50.0, 1e-6][(seed / 2) as usize];
        let g2: Vec<f64> = axpy(&noise, lean, &g1).iter().map(|v| v * size).collect();
        assert_eq!(dot(&g1, &g2) < 0.0, seed % 2 == 0);
        check_all_modes(&g1, &g2, 1e-9);

        // The same through the engine: f32 buffers, grad_dots, combine_grads.
        let (g1f, g2f) = (to_f32(&g1), to_f32(&g2));
        let (x, y) = (to_f64(&g1f), to_f64(&g2f));
        let dots = CpuEngine.grad_dots(&g1f, &g2f).unwrap();
        for mode in MODES {
            let c = mode.combine(dots);
            let mut out = vec![0.0f32; dim];
            CpuEngine
                .combine_grads((c.alpha as f32, c.beta as f32), &g1f, &g2f, &mut out)
                .unwrap();
            let want = reference(mode, &x, &y);
            let err = dist(&to_f64(&out), &want);
            assert!(
                err <= 1e-6 * norm(&want),
                "seed {seed} {mode}: engine result off by {err} (|g| = {})",
                norm(&want)
            );
            assert!((c.norm_combined - norm(&want)).abs() <= 1e-9 * norm(&want));
        }
    }
}

/// Neumaier's compensated sum: accurate to about one f64 rounding of the result.
fn accurate_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        comp += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    sum + comp
}

/// `grad_dots` the naive way (products of f32 values are exact in f64), and the sums of
/// the absolute terms that bound the rounding error of any f64 summation order.
fn naive_dots(g1: &[f32], g2: &[f32]) -> (GradDots, [f64; 3]) {
    let pairs = || g1.iter().zip(g2).map(|(&x, &y)| (x as f64, y as f64));
    let dots = GradDots {
        g1g2: accurate_sum(pairs().map(|(x, y)| x * y)),
        g1g1: accurate_sum(pairs().map(|(x, _)| x * x)),
        g2g2: accurate_sum(pairs().map(|(_, y)| y * y)),
    };
    let abs = [
        pairs().map(|(x, y)| (x * y).abs()).sum(),
        dots.g1g1,
        dots.g2g2,
    ];
    (dots, abs)
}

#[test]
fn grad_dots_matches_a_naive_loop_and_ignores_the_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for len in [1usize, 7, 33_000, 100_003] {
        let g1: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0..2.0)).collect();
        let g2: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..3.0)).collect();
        let got = CpuEngine.grad_dots(&g1, &g2).unwrap();
        let (want, abs) = naive_dots(&g1, &g2);
        for (what, got, want, abs) in [
            ("g1.g2", got.g1g2, want.g1g2, abs[0]),
            ("|g1|^2", got.g1g1, want.g1g1, abs[1]),
            ("|g2|^2", got.g2g2, want.g2g2, abs[2]),
        ] {
            assert!(
                // A worst-case bound for f64 sums of up to ~10^4 terms per accumulator.
                (got - want).abs() <= 2e-12 * abs,
                "len {len}: {what} = {got}, naive loop {want}"
            );
        }
        let one = in_pool(1, || CpuEngine.grad_dots(&g1, &g2).unwrap());
        let two = in_pool(2, || CpuEngine.grad_dots(&g1, &g2).unwrap());
        let three = in_pool(3, || CpuEngine.grad_dots(&g1, &g2).unwrap());
        for other in [two, three, got] {
            assert_eq!(one.g1g2.to_bits(), other.g1g2.to_bits(), "len {len}");
            assert_eq!(one.g1g1.to_bits(), other.g1g1.to_bits(), "len {len}");
            assert_eq!(one.g2g2.to_bits(), other.g2g2.to_bits(), "len {len}");
        }
    }
}

#[test]
fn combine_grads_is_the_elementwise_combination() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let len = 70_001; // several of the engine's chunks and a ragged end
    let g1: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    let g2: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (alpha, beta) = (1.75f32, -0.375f32);
    let mut out = vec![f32::NAN; len];
    in_pool(2, || {
        CpuEngine
            .combine_grads((alpha, beta), &g1, &g2, &mut out)
            .unwrap()
    });
    for i in 0..len {
        let want = alpha as f64 * g1[i] as f64 + beta as f64 * g2[i] as f64;
        assert!(
            (out[i] as f64 - want).abs() <= 2e-7 * (g1[i].abs() * 1.75 + g2[i].abs()) as f64,
            "element {i}: {} vs {want}",
            out[i]
        );
    }
    // Mismatched lengths are an error, not a panic.
    assert!(
        CpuEngine
            .combine_grads((1.0, 1.0), &g1, &g2[1..], &mut out)
            .is_err()
    );
    assert!(CpuEngine.grad_dots(&g1, &g2[1..]).is_err());
}

/// The task weights: the surgery of `StepConfig::combine` acts on `l1 g1` and `l2 g2`, and its
/// coefficients applied to the raw gradients give the same vector as the surgery applied to
/// the weighted vectors themselves, for every mode, conflicting or not.
#[test]
fn task_weights_scale_the_gradients_before_the_surgery() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for case in 0..40 {
        let g1 = random_vec(&mut rng, 50);
        let g2 = random_vec(&mut rng, 50);
        let (l1, l2) = (
            rng.random_range(0.01..3.0f32),
            rng.random_range(0.01..3.0f32),
        );
        for mode in MODES {
            let cfg = StepConfig {
                surgery: mode,
                contrastive_weight: l1,
                cohesion_weight: l2,
                ..StepConfig::default()
            };
            let got = apply(&cfg.combine(dots_of(&g1, &g2)), &g1, &g2);
            let w1: Vec<f64> = g1.iter().map(|v| v * l1 as f64).collect();
            let w2: Vec<f64> = g2.iter().map(|v| v * l2 as f64).collect();
            let want = reference(mode, &w1, &w2);
            assert!(
                dist(&got, &want) <= 1e-12 * norm(&want),
                "case {case}, {mode}, weights ({l1}, {l2}): off by {}",
                dist(&got, &want)
            );
        }
    }
}

/// Through a whole training step: with no surgery the combined gradient is exactly
/// `l1 g1 + l2 g2` of the step's own task gradients, a zero weight removes its task, the
/// reported weighted loss is `l1 L1 + l2 L2`, and weights of 1 change no bit.
#[test]
fn task_weights_reach_the_update() {
    let config = common::net(4, [1, 1, 1, 1], 8);
    let state = ModelState::init(config, 5).unwrap();
    let host = HostBatch::random(4, 4, 16, 6);
    let eng = CpuEngine;
    let batch = StepBatch::upload(&eng, &host).unwrap();
    let step = |cfg: StepConfig| {
        let mut trainer = Trainer::new(&eng, &state).unwrap();
        let mut combined = vec![f32::NAN; trainer.net.param_len()];
        let report = in_pool(2, || {
            trainer
                .step(&eng, &batch, &cfg, 0.01, Some(&mut combined))
                .unwrap()
        });
        (
            report,
            trainer.g1.clone(),
            trainer.g2.clone(),
            combined,
            trainer.params,
        )
    };
    let plain = StepConfig {
        surgery: Surgery::None,
        ..StepConfig::default()
    };
    let (l1, l2) = (0.5f32, 0.1f32);
    let (report, g1, g2, combined, _) = step(StepConfig {
        contrastive_weight: l1,
        cohesion_weight: l2,
        ..plain
    });
    for i in 0..g1.len() {
        assert_eq!(combined[i], l1 * g1[i] + l2 * g2[i], "element {i}");
    }
    let want = l1 * report.loss_contrastive + l2 * report.loss_cohesion;
    assert_eq!(report.loss, want);

    let (_, g1, _, combined, _) = step(StepConfig {
        cohesion_weight: 0.0,
        ..plain
    });
    assert_eq!(combined, g1, "a zero cohesion weight leaves g1 alone");

    let reference = step(StepConfig::default());
    let ones = step(StepConfig {
        contrastive_weight: 1.0,
        cohesion_weight: 1.0,
        ..StepConfig::default()
    });
    assert_eq!(reference.3, ones.3);
    assert_eq!(reference.4, ones.4);
}

#[test]
fn bad_task_weights_are_refused_by_name() {
    for (cfg, name) in [
        (
            StepConfig {
                cohesion_weight: -0.1,
                ..StepConfig::default()
            },
            "cohesion_weight",
        ),
        (
            StepConfig {
                contrastive_weight: f32::NAN,
                ..StepConfig::default()
            },
            "contrastive_weight",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}
