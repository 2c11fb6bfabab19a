//! The optimizer: the fused surgery + SGD pass of the CPU engine against PyTorch's SGD
//! written out in f64, and the warmup + cosine learning-rate schedule against its formula.
//!
//! PyTorch's SGD with momentum `mu` and weight decay `wd` on the combined gradient
//! `g = alpha g1 + beta g2`: `d = g + wd p`; `buf = d` on the first step, `buf = mu buf + d`
//! after; `p -= lr buf`. The schedule: `lr (e+1)/W` for `e < W`, then
//! `lr/2 (1 + cos(pi (e-W)/(E-W)))`.

mod common;

use common::in_pool;
use common::metrics::max_error_over_mean_magnitude;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{GradDots, SgdBuffers, SgdUpdate};
use slam_ags::model::StepConfig;
use slam_ags::model::Surgery;
use slam_ags::model::optim::Schedule;

fn random_vec(rng: &mut ChaCha8Rng, len: usize, range: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-range..range)).collect()
}

/// PyTorch's `SGD.step` in f64 on the combined gradient; `buf` is `None` before step one.
struct ReferenceSgd {
    params: Vec<f64>,
    buf: Option<Vec<f64>>,
}

impl ReferenceSgd {
    fn step(&mut self, u: &SgdUpdate, g1: &[f32], g2: &[f32]) {
        let (alpha, beta) = (u.alpha as f64, u.beta as f64);
        let (mu, wd, lr) = (u.momentum as f64, u.weight_decay as f64, u.lr as f64);
        let d: Vec<f64> = self
            .params
            .iter()
            .zip(g1.iter().zip(g2))
            .map(|(&p, (&x, &y))| alpha * x as f64 + beta * y as f64 + wd * p)
            .collect();
        let buf = match self.buf.take() {
            None => d,
            Some(buf) => buf.iter().zip(&d).map(|(b, d)| mu * b + d).collect(),
        };
        for (p, b) in self.params.iter_mut().zip(&buf) {
            *p -= lr * b;
        }
        self.buf = Some(buf);
    }
}

/// Parameters of scale `param_scale` and two gradients of scale 1, `len` values each.
fn random_buffers(seed: u64, len: usize, param_scale: f32) -> [Vec<f32>; 3] {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    [param_scale, 1.0, 1.0].map(|scale| random_vec(&mut rng, len, scale))
}

/// An update with momentum 0.9 (the reference's).
fn with_momentum_09((alpha, beta): (f32, f32), lr: f32, weight_decay: f32) -> SgdUpdate {
    SgdUpdate {
        alpha,
        beta,
        lr,
        momentum: 0.9,
        weight_decay,
    }
}

/// The engine's fused update on host slices.
fn sgd_step(
    u: &SgdUpdate,
    g1: &[f32],
    g2: &[f32],
    params: &mut [f32],
    momentum: &mut [f32],
) -> anyhow::Result<()> {
    let buffers = SgdBuffers {
        g1,
        g2,
        params,
        momentum,
    };
    CpuEngine.sgd_step(u, buffers)
}

#[test]
fn sgd_step_matches_pytorch_sgd_over_several_steps() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let len = 70_003; // several of the engine's chunks and a ragged end
    for (momentum, weight_decay) in [(0.9f32, 1e-4f32), (0.5, 0.05), (0.0, 0.0), (0.9, 0.0)] {
        let mut params = random_vec(&mut rng, len, 1.0);
        let mut buf = vec![0.0f32; len];
        let mut reference = ReferenceSgd {
            params: params.iter().map(|&v| v as f64).collect(),
            buf: None,
        };
        let steps = [
            (1.0f32, 1.0f32, 0.1f32),
            (1.3, 0.7, 0.05),
            (2.0, 0.0, 1e-3),
            (0.4, 1.9, 0.02),
            (1.0, 1.0, 0.3),
        ];
        for (step, &(alpha, beta, lr)) in steps.iter().enumerate() {
            let g1 = random_vec(&mut rng, len, 1.0);
            let g2 = random_vec(&mut rng, len, 0.5);
            let u = SgdUpdate {
                alpha,
                beta,
                lr,
                momentum,
                weight_decay,
            };
            sgd_step(&u, &g1, &g2, &mut params, &mut buf).unwrap();
            reference.step(&u, &g1, &g2);
            let (p_err, b_err) = (
                max_error_over_mean_magnitude(&params, &reference.params),
                max_error_over_mean_magnitude(&buf, reference.buf.as_ref().unwrap()),
            );
            assert!(
                p_err < 2e-6 && b_err < 2e-6,
                "mu {momentum} wd {weight_decay} step {step}: parameters off by {p_err}, \
                 momentum by {b_err}"
            );
        }
    }
}

#[test]
fn first_step_from_zero_momentum_is_buf_equals_d_exactly() {
    let len = 40_000;
    let [params, g1, g2] = random_buffers(2, len, 2.0);
    let u = with_momentum_09((1.37, 0.61), 0.01, 1e-4);
    let mut p = params.clone();
    let mut buf = vec![0.0f32; len];
    sgd_step(&u, &g1, &g2, &mut p, &mut buf).unwrap();
    for i in 0..len {
        // PyTorch's first step clones d into the buffer: no momentum term at all.
        let d = (u.alpha * g1[i] + u.beta * g2[i]) + u.weight_decay * params[i];
        assert_eq!(buf[i].to_bits(), d.to_bits(), "element {i}");
        assert_eq!(
            p[i].to_bits(),
            (params[i] - u.lr * d).to_bits(),
            "element {i}"
        );
    }
}

