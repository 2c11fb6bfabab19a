//! The flat-buffer passes of gradient surgery and SGD.

use rayon::prelude::*;

use super::CpuEngine;
use super::reduce::sum_pairs;
use crate::engine::{GradDots, Result, SgdBuffers, SgdUpdate, UpdateOps, check_len};

impl UpdateOps for CpuEngine {
    fn grad_dots(&self, g1: &[f32], g2: &[f32]) -> Result<GradDots> {
        check_len("second gradient", g2.len(), g1.len())?;
        Ok(grad_dots(g1, g2))
    }

    fn combine_grads(
        &self,
        (alpha, beta): (f32, f32),
        g1: &[f32],
        g2: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        check_len("second gradient", g2.len(), g1.len())?;
        check_len("combined gradient", out.len(), g1.len())?;
        out.par_chunks_mut(CHUNK)
            .zip(g1.par_chunks(CHUNK).zip(g2.par_chunks(CHUNK)))
            .for_each(|(out, (g1, g2))| {
                for ((o, &x), &y) in out.iter_mut().zip(g1).zip(g2) {
                    *o = alpha * x + beta * y;
                }
            });
        Ok(())
    }

    fn sgd_step(&self, u: &SgdUpdate, a: SgdBuffers<'_, Self>) -> Result<()> {
        a.check()?;
        let SgdBuffers {
            g1,
            g2,
            params,
            momentum,
        } = a;
        params
            .par_chunks_mut(CHUNK)
            .zip(momentum.par_chunks_mut(CHUNK))
            .zip(g1.par_chunks(CHUNK).zip(g2.par_chunks(CHUNK)))
            .for_each(|((p, m), (g1, g2))| {
                for (((p, m), &x), &y) in p.iter_mut().zip(m.iter_mut()).zip(g1).zip(g2) {
                    let d = (u.alpha * x + u.beta * y) + u.weight_decay * *p;
                    *m = u.momentum * *m + d;
                    *p -= u.lr * *m;
                }
            });
        Ok(())
    }
}

/// Values per parallel task. Fixed, so sums are combined in the same order whatever the
/// thread count: results are bit-identical across machines and thread pools.
const CHUNK: usize = 1 << 15;

fn chunk_dots(g1: &[f32], g2: &[f32]) -> GradDots {
    let [g1g2, g1g1, g2g2] = sum_pairs(g1, g2, |x, y| [x * y, x * x, y * y]);
    GradDots { g1g2, g1g1, g2g2 }
}

/// `g1 . g2`, `|g1|^2`, `|g2|^2`: the CPU twin of the `ags_dots` kernels.
pub fn grad_dots(g1: &[f32], g2: &[f32]) -> GradDots {
    assert_eq!(g1.len(), g2.len(), "gradient buffers differ in length");
    let parts: Vec<GradDots> = g1
        .par_chunks(CHUNK)
        .zip(g2.par_chunks(CHUNK))
        .map(|(x, y)| chunk_dots(x, y))
        .collect();
    parts.iter().fold(GradDots::default(), |acc, p| GradDots {
        g1g2: acc.g1g2 + p.g1g2,
        g1g1: acc.g1g1 + p.g1g1,
        g2g2: acc.g2g2 + p.g2g2,
    })
}
