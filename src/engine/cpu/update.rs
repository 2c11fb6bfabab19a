//! The flat-buffer passes of gradient surgery and SGD.

use rayon::prelude::*;

use super::reduce::sum_pairs;
use crate::engine::{GradDots, SgdUpdate};

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

pub fn combine(g1: &[f32], g2: &[f32], alpha: f32, beta: f32, out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(g1.par_chunks(CHUNK).zip(g2.par_chunks(CHUNK)))
        .for_each(|(out, (g1, g2))| {
            for ((o, &x), &y) in out.iter_mut().zip(g1).zip(g2) {
                *o = alpha * x + beta * y;
            }
        });
}

pub fn sgd_step(u: &SgdUpdate, g1: &[f32], g2: &[f32], params: &mut [f32], momentum: &mut [f32]) {
    let n = params.len();
    assert!(
        g1.len() == n && g2.len() == n && momentum.len() == n,
        "buffer lengths differ"
    );
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
}