#[test]
fn sgd_step_ignores_the_thread_count_and_checks_lengths() {
    let len = 100_003;
    let [params, g1, g2] = random_buffers(3, len, 1.0);
    let u = with_momentum_09((0.8, 1.1), 0.05, 1e-3);
    let run = |threads: usize| {
        let (mut p, mut m) = (params.clone(), vec![0.5f32; len]);
        in_pool(threads, || {
            for _ in 0..3 {
                sgd_step(&u, &g1, &g2, &mut p, &mut m).unwrap();
            }
        });
        (p, m)
    };
    let (one, two) = (run(1), run(2));
    assert!(
        one.0
            .iter()
            .zip(&two.0)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        one.1
            .iter()
            .zip(&two.1)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert_ne!(one.0, params);

    let (mut p, mut m) = (params.clone(), vec![0.0f32; len]);
    assert!(sgd_step(&u, &g1[1..], &g2, &mut p, &mut m).is_err());
    assert!(sgd_step(&u, &g1, &g2[1..], &mut p, &mut m).is_err());
    assert!(sgd_step(&u, &g1, &g2, &mut p, &mut m[1..]).is_err());
    assert_eq!(p, params, "a rejected step must not touch the parameters");
}

#[test]
fn sgd_defaults_and_update_carry_the_combination() {
    let sgd = StepConfig::default();
    assert_eq!(
        (sgd.lr, sgd.momentum, sgd.weight_decay),
        (1e-3, 0.9, 1e-4),
        "the reference defaults"
    );
    let c = Surgery::Ags.combine(GradDots {
        g1g2: -3.0,
        g1g1: 4.0,
        g2g2: 9.0,
    });
    assert!(c.fired);
    let u = sgd.update(2.5e-4, &c);
    assert_eq!(u.alpha, c.alpha as f32);
    assert_eq!(u.beta, c.beta as f32);
    assert_eq!(u.lr, 2.5e-4f32);
    assert_eq!((u.momentum, u.weight_decay), (0.9, 1e-4));
}

/// The schedule written out.
fn schedule_formula(base: f64, w: u32, e_total: u32, e: u32) -> f64 {
    if e < w {
        base * (e + 1) as f64 / w as f64
    } else {
        let progress = (e - w) as f64 / (e_total - w) as f64;
        base / 2.0 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[test]
fn schedule_warms_up_then_decays_by_cosine() {
    for (base, w, total) in [
        (1e-3, 10u32, 150u32),
        (0.3, 3, 20),
        (0.05, 1, 9),
        (2.0, 4, 104),
    ] {
        let s = Schedule {
            base_lr: base,
            warmup_epochs: w,
            epochs: total,
        };
        for e in 0..total {
            let want = schedule_formula(base, w, total, e);
            assert!(
                (s.lr(e) - want).abs() <= 1e-14 * base,
                "{s:?} epoch {e}: {} vs {want}",
                s.lr(e)
            );
        }
        // Warmup climbs linearly to the base rate...
        for e in 0..w {
            assert!((s.lr(e) - base * (e + 1) as f64 / w as f64).abs() <= 1e-15 * base);
        }
        // ...the first cosine epoch is the base rate, the middle one half of it...
        assert!((s.lr(w) - base).abs() <= 1e-15 * base, "{s:?}");
        if (total - w) % 2 == 0 {
            let mid = w + (total - w) / 2;
            assert!((s.lr(mid) - base / 2.0).abs() <= 1e-12 * base, "{s:?}");
        }
        // ...then it decreases every epoch and never reaches zero.
        for e in w..total - 1 {
            assert!(s.lr(e + 1) < s.lr(e), "{s:?} epoch {e}");
        }
        assert!(s.lr(total - 1) > 0.0, "{s:?}");
        assert!(s.lr(total - 1) < base / 2.0, "{s:?}");
    }
}

#[test]
fn schedule_reference_defaults() {
    let s = Schedule {
        base_lr: 1e-3,
        warmup_epochs: 10,
        epochs: 150,
    };
    let pi = std::f64::consts::PI;
    let spots = [
        (0, 1e-4),
        (4, 5e-4),
        (9, 1e-3),
        (10, 1e-3),
        // a quarter of the way through the cosine: (1 + cos(pi/4)) / 2
        (45, 1e-3 * (2.0 + 2f64.sqrt()) / 4.0),
        (80, 5e-4),
        // three quarters: (1 - cos(pi/4)) / 2
        (115, 1e-3 * (2.0 - 2f64.sqrt()) / 4.0),
        (149, 5e-4 * (1.0 + (pi * 139.0 / 140.0).cos())),
    ];
    for (e, want) in spots {
        assert!(
            (s.lr(e) - want).abs() <= 1e-15,
            "epoch {e}: {} vs {want}",
            s.lr(e)
        );
    }
    // The last epoch's rate is tiny but positive (about 1.26e-7).
    assert!(s.lr(149) > 1e-7 && s.lr(149) < 2e-7);
}

#[test]
fn schedule_without_warmup() {
    let s = Schedule {
        base_lr: 0.1,
        warmup_epochs: 0,
        epochs: 10,
    };
    assert_eq!(s.lr(0), 0.1);
    assert!((s.lr(5) - 0.05).abs() < 1e-15);
    for e in 0..10 {
        assert!(s.lr(e).is_finite() && s.lr(e) > 0.0);
    }
}
