//! The one-by-one reference of the augmentation: the per-pixel math (shared with the fused
//! path) and the ops on f32 CHW RGB images, each following torchvision's float-tensor
//! semantics.

use anyhow::{Result, ensure};

use crate::data::store::PatchSize;

// ---- per-pixel math, shared by the reference ops and the fused path -------------------------

/// ToTensor: `u8 as f32 / 255` (a division; multiplying by 1/255 differs in the last bit).
pub(super) const UNIT: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as f32 / 255.0;
        i += 1;
    }
    table
};

/// torchvision's `rgb_to_grayscale`: `(0.2989 r + 0.587 g) + 0.114 b`, rounded in f32.
#[inline(always)]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

/// torchvision's `_blend`: `clamp(f x + (1 - f) y, 0, 1)`.
#[inline(always)]
fn blend(f: f32, x: f32, y: f32) -> f32 {
    (f * x + (1.0 - f) * y).clamp(0.0, 1.0)
}

/// Brightness: `clamp(f x)` (a blend with black).
#[inline(always)]
pub(super) fn scale_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for plane in [r, g, b] {
        for x in plane {
            *x = (f * *x).clamp(0.0, 1.0);
        }
    }
}

/// Contrast: blend every value with the grayscale mean `m` of the whole image.
#[inline(always)]
pub(super) fn contrast_planes(f: f32, m: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for plane in [r, g, b] {
        for x in plane {
            *x = blend(f, *x, m);
        }
    }
}

/// Saturation: blend every pixel with its own grayscale value.
#[inline(always)]
pub(super) fn saturate_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = gray(*r, *g, *b);
        (*r, *g, *b) = (blend(f, *r, l), blend(f, *g, l), blend(f, *b, l));
    }
}

/// Hue: torchvision's `_rgb2hsv`, `h = (h + f) mod 1`, `_hsv2rgb`, written with float
/// compares and selects only so the loop vectorizes on baseline x86-64 (a CUDA kernel uses
/// the same expressions).
#[inline(always)]
pub(super) fn hue_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    let n = r.len().min(g.len()).min(b.len());
    let (r, g, b) = (&mut r[..n], &mut g[..n], &mut b[..n]);
    for k in 0..n {
        (r[k], g[k], b[k]) = shift_hue(f, r[k], g[k], b[k]);
    }
}

#[inline(always)]
fn shift_hue(factor: f32, r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    // _rgb2hsv
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let crd = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd);
    // The masks pick exactly one term; 0 stands in for torch's `mask * term` (at most -0).
    let hr = if maxc == r { bc - gc } else { 0.0 };
    let hg = if maxc == g && maxc != r {
        2.0 + rc - bc
    } else {
        0.0
    };
    let hb = if maxc != g && maxc != r {
        4.0 + gc - rc
    } else {
        0.0
    };
    // rc, gc, bc lie in [0, 1], so h in [-1, 5] and h / 6 + 1 in [5/6, 11/6]: there
    // fmod(x, 1) is x - 1 when x >= 1 (exact) and x otherwise.
    let x = (hr + hg + hb) / 6.0 + 1.0;
    let h = if x >= 1.0 { x - 1.0 } else { x };
    // Python's `(h + f) % 1` for h + f in [-0.5, 1.5]: +1 below 0, -1 from 1 on.
    let x = h + factor;
    let h = if x < 0.0 {
        x + 1.0
    } else if x >= 1.0 {
        x - 1.0
    } else {
        x
    };
    // _hsv2rgb. h lies in [0, 1] (x + 1 may round up to 1), so floor(6 h) counts the
    // thresholds 1..=6 that 6 h reaches; sector = floor mod 6 (6 is sector 0, f = 0).
    let v = maxc;
    let h6 = h * 6.0;
    let step = |k: f32| if h6 >= k { 1.0 } else { 0.0 };
    let i = step(1.0) + step(2.0) + step(3.0) + step(4.0) + step(5.0) + step(6.0);
    let f = h6 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    // sector: 0 -> (v, t, p), 1 -> (q, v, p), 2 -> (p, v, t), 3 -> (p, q, v),
    // 4 -> (t, p, v), 5 -> (v, p, q)
    let sector = if i == 6.0 { 0.0 } else { i };
    let r = if sector == 0.0 || sector == 5.0 {
        v
    } else if sector == 1.0 {
        q
    } else if sector == 4.0 {
        t
    } else {
        p
    };
    let g = if sector == 0.0 {
        t
    } else if sector <= 2.0 {
        v
    } else if sector == 3.0 {
        q
    } else {
        p
    };
    let b = if sector <= 1.0 {
        p
    } else if sector == 2.0 {
        t
    } else if sector == 5.0 {
        q
    } else {
        v
    };
    (r, g, b)
}

