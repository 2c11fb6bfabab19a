//! The linear probe: L2-regularized logistic regression on standardized features, fitted by
//! Newton's method in f64 (the problem is small and convex, so the fit is exact to rounding
//! and needs no learning rate).

use anyhow::{Result, bail, ensure};

use crate::matmul::{Mat, gemm};
use crate::mil::Standardizer;

/// A fitted probe: `P(abnormal | x) = sigmoid(w . (x - mean) / std + b)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogisticProbe {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub weights: Vec<f64>,
    pub bias: f64,
}

const MAX_NEWTON_STEPS: usize = 100;

impl LogisticProbe {
    /// Fits the probe to `rows` (`[n, dim]`) and their labels by minimizing
    /// `sum_i log(1 + exp(-s_i f_i)) + l2 / 2 |w|^2` (`s_i = +-1`, `f_i = w . x_i + b`, the
    /// bias unpenalized). Newton step: `(X^T D X + l2 I) delta = X^T (p - y) + l2 w` with
    /// `D = diag(p (1 - p))`, halved until the objective falls.
    pub fn fit(rows: &[f32], dim: usize, labels: &[bool], l2: f64) -> Result<Self> {
        let n = labels.len();
        ensure!(
            dim > 0 && rows.len() == n * dim && n > 0,
            "probe: {} values for {n} rows of {dim}",
            rows.len()
        );
        ensure!(
            l2 > 0.0 && l2.is_finite(),
            "the probe's L2 penalty must be positive, got {l2}"
        );
        let raw: Vec<f64> = rows.iter().map(|&v| v as f64).collect();
        let Standardizer { mean, std } = Standardizer::fit_rows(raw.chunks_exact(dim), dim);
        // Standardized rows with a trailing 1 for the bias: [n, dim + 1].
        let cols = dim + 1;
        let x: Vec<f64> = raw
            .chunks_exact(dim)
            .flat_map(|row| {
                row.iter()
                    .zip(mean.iter().zip(&std))
                    .map(|(v, (m, s))| (v - m) / s)
                    .chain(std::iter::once(1.0))
            })
            .collect();
        let y: Vec<f64> = labels.iter().map(|&l| l as u8 as f64).collect();
        let mut theta = vec![0.0f64; cols];
        let mut objective = Self::objective(&x, &y, &theta, l2);
        for _ in 0..MAX_NEWTON_STEPS {
            let f = logits(&x, &theta);
            let p: Vec<f64> = f.iter().map(|&f| sigmoid(f)).collect();
            let mut grad = vec![0.0f64; cols];
            for (row, (pi, yi)) in x.chunks_exact(cols).zip(p.iter().zip(&y)) {
                grad.iter_mut()
                    .zip(row)
                    .for_each(|(g, v)| *g += (pi - yi) * v);
            }
            // sqrt(D) X, so that the Hessian is (sqrt(D) X)^T (sqrt(D) X).
            let weighted: Vec<f64> = x
                .chunks_exact(cols)
                .zip(&p)
                .flat_map(|(row, pi)| {
                    let w = (pi * (1.0 - pi)).sqrt();
                    row.iter().map(move |v| v * w)
                })
                .collect();
            let mut hessian = vec![0.0f64; cols * cols];
            let wx = Mat::rows(&weighted, n, cols);
            gemm(&mut hessian, cols, false, wx.t(), wx);
            for j in 0..dim {
                grad[j] += l2 * theta[j];
                hessian[j * cols + j] += l2;
            }
            // The bias is unpenalized: a tiny ridge keeps the system definite when every
            // probability has saturated.
            hessian[dim * cols + dim] += 1e-12;
            let delta = solve_spd(hessian, grad, cols)?;
            let mut step = 1.0;
            let accepted = loop {
                let candidate: Vec<f64> = theta
                    .iter()
                    .zip(&delta)
                    .map(|(t, d)| t - step * d)
                    .collect();
                let value = Self::objective(&x, &y, &candidate, l2);
                if value <= objective {
                    break Some((candidate, value));
                }
                step /= 2.0;
                if step < 1e-12 {
                    break None;
                }
            };
            let Some((candidate, value)) = accepted else {
                break;
            };
            let change = delta.iter().map(|d| (step * d).abs()).fold(0.0, f64::max);
            theta = candidate;
            let improvement = objective - value;
            objective = value;
            if change < 1e-10 || improvement <= 1e-14 * objective.abs().max(1.0) {
                break;
            }
        }
        let bias = theta.pop().expect("the bias is the last coefficient");
        Ok(Self {
            mean,
            std,
            weights: theta,
            bias,
        })
    }

    fn objective(x: &[f64], y: &[f64], theta: &[f64], l2: f64) -> f64 {
        let dim = theta.len() - 1;
        let data: f64 = logits(x, theta)
            .iter()
            .zip(y)
            // log(1 + exp(-s f)) with s = 2y - 1, written to stay finite for large |f|.
            .map(|(&f, &yi)| {
                let m = if yi > 0.5 { -f } else { f };
                m.max(0.0) + (-m.abs()).exp().ln_1p()
            })
            .sum();
        data + 0.5 * l2 * theta[..dim].iter().map(|t| t * t).sum::<f64>()
    }

    /// The logit `w . (x - mean) / std + b` of every row (higher: more likely abnormal).
    pub fn scores(&self, rows: &[f32]) -> Vec<f64> {
        let dim = self.weights.len();
        rows.chunks_exact(dim)
            .map(|row| {
                row.iter()
                    .zip(&self.weights)
                    .zip(self.mean.iter().zip(&self.std))
                    .map(|((&v, w), (m, s))| w * (v as f64 - m) / s)
                    .sum::<f64>()
                    + self.bias
            })
            .collect()
    }
}

fn logits(x: &[f64], theta: &[f64]) -> Vec<f64> {
    x.chunks_exact(theta.len())
        .map(|row| row.iter().zip(theta).map(|(a, b)| a * b).sum())
        .collect()
}

fn sigmoid(f: f64) -> f64 {
    1.0 / (1.0 + (-f).exp())
}

/// Solves `A x = b` for a symmetric positive definite `A` (`n x n`, row-major) by Cholesky.
fn solve_spd(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    // A = L L^T, L stored in the lower triangle of `a`.
    for j in 0..n {
        let diagonal = a[j * n + j] - (0..j).map(|k| a[j * n + k].powi(2)).sum::<f64>();
        if diagonal <= 0.0 || !diagonal.is_finite() {
            bail!("the probe's Newton system is not positive definite (column {j})");
        }
        let l_jj = diagonal.sqrt();
        a[j * n + j] = l_jj;
        for i in j + 1..n {
            let dot: f64 = (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum();
            a[i * n + j] = (a[i * n + j] - dot) / l_jj;
        }
    }
    // L z = b, then L^T x = z.
    for i in 0..n {
        let dot: f64 = (0..i).map(|k| a[i * n + k] * b[k]).sum();
        b[i] = (b[i] - dot) / a[i * n + i];
    }
    for i in (0..n).rev() {
        let dot: f64 = (i + 1..n).map(|k| a[k * n + i] * b[k]).sum();
        b[i] = (b[i] - dot) / a[i * n + i];
    }
    Ok(b)
}
