//! 2-D convolution as im2col + GEMM over the channel-major `[C, N, H, W]` batch.
//!
//! A chunk of images is unfolded into `cols[Cin*k*k, nb*Ho*Wo]`; then
//! forward `Y[:, chunk] = W cols`, backward `dW += dY[:, chunk] cols^T` and
//! `dX[:, chunk] += fold(W^T dY[:, chunk])`. A 1x1 stride-1 convolution needs no unfolding:
//! `X` itself is `cols` for the whole batch.

use rayon::prelude::*;

use super::CpuEngine;
use super::scratch::with_scratch;
use crate::engine::{Conv2d, ConvBackward, ConvOps, Result};
use crate::matmul::{Mat, gemm};

impl ConvOps for CpuEngine {
    fn conv2d_forward(&self, s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        forward(s, x, w, y);
        Ok(())
    }

    fn conv2d_backward(&self, s: &Conv2d, a: ConvBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        backward(s, a.x, a.w, a.dy, a.dw, a.dx);
        Ok(())
    }
}

/// Upper bound on the unfolded matrix of one chunk (f32 values): keeps it near the caches
/// without making the products skinny.
const COLS_BUDGET: usize = 1 << 21;

fn is_pointwise(s: &Conv2d) -> bool {
    s.kernel == 1 && s.stride == 1 && s.pad == 0
}

/// Images per chunk.
fn chunk_images(s: &Conv2d) -> usize {
    let per_image = s.in_channels * s.kernel * s.kernel * s.out_h() * s.out_w();
    (COLS_BUDGET / per_image.max(1)).clamp(1, s.batch.max(1))
}

/// Unfolds images `n0..n0+nb` of `x` into `cols[Cin*k*k, nb*Ho*Wo]`.
fn im2col(s: &Conv2d, x: &[f32], n0: usize, nb: usize, cols: &mut [f32]) {
    let (k, (oh, ow)) = (s.kernel, (s.out_h(), s.out_w()));
    let plane = s.in_h * s.in_w;
    let row_len = nb * oh * ow;
    cols.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
            let (lo, hi) = valid_outputs(kx, s.pad, s.stride, s.in_w, ow);
            for img in 0..nb {
                let src = &x[(ci * s.batch + n0 + img) * plane..][..plane];
                for oy in 0..oh {
                    let dst = &mut out[(img * oh + oy) * ow..][..ow];
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.in_h as isize || lo >= hi {
                        dst.fill(0.0);
                        continue;
                    }
                    let src_row = &src[iy as usize * s.in_w..][..s.in_w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let ix0 = lo * s.stride + kx - s.pad;
                    if s.stride == 1 {
                        dst[lo..hi].copy_from_slice(&src_row[ix0..ix0 + hi - lo]);
                    } else {
                        for (d, ix) in dst[lo..hi].iter_mut().zip((ix0..).step_by(s.stride)) {
                            *d = src_row[ix];
                        }
                    }
                }
            }
        });
}

