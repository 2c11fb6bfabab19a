//! Max pooling and global average pooling, plane by plane.

use rayon::prelude::*;

use super::CpuEngine;
use crate::engine::{AvgPool, MaxPool, PoolOps, Result};

impl PoolOps for CpuEngine {
    fn maxpool_forward(&self, s: &MaxPool, x: &[f32], y: &mut [f32]) -> Result<()> {
        s.check_forward(x.len(), y.len())?;
        let (in_plane, out_plane) = (s.in_h * s.in_w, s.out_h() * s.out_w());
        y.par_chunks_mut(out_plane).enumerate().for_each(|(p, y)| {
            let plane = &x[p * in_plane..][..in_plane];
            for_each_argmax(s, plane, |o, i| y[o] = plane[i]);
        });
        Ok(())
    }

    fn maxpool_backward(&self, s: &MaxPool, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
        s.check_backward(x.len(), dy.len(), dx.len())?;
        let (in_plane, out_plane) = (s.in_h * s.in_w, s.out_h() * s.out_w());
        dx.par_chunks_mut(in_plane).enumerate().for_each(|(p, dx)| {
            let dy = &dy[p * out_plane..][..out_plane];
            dx.fill(0.0);
            for_each_argmax(s, &x[p * in_plane..][..in_plane], |o, i| dx[i] += dy[o]);
        });
        Ok(())
    }

    fn avgpool_forward(&self, s: &AvgPool, x: &[f32], y: &mut [f32]) -> Result<()> {
        s.check_forward(x.len(), y.len())?;
        y.par_iter_mut().enumerate().for_each(|(p, y)| {
            let sum: f64 = x[p * s.spatial..][..s.spatial]
                .iter()
                .map(|&v| v as f64)
                .sum();
            *y = (sum / s.spatial as f64) as f32;
        });
        Ok(())
    }

    fn avgpool_backward(&self, s: &AvgPool, dy: &[f32], dx: &mut [f32]) -> Result<()> {
        s.check_backward(dy.len(), dx.len())?;
        let inv = 1.0 / s.spatial as f32;
        dx.par_chunks_mut(s.spatial)
            .zip(dy.par_iter())
            .for_each(|(dx, &g)| dx.fill(g * inv));
        Ok(())
    }
}

/// The in-image span `lo..hi` of each output's window along one axis (padding never counts).
fn window_spans(size: usize, out: usize, s: &MaxPool) -> Vec<(usize, usize)> {
    (0..out)
        .map(|o| {
            let start = (o * s.stride) as isize - s.pad as isize;
            (
                start.max(0) as usize,
                ((start + s.kernel as isize) as usize).min(size),
            )
        })
        .collect()
}

/// Calls `f(output, argmax)` for every output of one plane, `argmax` being the index of the
/// first maximum of its window: PyTorch scans row by row and keeps a value only if it is
/// strictly greater (or NaN).
fn for_each_argmax(s: &MaxPool, plane: &[f32], mut f: impl FnMut(usize, usize)) {
    let (rows, cols) = (
        window_spans(s.in_h, s.out_h(), s),
        window_spans(s.in_w, s.out_w(), s),
    );
    for (oy, &(y0, y1)) in rows.iter().enumerate() {
        for (ox, &(x0, x1)) in cols.iter().enumerate() {
            let (mut best, mut best_val) = (y0 * s.in_w + x0, f32::NEG_INFINITY);
            for iy in y0..y1 {
                let row = &plane[iy * s.in_w..][x0..x1];
                for (dx, &v) in row.iter().enumerate() {
                    if v > best_val || v.is_nan() {
                        (best, best_val) = (iy * s.in_w + x0 + dx, v);
                    }
                }
            }
            f(oy * cols.len() + ox, best);
        }
    }
}
