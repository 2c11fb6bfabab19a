//! Max pooling and global average pooling, plane by plane.

use rayon::prelude::*;

use crate::engine::{AvgPool, MaxPool};

/// Index (within the plane) of the first maximum of output `(oy, ox)`'s window: PyTorch
/// scans row by row and keeps a value only if it is strictly greater (or NaN).
fn window_argmax(s: &MaxPool, plane: &[f32], oy: usize, ox: usize) -> usize {
    let y0 = (oy * s.stride) as isize - s.pad as isize;
    let x0 = (ox * s.stride) as isize - s.pad as isize;
    let rows = y0.max(0) as usize..((y0 + s.kernel as isize) as usize).min(s.in_h);
    let cols = x0.max(0) as usize..((x0 + s.kernel as isize) as usize).min(s.in_w);
    let mut best = rows.start * s.in_w + cols.start;
    let mut best_val = f32::NEG_INFINITY;
    for iy in rows {
        for ix in cols.clone() {
            let v = plane[iy * s.in_w + ix];
            if v > best_val || v.is_nan() {
                best_val = v;
                best = iy * s.in_w + ix;
            }
        }
    }
    best
}

pub fn max_forward(s: &MaxPool, x: &[f32], y: &mut [f32]) {
    let (in_plane, out_plane) = (s.in_h * s.in_w, s.out_h() * s.out_w());
    y.par_chunks_mut(out_plane).enumerate().for_each(|(p, y)| {
        let plane = &x[p * in_plane..][..in_plane];
        for (o, y) in y.iter_mut().enumerate() {
            *y = plane[window_argmax(s, plane, o / s.out_w(), o % s.out_w())];
        }
    });
}

pub fn max_backward(s: &MaxPool, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (in_plane, out_plane) = (s.in_h * s.in_w, s.out_h() * s.out_w());
    dx.par_chunks_mut(in_plane).enumerate().for_each(|(p, dx)| {
        let plane = &x[p * in_plane..][..in_plane];
        dx.fill(0.0);
        for (o, &g) in dy[p * out_plane..][..out_plane].iter().enumerate() {
            dx[window_argmax(s, plane, o / s.out_w(), o % s.out_w())] += g;
        }
    });
}

pub fn avg_forward(s: &AvgPool, x: &[f32], y: &mut [f32]) {
    y.par_iter_mut().enumerate().for_each(|(p, y)| {
        let sum: f64 = x[p * s.spatial..][..s.spatial]
            .iter()
            .map(|&v| v as f64)
            .sum();
        *y = (sum / s.spatial as f64) as f32;
    });
}

pub fn avg_backward(s: &AvgPool, dy: &[f32], dx: &mut [f32]) {
    let inv = 1.0 / s.spatial as f32;
    dx.par_chunks_mut(s.spatial)
        .zip(dy.par_iter())
        .for_each(|(dx, &g)| dx.fill(g * inv));
}
