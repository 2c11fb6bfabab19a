//! Batch normalization over channel rows of the `[C, N, H, W]` batch, with the residual add
//! and ReLU that follow it in a ResNet fused in.

use rayon::prelude::*;

use super::CpuEngine;
use super::reduce::sum_pairs;
use crate::engine::{BatchNorm, BnEvalForward, BnTrainBackward, BnTrainForward, NormOps, Result};

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
    fn batchnorm_train_forward(&self, s: &BatchNorm, a: BnTrainForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        train_forward(s, a);
        Ok(())
    }

    fn batchnorm_eval_forward(&self, s: &BatchNorm, a: BnEvalForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        eval_forward(s, a);
        Ok(())
    }

    fn batchnorm_train_backward(&self, s: &BatchNorm, a: BnTrainBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        train_backward(s, a);
        Ok(())
    }
}

fn train_forward(s: &BatchNorm, a: BnTrainForward<'_, CpuEngine>) {
    let BnTrainForward {
        x,
        affine,
        residual,
        relu,
        y,
        saved,
        running,
    } = a;
    let (c, m) = (s.channels, s.per_channel);
    let (gamma, beta) = affine.split_at(c);
    let stats: Vec<(f64, f64)> = x.par_chunks(m).map(moments).collect();
    let (saved_mean, saved_invstd) = saved.split_at_mut(c);
    let (run_mean, run_var) = running.split_at_mut(c);
    let momentum = s.momentum as f64;
    let unbias = m as f64 / (m as f64 - 1.0).max(1.0);
    for (ch, &(mean, var)) in stats.iter().enumerate() {
        saved_mean[ch] = mean as f32;
        saved_invstd[ch] = (1.0 / (var + s.eps as f64).sqrt()) as f32;
        run_mean[ch] = ((1.0 - momentum) * run_mean[ch] as f64 + momentum * mean) as f32;
        run_var[ch] = ((1.0 - momentum) * run_var[ch] as f64 + momentum * var * unbias) as f32;
    }
    y.par_chunks_mut(m).enumerate().for_each(|(ch, y)| {
        let a = gamma[ch] * saved_invstd[ch];
        let b = beta[ch] - saved_mean[ch] * a;
        let r = residual.map(|r| &r[ch * m..][..m]);
        affine_act(&x[ch * m..][..m], a, b, r, relu, y);
    });
}

fn eval_forward(s: &BatchNorm, a: BnEvalForward<'_, CpuEngine>) {
    let BnEvalForward {
        x,
        affine,
        running,
        residual,
        relu,
        y,
    } = a;
    let (c, m) = (s.channels, s.per_channel);
    let (gamma, beta) = affine.split_at(c);
    let (mean, var) = running.split_at(c);
    y.par_chunks_mut(m).enumerate().for_each(|(ch, y)| {
        let a = gamma[ch] / (var[ch] + s.eps).sqrt();
        let b = beta[ch] - mean[ch] * a;
        let r = residual.map(|r| &r[ch * m..][..m]);
        affine_act(&x[ch * m..][..m], a, b, r, relu, y);
    });
}

fn train_backward(s: &BatchNorm, a: BnTrainBackward<'_, CpuEngine>) {
    let BnTrainBackward {
        x,
        affine,
        saved,
        relu_out,
        dy,
        dx,
        daffine,
    } = a;
    let (c, m) = (s.channels, s.per_channel);
    let gamma = &affine[..c];
    let (mean, invstd) = saved.split_at(c);
    let sums: Vec<(f64, f64)> = dy
        .par_chunks_mut(m)
        .zip(dx.par_chunks_mut(m))
        .enumerate()
        .map(|(ch, (dy, dx))| {
            let x = &x[ch * m..][..m];
            if let Some(y) = relu_out {
                for (g, &y) in dy.iter_mut().zip(&y[ch * m..][..m]) {
                    if y <= 0.0 {
                        *g = 0.0;
                    }
                }
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
    let (dgamma, dbeta) = daffine.split_at_mut(c);
    for (ch, &(dg, db)) in sums.iter().enumerate() {
        dgamma[ch] += dg as f32;
        dbeta[ch] += db as f32;
    }
}
