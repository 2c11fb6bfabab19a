//! The flat-buffer passes of gradient surgery and SGD.

use rayon::prelude::*;

use crate::engine::{GradDots, SgdUpdate};

/// Values per parallel task. Fixed, so sums are combined in the same order whatever the
/// thread count: results are bit-identical across machines and thread pools.
const CHUNK: usize = 1 << 15;
/// Independent f64 accumulators per sum, so the compiler can keep them in vector lanes.
const LANES: usize = 8;

fn chunk_dots(g1: &[f32], g2: &[f32]) -> GradDots {
    let (mut d, mut a, mut b) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
    let (c1, c2) = (g1.chunks_exact(LANES), g2.chunks_exact(LANES));
    let (r1, r2) = (c1.remainder(), c2.remainder());
    for (x, y) in c1.zip(c2) {
        for l in 0..LANES {
            let (x, y) = (x[l] as f64, y[l] as f64);
            d[l] += x * y;
            a[l] += x * x;
            b[l] += y * y;
        }
    }
    for (l, (&x, &y)) in r1.iter().zip(r2).enumerate() {
        let (x, y) = (x as f64, y as f64);
        d[l] += x * y;
        a[l] += x * x;
        b[l] += y * y;
    }
    GradDots {
        g1g2: d.iter().sum(),
        g1g1: a.iter().sum(),
        g2g2: b.iter().sum(),
    }
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
