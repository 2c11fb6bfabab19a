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
//!
//! Here: the settings and a view's random parameters; `ops` holds the per-pixel math and the
//! reference ops, `render` the fused path.

mod ops;
mod render;

use anyhow::{Result, ensure};

pub use ops::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, crop_chw, hflip, normalize,
    rot90,
};
use ops::{check_factor, check_hue};
pub use render::{render_batch, render_view};

use super::rng::{ViewKey, below, uniform_f32, unit_f32};
use crate::data::store::{MAX_PATCH_SIDE, PatchSize};

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
