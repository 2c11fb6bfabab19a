//! The fused path: a view rendered in one pass from the u8 patch to normalized CHW, the same
//! bits as the reference ops composed ([`render_view`], and [`render_batch`] for a batch
//! of views in parallel).

use anyhow::{Context, Result, ensure};
use rayon::prelude::*;

use super::ops::{UNIT, contrast_planes, gray_sum, hue_planes, saturate_planes, scale_planes};
use super::{AugmentConfig, Jitter, JitterOp, ViewJob, ViewParams};
use crate::data::store::PatchSize;

/// Pixels processed together: small enough for the stack, long enough to vectorize the ops.
const CHUNK: usize = 64;

/// RGB of up to [`CHUNK`] pixels, as three planes.
struct Chunk {
    r: [f32; CHUNK],
    g: [f32; CHUNK],
    b: [f32; CHUNK],
}

impl Chunk {
    /// Loads `n` pixels of `patch`, the k-th at byte offset `start + k * step`.
    #[inline(always)]
    fn gather(&mut self, patch: &[u8], start: usize, step: isize, n: usize) {
        for k in 0..n {
            let at = start.wrapping_add_signed(k as isize * step);
            self.r[k] = UNIT[patch[at] as usize];
            self.g[k] = UNIT[patch[at + 1] as usize];
            self.b[k] = UNIT[patch[at + 2] as usize];
        }
    }

    #[inline(always)]
    fn planes(&mut self, n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        (&mut self.r[..n], &mut self.g[..n], &mut self.b[..n])
    }

    /// Applies one jitter op; `mean` is the contrast op's grayscale mean.
    #[inline(always)]
    fn apply(&mut self, n: usize, op: JitterOp, jitter: &Jitter, mean: f32) {
        let (r, g, b) = self.planes(n);
        match op {
            JitterOp::Brightness => scale_planes(jitter.brightness, r, g, b),
            JitterOp::Contrast => contrast_planes(jitter.contrast, mean, r, g, b),
            JitterOp::Saturation => saturate_planes(jitter.saturation, r, g, b),
            // Same rule as adjust_hue: factor 0 is the identity.
            JitterOp::Hue if jitter.hue != 0.0 => hue_planes(jitter.hue, r, g, b),
            JitterOp::Hue => {}
        }
    }
}

/// Renders one view into `out` (3 x crop x crop, normalized CHW) from a u8 HWC RGB patch:
/// the fused equivalent of [`crop_chw`](super::crop_chw), [`hflip`](super::hflip), the jitter
/// ops in order, [`rot90`](super::rot90) and [`normalize`](super::normalize).
pub fn render_view(
    patch: &[u8],
    size: PatchSize,
    params: &ViewParams,
    cfg: &AugmentConfig,
    out: &mut [f32],
) -> Result<()> {
    cfg.validate(size)?;
    ensure!(
        patch.len() == size.bytes(),
        "a {size} RGB patch has {} bytes, got {}",
        size.bytes(),
        patch.len()
    );
    let view = 3 * cfg.crop * cfg.crop;
    ensure!(
        out.len() == view,
        "a 3x{c}x{c} view has {view} values, the output holds {}",
        out.len(),
        c = cfg.crop
    );
    params.validate(cfg, size)?;
    render_checked(patch, size, params, cfg, out);
    Ok(())
}

/// Renders `jobs` from a store's whole pixel array (patch `i` at `i * size.bytes()`) into
/// `out`, `jobs.len() x 3 x crop x crop` NCHW, one view per rayon task.
pub fn render_batch(
    pixels: &[u8],
    size: PatchSize,
    jobs: &[ViewJob],
    cfg: &AugmentConfig,
    out: &mut [f32],
) -> Result<()> {
    cfg.validate(size)?;
    let bytes = size.bytes();
    ensure!(
        pixels.len().is_multiple_of(bytes),
        "a pixel array of {} bytes is not a whole number of {size} patches ({bytes} bytes each)",
        pixels.len()
    );
    let patches = pixels.len() / bytes;
    let view = 3 * cfg.crop * cfg.crop;
    ensure!(
        jobs.len().checked_mul(view) == Some(out.len()),
        "{} views of 3x{c}x{c} need {} values, the output holds {}",
        jobs.len(),
        jobs.len() as u128 * view as u128,
        out.len(),
        c = cfg.crop
    );
    for (i, job) in jobs.iter().enumerate() {
        ensure!(
            (job.patch as usize) < patches,
            "view {i} reads patch {} of a pixel array holding {patches}",
            job.patch
        );
        job.params
            .validate(cfg, size)
            .with_context(|| format!("view {i}"))?;
    }
    out.par_chunks_mut(view).zip(jobs).for_each(|(out, job)| {
        let at = job.patch as usize * bytes;
        render_checked(&pixels[at..at + bytes], size, &job.params, cfg, out);
    });
    Ok(())
}

