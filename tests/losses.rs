//! The two task losses of the CPU engine against closed forms and explicit f64 computations.
//!
//! `CpuEngine::ntxent` and `CpuEngine::cohesion` take two views `z_i`, `z_j` of `n` samples,
//! feature-major (`z[k * n + a]` is feature `k` of sample `a`), and return the loss with its
//! gradients. Here the `2n` rows are built explicitly, and the losses are recomputed the
//! long way in f64 (every pair of rows, `f = z / max(|z|, 1e-12)`): closed forms for
//! identical, orthogonal and duplicated rows, a two-sample case in angles, invariance under
//! scaling, the gradient's orthogonality to `z`, the cohesion gradient formula, finite
//! differences of the explicit losses, and the temperature scaling of cohesion.

mod common;

use common::reference::{self, Rows, dot, norm, normalized};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{LossViews, ViewPair};

const T_REF: f64 = 0.07;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    NtXent,
    Cohesion,
}

impl Loss {
    /// The CPU engine's loss of views `z` into gradients `dz`.
    fn on_cpu(
        self,
        s: &ViewPair,
        t: f32,
        [z_i, z_j]: [&[f32]; 2],
        [dz_i, dz_j]: [&mut [f32]; 2],
    ) -> anyhow::Result<f32> {
        let views = LossViews {
            z_i,
            z_j,
            dz_i,
            dz_j,
        };
        match self {
            Loss::NtXent => CpuEngine.ntxent(s, t, views),
            Loss::Cohesion => CpuEngine.cohesion(s, t, views),
        }
    }
}

/// Runs the engine on `2n` rows (`rows[..n]` are view i, `rows[n..]` view j) given in f64
/// (rounded to f32 on the way in). Returns the loss and the gradient as rows.
fn engine_loss(loss: Loss, rows: &Rows, t: f64) -> (f64, Rows) {
    let (m, dim) = (rows.len(), rows[0].len());
    assert!(m % 2 == 0);
    let n = m / 2;
    let pack = |rows: &[Vec<f64>]| -> Vec<f32> {
        let mut z = vec![0.0f32; dim * n];
        for (a, row) in rows.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                z[k * n + a] = v as f32;
            }
        }
        z
    };
    let (z_i, z_j) = (pack(&rows[..n]), pack(&rows[n..]));
    let (mut dz_i, mut dz_j) = (vec![f32::NAN; dim * n], vec![f32::NAN; dim * n]);
    let s = ViewPair { dim, n };
    let value = loss
        .on_cpu(&s, t as f32, [&z_i, &z_j], [&mut dz_i, &mut dz_j])
        .unwrap();
    let unpack = |dz: &[f32]| -> Rows {
        (0..n)
            .map(|a| (0..dim).map(|k| dz[k * n + a] as f64).collect())
            .collect()
    };
    let mut grad = unpack(&dz_i);
    grad.extend(unpack(&dz_j));
    (value as f64, grad)
}

/// The rows as the engine sees them (rounded to f32).
fn as_f32(rows: &Rows) -> Rows {
    rows.iter()
        .map(|r| r.iter().map(|&v| v as f32 as f64).collect())
        .collect()
}

fn explicit(loss: Loss, rows: &Rows, t: f64) -> f64 {
    match loss {
        Loss::NtXent => reference::ntxent(rows, t),
        Loss::Cohesion => reference::cohesion(rows, t),
    }
}

/// Central finite differences of the explicit loss.
fn fd_gradient(loss: Loss, rows: &Rows, t: f64) -> Rows {
    let mut grad = rows.clone();
    for a in 0..rows.len() {
        let h = 1e-6 * norm(&rows[a]);
        for k in 0..rows[a].len() {
            let mut plus = rows.clone();
            plus[a][k] += h;
            let mut minus = rows.clone();
            minus[a][k] -= h;
            grad[a][k] = (explicit(loss, &plus, t) - explicit(loss, &minus, t)) / (2.0 * h);
        }
    }
    grad
}

fn max_abs(rows: &Rows) -> f64 {
    rows.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// Largest elementwise difference, relative to the largest entry of `want`.
fn rel_diff(got: &Rows, want: &Rows) -> f64 {
    let diff = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / max_abs(want).max(1e-300)
}

fn random_rows(rng: &mut ChaCha8Rng, m: usize, dim: usize) -> Rows {
    (0..m)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect()
}

/// `count` orthonormal rows in `dim` dimensions (Gram-Schmidt of random rows).
fn orthonormal_rows(rng: &mut ChaCha8Rng, count: usize, dim: usize) -> Rows {
    let mut out: Rows = Vec::new();
    for mut v in random_rows(rng, count, dim) {
        for _ in 0..2 {
            for u in &out {
                let c = dot(&v, u);
                v.iter_mut().zip(u).for_each(|(x, y)| *x -= c * y);
            }
        }
        let s = norm(&v);
        out.push(v.iter().map(|x| x / s).collect());
    }
    out
}

fn scaled(rows: &Rows, scales: &[f64]) -> Rows {
    rows.iter()
        .zip(scales)
        .map(|(r, s)| r.iter().map(|v| v * s).collect())
        .collect()
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-300)
}

