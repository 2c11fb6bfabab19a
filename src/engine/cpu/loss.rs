//! The two task losses on feature-major embeddings, with their gradients.

use super::CpuEngine;
use crate::engine::{LossOps, LossViews, Result, ViewPair};
use crate::matmul::{Mat, gemm};

impl LossOps for CpuEngine {
    fn ntxent(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32> {
        a.check(s, temperature)?;
        Ok(on_normalized_rows(s, a, |f| ntxent(s, temperature, f)))
    }

    fn cohesion(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32> {
        a.check(s, temperature)?;
        Ok(on_normalized_rows(s, a, |f| cohesion(s, temperature, f)))
    }
}

/// A loss of the normalized rows `f` (a row-major `[2n, dim]` matrix; `loss(f)` returns the
/// value and `dL/df`), taken from the views and back through the normalization into `dz`.
fn on_normalized_rows(
    s: &ViewPair,
    a: LossViews<'_, CpuEngine>,
    loss: impl FnOnce(&[f32]) -> (f32, Vec<f64>),
) -> f32 {
    let (f, norms) = normalized_rows(s, a.z_i, a.z_j);
    let (value, df) = loss(&f);
    normalize_backward(s, &f, &norms, &df, a.dz_i, a.dz_j);
    value
}

/// `F.normalize`'s floor on the norm.
const NORM_EPS: f64 = 1e-12;

/// The `2n` rows `[z_i; z_j]` normalized, as a row-major `[2n, dim]` matrix, and the norms
/// they were divided by.
fn normalized_rows(s: &ViewPair, z_i: &[f32], z_j: &[f32]) -> (Vec<f32>, Vec<f64>) {
    let (n, d) = (s.n, s.dim);
    let mut f = vec![0.0f32; 2 * n * d];
    let mut norms = vec![0.0f64; 2 * n];
    for (a, (row, norm)) in f.chunks_mut(d).zip(norms.iter_mut()).enumerate() {
        let (z, col) = if a < n { (z_i, a) } else { (z_j, a - n) };
        for (k, v) in row.iter_mut().enumerate() {
            *v = z[k * n + col];
        }
        *norm = row
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(NORM_EPS);
        for v in row.iter_mut() {
            *v = (*v as f64 / *norm) as f32;
        }
    }
    (f, norms)
}

/// Back through `f = z / max(|z|, eps)`: `dz = (df - f (f . df)) / |z|` (the projection
/// vanishes when the floor is active), written into the feature-major `dz_i`, `dz_j`.
fn normalize_backward(
    s: &ViewPair,
    f: &[f32],
    norms: &[f64],
    df: &[f64],
    dz_i: &mut [f32],
    dz_j: &mut [f32],
) {
    let (n, d) = (s.n, s.dim);
    for a in 0..2 * n {
        let (f_a, df_a) = (&f[a * d..][..d], &df[a * d..][..d]);
        let along = if norms[a] > NORM_EPS {
            f_a.iter()
                .zip(df_a)
                .map(|(&f, &g)| f as f64 * g)
                .sum::<f64>()
        } else {
            0.0
        };
        let (dz, col) = if a < n {
            (&mut *dz_i, a)
        } else {
            (&mut *dz_j, a - n)
        };
        for k in 0..d {
            dz[k * n + col] = ((df_a[k] - f_a[k] as f64 * along) / norms[a]) as f32;
        }
    }
}

/// NT-Xent (see [`LossOps::ntxent`] for the formulas); anchors `a` pair with `p(a) = a +- n`.
fn ntxent(s: &ViewPair, t: f32, f: &[f32]) -> (f32, Vec<f64>) {
    let (n, d) = (s.n, s.dim);
    let m = 2 * n;
    let f_mat = Mat::rows(f, m, d);
    let mut sim = vec![0.0f32; m * m];
    gemm(&mut sim, m, false, f_mat, f_mat.t());
    let inv_t = 1.0 / t as f64;
    let mut loss = 0.0f64;
    let mut ds = vec![0.0f64; m * m];
    for a in 0..m {
        let partner = (a + n) % m;
        let row = &sim[a * m..][..m];
        let logit = |b: usize| row[b] as f64 * inv_t;
        let max = (0..m)
            .filter(|&b| b != a)
            .map(logit)
            .fold(f64::NEG_INFINITY, f64::max);
        let sum_exp: f64 = (0..m)
            .filter(|&b| b != a)
            .map(|b| (logit(b) - max).exp())
            .sum();
        loss -= logit(partner) - (max + sum_exp.ln());
        for b in (0..m).filter(|&b| b != a) {
            let softmax = (logit(b) - max).exp() / sum_exp;
            ds[a * m + b] = (softmax - (b == partner) as u8 as f64) / m as f64;
        }
    }
    // df_a = sum_b (dS[a,b] + dS[b,a]) f_b / T
    let mut df = vec![0.0f64; m * d];
    for a in 0..m {
        let df_a = &mut df[a * d..][..d];
        for b in 0..m {
            let w = (ds[a * m + b] + ds[b * m + a]) * inv_t;
            if w != 0.0 {
                for (g, &f) in df_a.iter_mut().zip(&f[b * d..][..d]) {
                    *g += w * f as f64;
                }
            }
        }
    }
    ((loss / m as f64) as f32, df)
}

/// Cohesion (see [`LossOps::cohesion`] for the formulas), linear in the rows.
fn cohesion(s: &ViewPair, t: f32, f: &[f32]) -> (f32, Vec<f64>) {
    let (n, d) = (s.n, s.dim);
    let m = 2 * n;
    let mut sum = vec![0.0f64; d];
    let mut self_dots = 0.0f64;
    for row in f.chunks(d) {
        for (acc, &v) in sum.iter_mut().zip(row) {
            *acc += v as f64;
        }
        self_dots += row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    }
    let pairs = (m * (m - 1)) as f64;
    let t = t as f64;
    let mean_cos = (sum.iter().map(|v| v * v).sum::<f64>() - self_dots) / pairs;
    let scale = -2.0 / (pairs * t);
    let df: Vec<f64> = f
        .chunks(d)
        .flat_map(|row| {
            row.iter()
                .zip(&sum)
                .map(move |(&f, &s)| scale * (s - f as f64))
        })
        .collect();
    (((1.0 - mean_cos) / t) as f32, df)
}
