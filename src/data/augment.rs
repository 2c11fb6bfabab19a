//! The views of docs/METHOD.md section 2 (Views) on the CPU: a u8 HWC RGB patch becomes a
//! normalized f32 CHW image of side `crop`, following torchvision's float-tensor semantics
//! (pixel = u8 / 255, every jitter op clamps to [0, 1]).
//!
//! Order of operations: crop, horizontal flip, the four color-jitter ops in the drawn order,
//! rotation by +90 degrees (counter-clockwise), normalize `(x - mean[c]) / std[c]`.
//!
//! The op functions ([`adjust_brightness`], [`hflip`], ...) are the one-by-one reference;
//! [`render_view`] and [`render_batch`] are the fused path that must equal their composition.
//!
//! Random parameters of a contrastive view come from fixed draw positions of its
//! [`ViewKey`] stream, whatever the outcome of earlier draws (branch-free for a CUDA kernel):
//!
//! | draw | parameter                                                              |
//! |------|------------------------------------------------------------------------|
//! | 0    | `top = below(x, H - crop + 1)`                                         |
//! | 1    | `left = below(x, W - crop + 1)`                                        |
//! | 2    | `flip = unit(x) < flip_p`                                              |
//! | 3    | jitter applied: `unit(x) < jitter_p`                                   |
//! | 4..=6| op order: Fisher-Yates over [Brightness, Contrast, Saturation, Hue]:   |
//! |      | for i = 3, 2, 1 (draws 4, 5, 6): `j = below(x, i + 1)`, swap(i, j)      |
//! | 7    | brightness factor `uniform(x, max(0, 1 - brightness), 1 + brightness)` |
//! | 8    | contrast factor, same form                                             |
//! | 9    | saturation factor, same form                                           |
//! | 10   | hue factor `uniform(x, -hue, hue)`                                     |
//! | 11   | `rotate = unit(x) < rotate_p`                                          |
//!
//! `unit`, `uniform` and `below` are [`unit_f32`], [`uniform_f32`] and [`below`].

use anyhow::{Context, Result, ensure};
use rayon::prelude::*;

use super::rng::{ViewKey, below, uniform_f32, unit_f32};
use super::store::{MAX_PATCH_SIDE, PatchSize};

/// Draws a contrastive view consumes (positions 0..12 of the table above).
pub const CONTRASTIVE_DRAWS: usize = 12;

/// Augmentation settings; the defaults are the published reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct AugmentConfig {
    /// Side of the square view.
    pub crop: usize,
    pub flip_p: f32,
    /// Probability that color jitter is applied at all.
    pub jitter_p: f32,
    /// Jitter strengths as torchvision's ColorJitter takes them.
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub rotate_p: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop: 224,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.1,
            contrast: 0.1,
            saturation: 0.1,
            hue: 0.1,
            rotate_p: 0.8,
            mean: [0.6009, 0.5513, 0.7394],
            std: [0.1982, 0.2448, 0.1076],
        }
    }
}

impl AugmentConfig {
    /// Checks the settings against the size of the patches they will crop.
    pub fn validate(&self, patch: PatchSize) -> Result<()> {
        let max = MAX_PATCH_SIDE as usize;
        ensure!(
            (1..=max).contains(&patch.height) && (1..=max).contains(&patch.width),
            "patch size {patch} is outside 1..={max} pixels per side"
        );
        ensure!(self.crop >= 1, "crop must be at least 1 pixel");
        ensure!(
            self.crop <= patch.height && self.crop <= patch.width,
            "crop {} is larger than the {patch} patches",
            self.crop
        );
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("jitter_p", self.jitter_p),
            ("rotate_p", self.rotate_p),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "{name} = {p} is not a probability in [0, 1]"
            );
        }
        for (name, x) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            ensure!(
                x.is_finite() && x >= 0.0,
                "{name} = {x} must be finite and >= 0 (factors are drawn from [max(0, 1 - {name}), 1 + {name}])"
            );
        }
        ensure!(
            (0.0..=0.5).contains(&self.hue),
            "hue = {} must be in [0, 0.5] (hue factors are drawn from [-hue, hue])",
            self.hue
        );
        for c in 0..3 {
            ensure!(
                self.mean[c].is_finite(),
                "mean[{c}] = {} must be finite",
                self.mean[c]
            );
            ensure!(
                self.std[c].is_finite() && self.std[c] > 0.0,
                "std[{c}] = {} must be finite and > 0",
                self.std[c]
            );
        }
        Ok(())
    }
}

/// One color-jitter op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JitterOp {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}

impl JitterOp {
    /// The order the Fisher-Yates shuffle starts from (torchvision's op indices 0..4).
    pub const ALL: [JitterOp; 4] = [
        JitterOp::Brightness,
        JitterOp::Contrast,
        JitterOp::Saturation,
        JitterOp::Hue,
    ];
}

/// Drawn color jitter: the op order and the four factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    pub order: [JitterOp; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl Jitter {
    fn validate(&self) -> Result<()> {
        for op in JitterOp::ALL {
            ensure!(
                self.order.contains(&op),
                "jitter order {:?} is not a permutation of the four ops",
                self.order
            );
        }
        check_factor("brightness", self.brightness)?;
        check_factor("contrast", self.contrast)?;
        check_factor("saturation", self.saturation)?;
        check_hue(self.hue)
    }
}