#[test]
fn cohesion_of_identical_rows_is_zero_with_zero_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let v = random_rows(&mut rng, 1, 16).remove(0);
    for n in [1, 3, 8] {
        // Same direction, different lengths.
        let scales: Vec<f64> = (0..2 * n).map(|_| rng.random_range(0.5..4.0)).collect();
        let rows = scaled(&vec![v.clone(); 2 * n], &scales);
        let (loss, grad) = engine_loss(Loss::Cohesion, &rows, T_REF);
        assert!(loss.abs() < 1e-5, "n {n}: loss {loss}");
        // df_a = -2 (m-1) f / (m (m-1) T) is along f_a and vanishes through the norm.
        let df = 2.0 / (2 * n) as f64 / T_REF;
        for (a, g) in grad.iter().enumerate() {
            assert!(
                norm(g) * norm(&rows[a]) <= 1e-5 * df,
                "n {n}: row {a} gradient {:?}",
                g
            );
        }
    }
}

#[test]
fn cohesion_of_orthogonal_rows_is_one_over_t() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (n, dim) in [(1, 2), (3, 6), (4, 11)] {
        let m = 2 * n;
        let units = orthonormal_rows(&mut rng, m, dim);
        let lengths: Vec<f64> = (0..m).map(|_| rng.random_range(0.1..10.0)).collect();
        let rows = scaled(&units, &lengths);
        for t in [T_REF, 0.5, 1.0] {
            let (loss, grad) = engine_loss(Loss::Cohesion, &rows, t);
            assert!(close(loss, 1.0 / t, 1e-5), "n {n} T {t}: loss {loss}");
            // s - f_a is orthogonal to f_a, so dz_a = -2 (s - f_a) / (m (m-1) T |z_a|).
            let want: Rows = (0..m)
                .map(|a| {
                    (0..dim)
                        .map(|k| {
                            let others: f64 = (0..m).filter(|&b| b != a).map(|b| units[b][k]).sum();
                            -2.0 * others / ((m * (m - 1)) as f64 * t * lengths[a])
                        })
                        .collect()
                })
                .collect();
            assert!(rel_diff(&grad, &want) < 1e-5, "n {n} T {t}");
        }
    }
}

#[test]
fn ntxent_with_identical_views_of_orthogonal_samples() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, dim) in [(2, 2), (4, 6), (7, 9)] {
        let m = 2 * n;
        let units = orthonormal_rows(&mut rng, n, dim);
        let lengths: Vec<f64> = (0..n).map(|_| rng.random_range(0.2..5.0)).collect();
        let samples = scaled(&units, &lengths);
        let rows: Rows = samples.iter().chain(&samples).cloned().collect();
        for t in [T_REF, 0.2, 1.0] {
            let (loss, grad) = engine_loss(Loss::NtXent, &rows, t);
            // Each anchor sees its partner at 1/T and the 2n-2 other rows at 0.
            let z = (1.0 / t).exp() + (m - 2) as f64;
            let want_loss = -(1.0 / t - z.ln());
            assert!(
                close(loss, want_loss, 1e-4),
                "n {n} T {t}: loss {loss}, closed form {want_loss}"
            );
            // The partner's pull is along f_a and vanishes through the normalization; every
            // other row b pushes with weight (G[a,b] + G[b,a]) / T = 2 / (m Z T), so
            // dz_a = 4 / (m Z T |z_a|) * sum of the other samples' unit vectors.
            let want: Rows = (0..m)
                .map(|a| {
                    let s = a % n;
                    (0..dim)
                        .map(|k| {
                            let others: f64 = (0..n).filter(|&c| c != s).map(|c| units[c][k]).sum();
                            4.0 * others / (m as f64 * z * t * lengths[s])
                        })
                        .collect()
                })
                .collect();
            assert!(
                rel_diff(&grad, &want) < 1e-4,
                "n {n} T {t}: gradient off by {}",
                rel_diff(&grad, &want)
            );
        }
    }
}