/// Adds `cols[Cin*k*k, nb*Ho*Wo]` back onto images `n0..n0+nb` of `dx` (the adjoint of
/// [`im2col`]). Parallel over input channels: each owns its `k*k` rows and its planes.
fn col2im_add(s: &Conv2d, cols: &[f32], n0: usize, nb: usize, dx: &mut [f32]) {
    let (k, (oh, ow)) = (s.kernel, (s.out_h(), s.out_w()));
    let plane = s.in_h * s.in_w;
    let row_len = nb * oh * ow;
    dx.par_chunks_mut(s.batch * plane)
        .enumerate()
        .for_each(|(ci, dx_c)| {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * row_len..][..row_len];
                    let (lo, hi) = valid_outputs(kx, s.pad, s.stride, s.in_w, ow);
                    if lo >= hi {
                        continue;
                    }
                    let ix0 = lo * s.stride + kx - s.pad;
                    for img in 0..nb {
                        let dst = &mut dx_c[(n0 + img) * plane..][..plane];
                        for oy in 0..oh {
                            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                            if iy < 0 || iy >= s.in_h as isize {
                                continue;
                            }
                            let src = &row[(img * oh + oy) * ow..][lo..hi];
                            let dst_row = &mut dst[iy as usize * s.in_w..][..s.in_w];
                            if s.stride == 1 {
                                let dst_run = &mut dst_row[ix0..ix0 + src.len()];
                                for (d, g) in dst_run.iter_mut().zip(src) {
                                    *d += g;
                                }
                            } else {
                                for (g, ix) in src.iter().zip((ix0..).step_by(s.stride)) {
                                    dst_row[ix] += g;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// The output columns `lo..hi` whose input column `ox*stride + kx - pad` is inside the image.
fn valid_outputs(
    kx: usize,
    pad: usize,
    stride: usize,
    in_w: usize,
    out_w: usize,
) -> (usize, usize) {
    let lo = pad.saturating_sub(kx).div_ceil(stride);
    let hi = if in_w + pad > kx {
        ((in_w + pad - kx - 1) / stride + 1).min(out_w)
    } else {
        0
    };
    (lo.min(hi), hi)
}

fn forward(s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
    let k_len = s.in_channels * s.kernel * s.kernel;
    let p_out = s.out_h() * s.out_w();
    let w_mat = Mat::rows(w, s.out_channels, k_len);
    if is_pointwise(s) {
        let x_mat = Mat::rows(x, s.in_channels, s.batch * p_out);
        return gemm(y, s.batch * p_out, false, w_mat, x_mat);
    }
    let nb_max = chunk_images(s);
    with_scratch(k_len * nb_max * p_out, |cols| {
        for n0 in (0..s.batch).step_by(nb_max) {
            let nb = nb_max.min(s.batch - n0);
            let cols = &mut cols[..k_len * nb * p_out];
            im2col(s, x, n0, nb, cols);
            let dst = &mut y[n0 * p_out..];
            gemm(
                dst,
                s.batch * p_out,
                false,
                w_mat,
                Mat::rows(cols, k_len, nb * p_out),
            );
        }
    });
}

fn backward(
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    let k_len = s.in_channels * s.kernel * s.kernel;
    let np_out = s.batch * s.out_h() * s.out_w();
    let p_out = s.out_h() * s.out_w();
    let w_mat = Mat::rows(w, s.out_channels, k_len);
    if is_pointwise(s) {
        let x_mat = Mat::rows(x, s.in_channels, np_out);
        let dy_mat = Mat::rows(dy, s.out_channels, np_out);
        gemm(dw, k_len, true, dy_mat, x_mat.t());
        if let Some(dx) = dx {
            gemm(dx, np_out, true, w_mat.t(), dy_mat);
        }
        return;
    }
    let nb_max = chunk_images(s);
    let chunk_len = k_len * nb_max * p_out;
    with_scratch(2 * chunk_len, |scratch| {
        let (cols, dcols) = scratch.split_at_mut(chunk_len);
        for n0 in (0..s.batch).step_by(nb_max) {
            let nb = nb_max.min(s.batch - n0);
            let (cols, dcols) = (
                &mut cols[..k_len * nb * p_out],
                &mut dcols[..k_len * nb * p_out],
            );
            im2col(s, x, n0, nb, cols);
            let dy_chunk = Mat::strided(&dy[n0 * p_out..], s.out_channels, nb * p_out, np_out);
            gemm(
                dw,
                k_len,
                true,
                dy_chunk,
                Mat::rows(cols, k_len, nb * p_out).t(),
            );
            if let Some(dx) = dx.as_deref_mut() {
                gemm(dcols, nb * p_out, false, w_mat.t(), dy_chunk);
                col2im_add(s, dcols, n0, nb, dx);
            }
        }
    });
}