/// Sum of the grayscale values, in eight f64 running sums (the adds vectorize, and f64
/// keeps the mean of a large image at f32 accuracy).
#[inline(always)]
pub(super) fn gray_sum(r: &[f32], g: &[f32], b: &[f32]) -> f64 {
    let (r8, g8, b8) = (r.chunks_exact(8), g.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = (r8.remainder().iter().zip(g8.remainder()))
        .zip(b8.remainder())
        .map(|((&r, &g), &b)| f64::from(gray(r, g, b)))
        .sum();
    let mut acc = [0.0f64; 8];
    for ((r, g), b) in r8.zip(g8).zip(b8) {
        for k in 0..8 {
            acc[k] += f64::from(gray(r[k], g[k], b[k]));
        }
    }
    acc.iter().sum::<f64>() + tail
}

// ---- reference ops on f32 CHW RGB images -------------------------------------------------

pub(super) fn check_factor(name: &str, f: f32) -> Result<()> {
    ensure!(
        f.is_finite() && f >= 0.0,
        "{name} factor {f} must be finite and >= 0"
    );
    Ok(())
}

pub(super) fn check_hue(f: f32) -> Result<()> {
    ensure!(
        (-0.5..=0.5).contains(&f),
        "hue factor {f} is not in [-0.5, 0.5]"
    );
    Ok(())
}

/// The three planes of a CHW RGB image.
fn planes(img: &mut [f32]) -> Result<(&mut [f32], &mut [f32], &mut [f32])> {
    ensure!(
        img.len().is_multiple_of(3),
        "a CHW RGB image has 3 equal planes; {} values do not split into 3",
        img.len()
    );
    let plane = img.len() / 3;
    let (r, gb) = img.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    Ok((r, g, b))
}

fn check_shape(len: usize, size: PatchSize) -> Result<()> {
    ensure!(
        size.height >= 1 && size.width >= 1,
        "image size {size} has an empty side"
    );
    let want = size
        .height
        .checked_mul(size.width)
        .and_then(|n| n.checked_mul(3));
    ensure!(
        want == Some(len),
        "a 3x{}x{} CHW image has {} values, got {len}",
        size.height,
        size.width,
        3u128 * size.height as u128 * size.width as u128
    );
    Ok(())
}

/// ToTensor of a crop: the `side x side` window at (`top`, `left`) of a u8 HWC RGB patch as
/// f32 CHW, each value `u8 / 255`.
pub fn crop_chw(
    patch: &[u8],
    size: PatchSize,
    top: usize,
    left: usize,
    side: usize,
) -> Result<Vec<f32>> {
    check_shape(patch.len(), size)?;
    ensure!(
        side >= 1 && side <= size.height && side <= size.width,
        "crop side {side} does not fit the {size} patch"
    );
    ensure!(
        top <= size.height - side && left <= size.width - side,
        "crop window {side}x{side} at (top {top}, left {left}) does not fit the {size} patch"
    );
    let mut out = vec![0.0; 3 * side * side];
    for (c, plane) in out.chunks_exact_mut(side * side).enumerate() {
        for (y, row) in plane.chunks_exact_mut(side).enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                *v = UNIT[patch[((top + y) * size.width + left + x) * 3 + c] as usize];
            }
        }
    }
    Ok(out)
}

/// Horizontal flip in place: `out[c][y][x] = in[c][y][W - 1 - x]`.
pub fn hflip(img: &mut [f32], size: PatchSize) -> Result<()> {
    check_shape(img.len(), size)?;
    for row in img.chunks_exact_mut(size.width) {
        row.reverse();
    }
    Ok(())
}

/// Rotation by +90 degrees, counter-clockwise (torchvision/PIL `rotate(90)` on a square):
/// `out[c][y][x] = in[c][x][W - 1 - y]`. An H x W image becomes W x H.
pub fn rot90(img: &[f32], size: PatchSize) -> Result<Vec<f32>> {
    check_shape(img.len(), size)?;
    let (h, w) = (size.height, size.width);
    let mut out = vec![0.0; img.len()];
    for (src, dst) in img.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        for (y, row) in dst.chunks_exact_mut(h).enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                *v = src[x * w + (w - 1 - y)];
            }
        }
    }
    Ok(out)
}

/// torchvision `adjust_brightness`: `clamp(f x)`.
pub fn adjust_brightness(img: &mut [f32], factor: f32) -> Result<()> {
    check_factor("brightness", factor)?;
    let (r, g, b) = planes(img)?;
    scale_planes(factor, r, g, b);
    Ok(())
}

/// torchvision `adjust_contrast`: `clamp(f x + (1 - f) m)` with `m` the mean over the image
/// of its grayscale `0.2989 r + 0.587 g + 0.114 b`.
pub fn adjust_contrast(img: &mut [f32], factor: f32) -> Result<()> {
    check_factor("contrast", factor)?;
    let (r, g, b) = planes(img)?;
    let mean = (gray_sum(r, g, b) / r.len().max(1) as f64) as f32;
    contrast_planes(factor, mean, r, g, b);
    Ok(())
}

/// torchvision `adjust_saturation`: `clamp(f x + (1 - f) gray(pixel))`.
pub fn adjust_saturation(img: &mut [f32], factor: f32) -> Result<()> {
    check_factor("saturation", factor)?;
    let (r, g, b) = planes(img)?;
    saturate_planes(factor, r, g, b);
    Ok(())
}

/// torchvision `adjust_hue`: RGB -> HSV, `h = (h + f) mod 1`, HSV -> RGB, with `f` in
/// [-0.5, 0.5]. A factor of exactly 0 returns the image unchanged, as ColorJitter skips hue
/// when its range is 0 (the round trip would only add rounding).
pub fn adjust_hue(img: &mut [f32], factor: f32) -> Result<()> {
    check_hue(factor)?;
    let (r, g, b) = planes(img)?;
    if factor != 0.0 {
        hue_planes(factor, r, g, b);
    }
    Ok(())
}

/// torchvision `Normalize`: `(x - mean[c]) / std[c]`.
pub fn normalize(img: &mut [f32], mean: [f32; 3], std: [f32; 3]) -> Result<()> {
    ensure!(
        std.iter().all(|&s| s != 0.0),
        "std {std:?} has a zero: normalize would divide by it"
    );
    let (r, g, b) = planes(img)?;
    for ((plane, m), s) in [r, g, b].into_iter().zip(mean).zip(std) {
        for x in plane {
            *x = (*x - m) / s;
        }
    }
    Ok(())
}