#[test]
fn ntxent_of_one_sample_is_zero() {
    // With n = 1 each anchor's only other row is its partner: -(S - ln e^S) = 0.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..5 {
        let rows = random_rows(&mut rng, 2, 5);
        let (loss, grad) = engine_loss(Loss::NtXent, &rows, T_REF);
        assert!(loss.abs() < 1e-6, "loss {loss}");
        assert!(max_abs(&grad) < 1e-6, "gradient {grad:?}");
    }
}

#[test]
fn ntxent_two_samples_in_the_plane_by_hand() {
    // Four unit rows at angles phi_a (rows 0,1 view i of samples 0,1; rows 2,3 view j):
    // S[a,b] = cos(phi_a - phi_b) / T, and the gradient of row a is dL/dphi_a along the
    // tangent (-sin phi_a, cos phi_a), divided by |z_a|.
    let loss_of = |phi: &[f64; 4], t: f64| -> f64 {
        let s = |a: usize, b: usize| (phi[a] - phi[b]).cos() / t;
        let mut total = 0.0;
        for a in 0..4 {
            let p = (a + 2) % 4;
            let lse = (0..4)
                .filter(|&b| b != a)
                .map(|b| s(a, b).exp())
                .sum::<f64>()
                .ln();
            total += s(a, p) - lse;
        }
        -total / 4.0
    };
    let phi: [f64; 4] = [0.3, 2.0, 0.9, -1.7];
    let lengths: [f64; 4] = [1.0, 2.5, 0.4, 3.0];
    for t in [T_REF, 0.5] {
        let rows: Rows = (0..4)
            .map(|a| vec![lengths[a] * phi[a].cos(), lengths[a] * phi[a].sin()])
            .collect();
        let (loss, grad) = engine_loss(Loss::NtXent, &rows, t);
        let want = loss_of(&phi, t);
        assert!(close(loss, want, 1e-5), "T {t}: {loss} vs {want}");
        for a in 0..4 {
            let h = 1e-6;
            let (mut plus, mut minus) = (phi, phi);
            plus[a] += h;
            minus[a] -= h;
            let dphi = (loss_of(&plus, t) - loss_of(&minus, t)) / (2.0 * h);
            let want = [
                -phi[a].sin() * dphi / lengths[a],
                phi[a].cos() * dphi / lengths[a],
            ];
            let scale = dphi.abs() / lengths[a] + 1e-3;
            for k in 0..2 {
                assert!(
                    (grad[a][k] - want[k]).abs() <= 1e-4 * scale,
                    "T {t} row {a}: {:?} vs {want:?}",
                    grad[a]
                );
            }
        }
    }
}

#[test]
fn losses_match_the_explicit_pairwise_forms() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (n, dim) in [(1, 3), (2, 4), (5, 7), (16, 32)] {
        let rows = random_rows(&mut rng, 2 * n, dim);
        for loss in [Loss::NtXent, Loss::Cohesion] {
            for t in [T_REF, 0.5] {
                let (got, _) = engine_loss(loss, &rows, t);
                let want = explicit(loss, &as_f32(&rows), t);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{loss:?} n {n} T {t}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences_of_the_explicit_losses() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (n, dim) in [(2, 3), (3, 5), (4, 8)] {
        let rows = as_f32(&random_rows(&mut rng, 2 * n, dim));
        for loss in [Loss::NtXent, Loss::Cohesion] {
            for t in [T_REF, 0.5] {
                let (_, grad) = engine_loss(loss, &rows, t);
                let fd = fd_gradient(loss, &rows, t);
                let err = rel_diff(&grad, &fd);
                assert!(err < 1e-4, "{loss:?} n {n} T {t}: off by {err}");
            }
        }
    }
}

#[test]
fn cohesion_gradient_formula_explicitly() {
    // df_a = -2 (s - f_a) / (m (m-1) T), then dz_a = (df_a - f_a (f_a . df_a)) / |z_a|.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, dim, t) = (3, 5, 0.2);
    let m = 2 * n;
    let rows = as_f32(&random_rows(&mut rng, m, dim));
    let f = normalized(&rows);
    let s: Vec<f64> = (0..dim).map(|k| f.iter().map(|r| r[k]).sum()).collect();
    let want: Rows = (0..m)
        .map(|a| {
            let df: Vec<f64> = (0..dim)
                .map(|k| -2.0 * (s[k] - f[a][k]) / ((m * (m - 1)) as f64 * t))
                .collect();
            let along = dot(&f[a], &df);
            (0..dim)
                .map(|k| (df[k] - f[a][k] * along) / norm(&rows[a]))
                .collect()
        })
        .collect();
    let (loss, grad) = engine_loss(Loss::Cohesion, &rows, t);
    assert!(rel_diff(&grad, &want) < 1e-5);
    // And the closed form of the loss through s: (1 - (|s|^2 - m) / (m (m-1))) / T.
    let want_loss = (1.0 - (dot(&s, &s) - m as f64) / (m * (m - 1)) as f64) / t;
    assert!(close(loss, want_loss, 1e-5), "{loss} vs {want_loss}");
}

#[test]
fn losses_are_invariant_under_scaling_each_sample() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (n, dim) = (6, 10);
    let rows = as_f32(&random_rows(&mut rng, 2 * n, dim));
    for loss in [Loss::NtXent, Loss::Cohesion] {
        let (l0, g0) = engine_loss(loss, &rows, T_REF);
        for uniform in [Some(0.01), Some(37.0), None] {
            let scales: Vec<f64> = (0..2 * n)
                .map(|_| uniform.unwrap_or_else(|| rng.random_range(0.05..20.0)))
                .collect();
            let (l1, g1) = engine_loss(loss, &scaled(&rows, &scales), T_REF);
            assert!(close(l1, l0, 1e-5), "{loss:?} {uniform:?}: {l1} vs {l0}");
            // The loss of s z is the loss of z, so dz(s z) = dz(z) / s: s dz(s z) = dz(z).
            let err = rel_diff(&scaled(&g1, &scales), &g0);
            assert!(err < 1e-4, "{loss:?} {uniform:?}: gradients off by {err}");
        }
    }
}

#[test]
fn gradients_are_orthogonal_to_each_sample() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (n, dim) in [(2, 3), (8, 16), (32, 64)] {
        let rows = as_f32(&random_rows(&mut rng, 2 * n, dim));
        for loss in [Loss::NtXent, Loss::Cohesion] {
            let (_, grad) = engine_loss(loss, &rows, T_REF);
            for (a, (z, g)) in rows.iter().zip(&grad).enumerate() {
                assert!(norm(g) > 0.0, "{loss:?} row {a}: zero gradient");
                assert!(
                    dot(z, g).abs() <= 1e-5 * norm(z) * norm(g),
                    "{loss:?} n {n} row {a}: z.dz = {} (|z| {}, |dz| {})",
                    dot(z, g),
                    norm(z),
                    norm(g)
                );
            }
        }
    }
}

