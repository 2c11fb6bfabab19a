//! Linear layers on feature-major `[features, N]` matrices: `Y = W X + b`.

use rayon::prelude::*;

use super::matmul::{Mat, gemm};
use crate::engine::Linear;

pub fn forward(s: &Linear, x: &[f32], wb: &[f32], relu: bool, y: &mut [f32]) {
    let (w, b) = wb.split_at(s.out_features * s.in_features);
    let w = Mat::rows(w, s.out_features, s.in_features);
    gemm(y, s.batch, false, w, Mat::rows(x, s.in_features, s.batch));
    y.par_chunks_mut(s.batch)
        .zip(b.par_iter())
        .for_each(|(row, &b)| {
            for v in row {
                *v += b;
                if relu {
                    *v = v.max(0.0);
                }
            }
        });
}

pub fn backward(
    s: &Linear,
    x: &[f32],
    wb: &[f32],
    relu_out: Option<&[f32]>,
    dy: &mut [f32],
    dwb: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    if let Some(y) = relu_out {
        dy.par_iter_mut().zip(y.par_iter()).for_each(|(g, &y)| {
            if y <= 0.0 {
                *g = 0.0;
            }
        });
    }
    let w = Mat::rows(
        &wb[..s.out_features * s.in_features],
        s.out_features,
        s.in_features,
    );
    let (dw, db) = dwb.split_at_mut(s.out_features * s.in_features);
    let dy_mat = Mat::rows(dy, s.out_features, s.batch);
    // dW += dY X^T
    gemm(
        dw,
        s.in_features,
        true,
        dy_mat,
        Mat::rows(x, s.in_features, s.batch).t(),
    );
    // db += sum over the batch of dY
    db.par_iter_mut()
        .zip(dy.par_chunks(s.batch))
        .for_each(|(db, row)| {
            *db += row.iter().map(|&v| v as f64).sum::<f64>() as f32;
        });
    // dX += W^T dY
    if let Some(dx) = dx {
        gemm(dx, s.batch, true, w.t(), dy_mat);
    }
}