/// The fused render once every length and parameter is checked, 8 lanes wide where the CPU
/// has AVX2: the same f32 operations in the same order (Rust never contracts to FMA), so the
/// same bits as the baseline x86-64 (SSE2) build.
fn render_checked(
    patch: &[u8],
    size: PatchSize,
    params: &ViewParams,
    cfg: &AugmentConfig,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { render_avx2(patch, size, params, cfg, out) };
        return;
    }
    render_fused(patch, size, params, cfg, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn render_avx2(
    patch: &[u8],
    size: PatchSize,
    params: &ViewParams,
    cfg: &AugmentConfig,
    out: &mut [f32],
) {
    render_fused(patch, size, params, cfg, out);
}

/// The fused render's body.
///
/// Geometry is an index map: flip and rotation move pixels without changing them, the
/// jitter ops are per pixel, and contrast's mean is the same over any permutation of the
/// pixels. Composing flip then rotation, output pixel (y, x) reads crop pixel
///   none (y, x), flip (y, c-1-x), rotate (x, c-1-y), both (x, y),
/// so along an output row the source walks a straight line of fixed byte step.
/// With jitter, a pre-pass over the crop computes contrast's mean of the image the ops
/// before contrast leave; the main pass then runs every op per pixel.
#[inline(always)]
fn render_fused(
    patch: &[u8],
    size: PatchSize,
    params: &ViewParams,
    cfg: &AugmentConfig,
    out: &mut [f32],
) {
    let c = cfg.crop;
    let row = size.width * 3;
    let at = |sy: usize, sx: usize| (params.top + sy) * row + (params.left + sx) * 3;
    let line = |y: usize| match (params.flip, params.rotate) {
        (false, false) => (at(y, 0), 3),
        (true, false) => (at(y, c - 1), -3),
        (false, true) => (at(0, c - 1 - y), row as isize),
        (true, true) => (at(0, y), row as isize),
    };
    let (out_r, out_gb) = out.split_at_mut(c * c);
    let (out_g, out_b) = out_gb.split_at_mut(c * c);
    let outs = [out_r, out_g, out_b];

    let Some(jitter) = &params.jitter else {
        // Crop, geometry and normalize only: one table lookup per value.
        let table: [[f32; 256]; 3] =
            std::array::from_fn(|ch| UNIT.map(|v| (v - cfg.mean[ch]) / cfg.std[ch]));
        for (ch, (out, table)) in outs.into_iter().zip(&table).enumerate() {
            for (y, out_row) in out.chunks_exact_mut(c).enumerate() {
                let (start, step) = line(y);
                for (x, v) in out_row.iter_mut().enumerate() {
                    *v = table[patch[start.wrapping_add_signed(x as isize * step) + ch] as usize];
                }
            }
        }
        return;
    };

    let mut px = Chunk {
        r: [0.0; CHUNK],
        g: [0.0; CHUNK],
        b: [0.0; CHUNK],
    };
    let mean = match jitter.order.iter().position(|&op| op == JitterOp::Contrast) {
        Some(k) => {
            let mut sum = 0.0f64;
            for sy in 0..c {
                for x0 in (0..c).step_by(CHUNK) {
                    let n = CHUNK.min(c - x0);
                    px.gather(patch, at(sy, x0), 3, n);
                    for &op in &jitter.order[..k] {
                        px.apply(n, op, jitter, 0.0);
                    }
                    let (r, g, b) = px.planes(n);
                    sum += gray_sum(r, g, b);
                }
            }
            (sum / (c * c) as f64) as f32
        }
        // validate() makes the order a permutation, so contrast is always there.
        None => 0.0,
    };
    let [out_r, out_g, out_b] = outs;
    for y in 0..c {
        let (start, step) = line(y);
        for x0 in (0..c).step_by(CHUNK) {
            let n = CHUNK.min(c - x0);
            px.gather(
                patch,
                start.wrapping_add_signed(x0 as isize * step),
                step,
                n,
            );
            for &op in &jitter.order {
                px.apply(n, op, jitter, mean);
            }
            let dst = y * c + x0..y * c + x0 + n;
            for (ch, (out, src)) in [
                &mut out_r[dst.clone()],
                &mut out_g[dst.clone()],
                &mut out_b[dst],
            ]
            .into_iter()
            .zip([&px.r, &px.g, &px.b])
            .enumerate()
            {
                let (m, s) = (cfg.mean[ch], cfg.std[ch]);
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = (v - m) / s;
                }
            }
        }
    }
}