#[test]
fn cohesion_times_temperature_is_constant() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let rows = as_f32(&random_rows(&mut rng, 10, 7));
    let (l_ref, g_ref) = engine_loss(Loss::Cohesion, &rows, 1.0);
    for t in [T_REF, 0.1, 0.5, 2.0] {
        let (l, g) = engine_loss(Loss::Cohesion, &rows, t);
        assert!(close(l * t, l_ref, 1e-5), "T {t}: {l} * T vs {l_ref}");
        let gt: Rows = g
            .iter()
            .map(|r| r.iter().map(|v| v * t).collect())
            .collect();
        assert!(rel_diff(&gt, &g_ref) < 1e-5, "T {t}");
    }
}

#[test]
fn a_zero_row_gives_finite_losses() {
    // F.normalize maps a zero row to zero; the losses stay finite and the pairwise forms
    // (with f = 0 for that row) still hold.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rows = as_f32(&random_rows(&mut rng, 6, 4));
    rows[4] = vec![0.0; 4];
    for loss in [Loss::NtXent, Loss::Cohesion] {
        let (value, grad) = engine_loss(loss, &rows, T_REF);
        assert!(value.is_finite(), "{loss:?}: {value}");
        assert!(grad.iter().flatten().all(|v| v.is_finite()), "{loss:?}");
        let want = explicit(loss, &rows, T_REF);
        assert!(close(value, want, 1e-5), "{loss:?}: {value} vs {want}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let z = vec![1.0f32; 12];
    let mut d1 = vec![0.0f32; 12];
    let mut d2 = vec![0.0f32; 12];
    let ok = ViewPair { dim: 4, n: 3 };
    assert!(
        Loss::Cohesion
            .on_cpu(&ok, 0.1, [&z, &z], [&mut d1, &mut d2])
            .is_ok()
    );
    for s in [
        ViewPair { dim: 4, n: 0 },
        ViewPair { dim: 0, n: 3 },
        ViewPair { dim: 5, n: 3 },
    ] {
        assert!(
            Loss::NtXent
                .on_cpu(&s, 0.1, [&z, &z], [&mut d1, &mut d2])
                .is_err()
        );
        assert!(
            Loss::Cohesion
                .on_cpu(&s, 0.1, [&z, &z], [&mut d1, &mut d2])
                .is_err()
        );
    }
    assert!(
        Loss::NtXent
            .on_cpu(&ok, 0.1, [&z, &z[1..]], [&mut d1, &mut d2])
            .is_err()
    );
}
