//! Linear layers on feature-major `[features, N]` matrices: `Y = W X + b`.

use rayon::prelude::*;

use super::{CpuEngine, relu_mask};
use crate::engine::{Linear, LinearBackward, LinearForward, LinearOps, Result};
use crate::matmul::{Mat, gemm};

impl LinearOps for CpuEngine {
    fn linear_forward(&self, s: &Linear, a: LinearForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let (w, b) = a.wb.split_at(s.out_features * s.in_features);
        let w = Mat::rows(w, s.out_features, s.in_features);
        gemm(
            a.y,
            s.batch,
            false,
            w,
            Mat::rows(a.x, s.in_features, s.batch),
        );
        a.y.par_chunks_mut(s.batch)
            .zip(b.par_iter())
            .for_each(|(row, &b)| {
                for v in row {
                    *v += b;
                    if a.relu {
                        *v = v.max(0.0);
                    }
                }
            });
        Ok(())
    }

    fn linear_backward(&self, s: &Linear, a: LinearBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let (dy, x) = (a.dy, a.x);
        if let Some(y) = a.relu_out {
            const CHUNK: usize = 1 << 14;
            dy.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK))
                .for_each(|(dy, y)| relu_mask(dy, y));
        }
        let weights = s.out_features * s.in_features;
        let w = Mat::rows(&a.wb[..weights], s.out_features, s.in_features);
        let (dw, db) = a.dwb.split_at_mut(weights);
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
        if let Some(dx) = a.dx {
            gemm(dx, s.batch, true, w.t(), dy_mat);
        }
        Ok(())
    }
}
