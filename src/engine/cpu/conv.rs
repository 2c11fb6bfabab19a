//! 2-D convolution as im2col + GEMM over the channel-major `[C, N, H, W]` batch.
//!
//! A chunk of images is unfolded into `cols[Cin*k*k, nb*Ho*Wo]`; then
//! forward `Y[:, chunk] = W cols`, backward `dW += dY[:, chunk] cols^T` and
//! `dX[:, chunk] += fold(W^T dY[:, chunk])`. A 1x1 stride-1 convolution needs no unfolding:
//! `X` itself is `cols` for the whole batch.

use rayon::prelude::*;

use super::scratch::with_scratch;
use super::{CpuEngine, conv3x3, stem};
use crate::engine::{Conv2d, ConvBackward, ConvOps, Result};
use crate::matmul::{Mat, gemm};

impl ConvOps for CpuEngine {
    fn conv2d_forward(&self, s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        if conv3x3::applies(s) {
            conv3x3::forward(s, x, w, y);
        } else {
            forward(s, x, w, y);
        }
        Ok(())
    }

    fn conv2d_backward(&self, s: &Conv2d, a: ConvBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let mut dx = a.dx;
        if dx.is_none() && stem::applies(s) {
            stem::weight_gradient(s, a.x, a.dy, a.dw);
            return Ok(());
        }
        if conv3x3::applies(s) {
            if let Some(dx) = dx.take() {
                conv3x3::input_gradient(s, a.w, a.dy, dx);
            }
            if conv3x3::weight_gradient_applies(s) {
                conv3x3::weight_gradient(s, a.x, a.dy, a.dw);
                return Ok(());
            }
        }
        backward(s, a.x, a.w, a.dy, a.dw, dx);
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

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{backward, conv3x3, forward, stem};
    use crate::engine::Conv2d;

    fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        println!(
            "{what}: largest difference {worst:.2e}, {:.2e} of the largest value",
            worst / scale
        );
        // Two f32 sums of up to a few thousand terms in different orders.
        assert!(
            worst <= 1e-5 * scale,
            "{what}: differs by {worst} (scale {scale})"
        );
    }

    /// The direct 3x3 kernels against the unfolded products, on shapes that take each tile
    /// shape, output channels that fill no whole tile, input channels over more than one
    /// pass, and (for the weight gradient) more than one block of output channels.
    #[test]
    fn direct_3x3_matches_the_unfolded_products() {
        let shapes = [
            // (batch, cin, cout, h, w): tiles of 8 x 48 (w 16), 4 x 80 (w 8), 6 x 64 (w 7).
            (3, 70, 11, 5, 16),
            (2, 9, 13, 8, 8),
            (2, 20, 70, 7, 7),
            (1, 3, 5, 9, 30),
        ];
        let mut checked = 0;
        for (seed, &(batch, cin, cout, h, w)) in shapes.iter().enumerate() {
            let s = Conv2d::new(batch, (cin, cout), (h, w), (3, 1, 1));
            if !conv3x3::applies(&s) {
                println!("skipped {s:?}: the direct kernel does not run it on this CPU");
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
            let (x, wt, dy) = (
                random(&mut rng, s.in_len()),
                random(&mut rng, s.weight_len()),
                random(&mut rng, s.out_len()),
            );
            let (mut y_direct, mut y_unfolded) =
                (vec![f32::NAN; s.out_len()], vec![0.0; s.out_len()]);
            conv3x3::forward(&s, &x, &wt, &mut y_direct);
            forward(&s, &x, &wt, &mut y_unfolded);
            assert_close("forward", &y_direct, &y_unfolded);

            // Both gradients are accumulated onto what the buffers hold.
            let dx0 = random(&mut rng, s.in_len());
            let dw0 = random(&mut rng, s.weight_len());
            let (mut dx_direct, mut dw_direct) = (dx0.clone(), dw0.clone());
            conv3x3::input_gradient(&s, &wt, &dy, &mut dx_direct);
            conv3x3::weight_gradient(&s, &x, &dy, &mut dw_direct);
            let (mut dx_unfolded, mut dw_unfolded) = (dx0, dw0);
            backward(&s, &x, &wt, &dy, &mut dw_unfolded, Some(&mut dx_unfolded));
            assert_close("input gradient", &dx_direct, &dx_unfolded);
            assert_close("weight gradient", &dw_direct, &dw_unfolded);
            checked += 1;
        }
        println!("{checked} of {} shapes checked", shapes.len());
    }

    /// An empty batch or no channels is no work for any path, and no panic.
    #[test]
    fn empty_convolutions_are_no_work() {
        use crate::engine::{ConvBackward, ConvOps};
        let engine = super::CpuEngine;
        for (batch, cin, cout, k, stride, pad) in [
            (0, 4, 8, 3, 1, 1),
            (2, 0, 8, 3, 1, 1),
            (2, 4, 0, 3, 1, 1),
            (0, 3, 64, 7, 2, 3),
        ] {
            let s = Conv2d::new(batch, (cin, cout), (32, 32), (k, stride, pad));
            let (x, w, dy): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                vec![1.0; s.in_len()],
                vec![1.0; s.weight_len()],
                vec![1.0; s.out_len()],
            );
            let mut y = vec![0.0; s.out_len()];
            engine
                .conv2d_forward(&s, &x[..], &w[..], &mut y[..])
                .unwrap();
            let (mut dw, mut dx) = (vec![0.0; s.weight_len()], vec![0.0; s.in_len()]);
            let grads = ConvBackward::<super::CpuEngine> {
                x: &x[..],
                w: &w[..],
                dy: &dy[..],
                dw: &mut dw[..],
                dx: Some(&mut dx[..]),
            };
            engine.conv2d_backward(&s, grads).unwrap();
            // With no images there is nothing to sum: the weight gradient stays zero.
            assert!(dw.iter().all(|&g| g == 0.0), "{s:?}");
        }
    }

    /// The stem's direct weight gradient against the unfolded product, at crop 64's shape
    /// with 3 images and at a narrower one with an odd height.
    #[test]
    fn direct_stem_weight_gradient_matches_the_unfolded_product() {
        for (seed, (batch, cout, h, w)) in [(3, 64, 64, 64), (2, 5, 37, 63)].into_iter().enumerate()
        {
            let s = Conv2d::new(batch, (3, cout), (h, w), (7, 2, 3));
            if !stem::applies(&s) {
                println!("skipped {s:?}: the direct kernel does not run it on this CPU");
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(10 + seed as u64);
            let (x, wt, dy) = (
                random(&mut rng, s.in_len()),
                random(&mut rng, s.weight_len()),
                random(&mut rng, s.out_len()),
            );
            let dw0 = random(&mut rng, s.weight_len());
            let (mut direct, mut unfolded) = (dw0.clone(), dw0);
            stem::weight_gradient(&s, &x, &dy, &mut direct);
            backward(&s, &x, &wt, &dy, &mut unfolded, None);
            assert_close("stem weight gradient", &direct, &unfolded);
        }
    }
}
