//! Batch normalization over channel rows of the `[C, N, H, W]` batch, with the residual add
//! and ReLU that follow it in a ResNet fused in.

use rayon::prelude::*;

use super::reduce::sum_pairs;
use super::{CpuEngine, relu_mask};
use crate::engine::{BatchNorm, BnBackward, BnForward, BnStats, NormOps, Result};

/// `y = act(a x + b [+ r])` over one channel row: the affine form of a normalization.
fn affine_act(x: &[f32], a: f32, b: f32, residual: Option<&[f32]>, relu: bool, y: &mut [f32]) {
    match residual {
        Some(r) => {
            for ((y, &x), &r) in y.iter_mut().zip(x).zip(r) {
                let v = x * a + b + r;
                *y = if relu { v.max(0.0) } else { v };
            }
        }
        None => {
            for (y, &x) in y.iter_mut().zip(x) {
                let v = x * a + b;
                *y = if relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// Mean and biased variance of one row, two-pass in f64.
fn moments(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let [sum] = sum_pairs(x, x, |v, _| [v]);
    let mean = sum / n;
    let [squares] = sum_pairs(x, x, |v, _| [(v - mean) * (v - mean)]);
    (mean, squares / n)
}

impl NormOps for CpuEngine {
    fn batchnorm_forward(&self, s: &BatchNorm, a: BnForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let (c, m) = (s.channels, s.per_channel);
        let (gamma, beta) = a.affine.split_at(c);
        // Per channel, the affine form `y = act(scale x + shift [+ r])` of the normalization.
        let coefficients: Vec<(f32, f32)> = match a.stats {
            BnStats::Batch { saved, running } => {
                let stats: Vec<(f64, f64)> = a.x.par_chunks(m).map(moments).collect();
                let (saved_mean, saved_invstd) = saved.split_at_mut(c);
                let (run_mean, run_var) = running.split_at_mut(c);
                let momentum = s.momentum as f64;
                let unbias = m as f64 / (m as f64 - 1.0).max(1.0);
                for (ch, &(mean, var)) in stats.iter().enumerate() {
                    saved_mean[ch] = mean as f32;
                    saved_invstd[ch] = (1.0 / (var + s.eps as f64).sqrt()) as f32;
                    run_mean[ch] =
                        ((1.0 - momentum) * run_mean[ch] as f64 + momentum * mean) as f32;
                    run_var[ch] =
                        ((1.0 - momentum) * run_var[ch] as f64 + momentum * var * unbias) as f32;
                }
                (0..c)
                    .map(|ch| {
                        let scale = gamma[ch] * saved_invstd[ch];
                        (scale, beta[ch] - saved_mean[ch] * scale)
                    })
                    .collect()
            }
            BnStats::Running(running) => {
                let (mean, var) = running.split_at(c);
                (0..c)
                    .map(|ch| {
                        let scale = gamma[ch] / (var[ch] + s.eps).sqrt();
                        (scale, beta[ch] - mean[ch] * scale)
                    })
                    .collect()
            }
        };
        let (x, residual, relu) = (a.x, a.residual, a.relu);
        a.y.par_chunks_mut(m).enumerate().for_each(|(ch, y)| {
            let (scale, shift) = coefficients[ch];
            let r = residual.map(|r| &r[ch * m..][..m]);
            affine_act(&x[ch * m..][..m], scale, shift, r, relu, y);
        });
        Ok(())
    }

    fn batchnorm_backward(&self, s: &BatchNorm, a: BnBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let (x, relu_out) = (a.x, a.relu_out);
        let (c, m) = (s.channels, s.per_channel);
        let gamma = &a.affine[..c];
        let (mean, invstd) = a.saved.split_at(c);
        let sums: Vec<(f64, f64)> = a
            .dy
            .par_chunks_mut(m)
            .zip(a.dx.par_chunks_mut(m))
            .enumerate()
            .map(|(ch, (dy, dx))| {
                let x = &x[ch * m..][..m];
                if let Some(y) = relu_out {
                    relu_mask(dy, &y[ch * m..][..m]);
                }
                let (mu, istd) = (mean[ch], invstd[ch]);
                // dbeta = sum dy, dgamma = sum dy xhat.
                let (mu64, istd64) = (mu as f64, istd as f64);
                let [dbeta, dgamma] = sum_pairs(dy, x, |g, x| [g, g * (x - mu64) * istd64]);
                // dx = gamma invstd (dy - dbeta/M - xhat dgamma/M)
                let scale = gamma[ch] * istd;
                let (mean_dy, mean_dyx) = ((dbeta / m as f64) as f32, (dgamma / m as f64) as f32);
                for ((dx, &g), &x) in dx.iter_mut().zip(dy.iter()).zip(x) {
                    *dx = scale * (g - mean_dy - (x - mu) * istd * mean_dyx);
                }
                (dgamma, dbeta)
            })
            .collect();
        let (dgamma, dbeta) = a.daffine.split_at_mut(c);
        for (ch, &(dg, db)) in sums.iter().enumerate() {
            dgamma[ch] += dg as f32;
            dbeta[ch] += db as f32;
        }
        Ok(())
    }
}