/// Everything random about one view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewParams {
    /// Crop window's top-left corner in the patch.
    pub top: usize,
    pub left: usize,
    pub flip: bool,
    /// `None` when color jitter is not applied.
    pub jitter: Option<Jitter>,
    pub rotate: bool,
}

impl ViewParams {
    /// A contrastive view's parameters from draws 0..12 of `key` (table in the module docs).
    pub fn contrastive(cfg: &AugmentConfig, size: PatchSize, key: ViewKey) -> Result<Self> {
        cfg.validate(size)?;
        let d = key.draws::<CONTRASTIVE_DRAWS>()?;
        let mut order = JitterOp::ALL;
        for (i, &x) in (1..4usize).rev().zip(&d[4..7]) {
            order.swap(i, below(x, i as u32 + 1) as usize);
        }
        // ColorJitter's range for a strength x: [max(0, 1 - x), 1 + x].
        let factor =
            |x: u32, strength: f32| uniform_f32(x, (1.0 - strength).max(0.0), 1.0 + strength);
        let jitter = Jitter {
            order,
            brightness: factor(d[7], cfg.brightness),
            contrast: factor(d[8], cfg.contrast),
            saturation: factor(d[9], cfg.saturation),
            hue: uniform_f32(d[10], -cfg.hue, cfg.hue),
        };
        // validate() bounds the sides by MAX_PATCH_SIDE, so the ranges fit in u32.
        Ok(Self {
            top: below(d[0], (size.height - cfg.crop + 1) as u32) as usize,
            left: below(d[1], (size.width - cfg.crop + 1) as u32) as usize,
            flip: unit_f32(d[2]) < cfg.flip_p,
            jitter: (unit_f32(d[3]) < cfg.jitter_p).then_some(jitter),
            rotate: unit_f32(d[11]) < cfg.rotate_p,
        })
    }

    /// torchvision's CenterCrop: offset `round_half_even((side - crop) / 2)` (Python's
    /// `round`), no flip, jitter or rotation.
    pub fn center(cfg: &AugmentConfig, size: PatchSize) -> Result<Self> {
        cfg.validate(size)?;
        Ok(Self {
            top: center_offset(size.height - cfg.crop),
            left: center_offset(size.width - cfg.crop),
            flip: false,
            jitter: None,
            rotate: false,
        })
    }

    fn validate(&self, cfg: &AugmentConfig, size: PatchSize) -> Result<()> {
        ensure!(
            self.top <= size.height - cfg.crop && self.left <= size.width - cfg.crop,
            "crop window {c}x{c} at (top {}, left {}) does not fit the {size} patch",
            self.top,
            self.left,
            c = cfg.crop
        );
        if let Some(jitter) = &self.jitter {
            jitter.validate()?;
        }
        Ok(())
    }
}

/// `round_half_even(diff / 2)`: an odd `diff` rounds `k + 0.5` to the even one of k, k + 1.
fn center_offset(diff: usize) -> usize {
    let half = diff / 2;
    half + (diff % 2 == 1 && half % 2 == 1) as usize
}

/// One view of a batch: which patch of the store and how to render it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewJob {
    pub patch: u32,
    pub params: ViewParams,
}

// ---- per-pixel math, shared by the reference ops and the fused path -------------------------

/// ToTensor: `u8 as f32 / 255` (a division; multiplying by 1/255 differs in the last bit).
const UNIT: [f32; 256] = {
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
fn scale_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for plane in [r, g, b] {
        for x in plane {
            *x = (f * *x).clamp(0.0, 1.0);
        }
    }
}

/// Contrast: blend every value with the grayscale mean `m` of the whole image.
#[inline(always)]
fn contrast_planes(f: f32, m: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for plane in [r, g, b] {
        for x in plane {
            *x = blend(f, *x, m);
        }
    }
}

/// Saturation: blend every pixel with its own grayscale value.
#[inline(always)]
fn saturate_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = gray(*r, *g, *b);
        (*r, *g, *b) = (blend(f, *r, l), blend(f, *g, l), blend(f, *b, l));
    }
}

/// Hue: torchvision's `_rgb2hsv`, `h = (h + f) mod 1`, `_hsv2rgb`, written with float
/// compares and selects only so the loop vectorizes on baseline x86-64 (a CUDA kernel uses
/// the same expressions).
#[inline(always)]
fn hue_planes(f: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
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
fn gray_sum(r: &[f32], g: &[f32], b: &[f32]) -> f64 {
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

fn check_factor(name: &str, f: f32) -> Result<()> {
    ensure!(
        f.is_finite() && f >= 0.0,
        "{name} factor {f} must be finite and >= 0"
    );
    Ok(())
}

fn check_hue(f: f32) -> Result<()> {
    ensure!(
        (-0.5..=0.5).contains(&f),
        "hue factor {f} is not in [-0.5, 0.5]"
    );
    Ok(())
}

/// The three planes of a CHW RGB image.
fn planes(img: &mut [f32]) -> Result<(&mut [f32], &mut [f32], &mut [f32])> {
    ensure!(
        img.len() % 3 == 0,
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

// ---- the fused path ----------------------------------------------------------------------

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
/// the fused equivalent of [`crop_chw`], [`hflip`], the jitter ops in order, [`rot90`] and
/// [`normalize`].
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
        pixels.len() % bytes == 0,
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
