//! The tissue mask: which cells of a slide's overview (mean colours) are tissue.
//!
//! Adaptive by default, per slide: a cell's score is its HSV saturation (stained tissue is
//! coloured, glass is not), or its darkness on a greyscale slide; the scores are smoothed by a
//! median filter (specks and holes smaller than the window go) and thresholded at Otsu's
//! level. Otsu's method splits a histogram into the two classes of largest between-class
//! variance, which on a slide with strongly stained cells, pale stroma and glass is the split
//! between the stain and the rest; so the split is repeated on the lower class while that
//! still holds two classes with distinct means, and the last level found is the boundary
//! between the glass and the palest tissue. Tissue can also be nearly grey (stroma counterstained
//! so faintly that its mean colour has no more saturation than glass) and is then only darker
//! than the glass: so the cells below the saturation level are split once more, by Otsu on
//! their darkness, and the darker class is tissue too when it stands apart. A slide whose
//! saturations show no two classes (blank glass, or tissue throughout) falls back to the fixed
//! thresholds, which `--mask fixed` applies to every slide.

use std::fmt;

use anyhow::{Result, ensure};
use image::RgbImage;
use rayon::prelude::*;

/// How mask cells are told tissue.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaskMethod {
    /// A threshold per slide: Otsu's method on the median-smoothed saturation, then on the
    /// darkness of the unsaturated cells for nearly grey tissue (on the brightness alone for
    /// greyscale slides).
    #[default]
    Adaptive,
    /// --min-saturation and --max-brightness for every slide.
    Fixed,
}

/// The tissue mask's settings (`slam tile`'s flags).
#[derive(clap::Args, Clone, Copy, Debug, PartialEq)]
pub struct TissueSettings {
    /// How mask pixels are told tissue: `adaptive` finds a threshold per slide, `fixed` applies
    /// --min-saturation and --max-brightness.
    #[arg(long = "mask", value_enum, default_value_t = MaskMethod::Adaptive)]
    pub method: MaskMethod,
    /// Fixed mask (and the adaptive mask's fallback for a slide that shows no two classes):
    /// least HSV saturation of a tissue pixel, 0..=1 (the white background has almost none).
    #[arg(long, default_value_t = 0.07)]
    pub min_saturation: f32,
    /// Fixed mask (and the fallback): most HSV brightness of a tissue pixel, 0..=1.
    #[arg(long, default_value_t = 0.92)]
    pub max_brightness: f32,
}

impl Default for TissueSettings {
    fn default() -> Self {
        Self {
            method: MaskMethod::Adaptive,
            min_saturation: 0.07,
            max_brightness: 0.92,
        }
    }
}

/// Greyscale slide: fewer than 1% of its cells have a saturation of this level (of 255) or
/// more, so that saturation says nothing and darkness is scored instead.
const GREY_SATURATION: u8 = 13;
/// Half side of the median filter's window, in cells (a patch is at least 8 cells wide).
const MEDIAN_RADIUS: usize = 2;
/// Least difference of the two classes' mean scores (levels of 255) for a split to count:
/// 6 levels (0.024) of saturation separate glass from pale stroma; darkness varies more over
/// glass (uneven illumination). Chosen on generated slides (docs/TISSUE.md).
const MIN_CONTRAST_SATURATION: f64 = 6.0;
const MIN_CONTRAST_DARKNESS: f64 = 20.0;
/// Least difference of the mean darkness (levels of 255) of grey tissue and glass among the
/// cells below the saturation level: 10 levels (0.04). On a real IHC crop its grey stroma and
/// its empty lumen stand 12 levels apart; the glass of the generated slides (tint drifting,
/// corners darker) splits into classes at most 5 levels apart (docs/TISSUE.md).
const MIN_CONTRAST_GREY_TISSUE: f64 = 10.0;
/// Most mean saturation (levels of 255, 0.1) of a class taken for glass.
const GLASS_MAX_SATURATION: f64 = 26.0;

/// The rule a slide's mask applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskRule {
    /// Smoothed saturation at least `saturation`, or smoothed brightness at most `brightness`
    /// where the cells below that saturation hold grey tissue (adaptive thresholds).
    Saturation {
        saturation: f32,
        brightness: Option<f32>,
    },
    /// Smoothed brightness at most this (an adaptive threshold on a greyscale slide).
    Brightness(f32),
    /// The fixed thresholds; `fallback`: the adaptive mask found no two classes.
    Fixed { fallback: bool },
}

impl fmt::Display for MaskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskRule::Saturation {
                saturation,
                brightness,
            } => {
                write!(f, "saturation >= {saturation:.3}")?;
                match brightness {
                    Some(b) => write!(f, " or brightness <= {b:.3}"),
                    None => Ok(()),
                }
            }
            MaskRule::Brightness(t) => write!(f, "brightness <= {t:.3}"),
            MaskRule::Fixed { fallback: false } => write!(f, "fixed"),
            MaskRule::Fixed { fallback: true } => write!(f, "fixed (one class)"),
        }
    }
}

impl TissueSettings {
    /// Refuses thresholds outside 0..=1, naming the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.min_saturation),
            "--min-saturation {} is outside 0..=1",
            self.min_saturation
        );
        ensure!(
            (0.0..=1.0).contains(&self.max_brightness),
            "--max-brightness {} is outside 0..=1",
            self.max_brightness
        );
        Ok(())
    }

    /// The fixed thresholds' verdict on one colour.
    pub fn is_tissue_fixed(&self, [r, g, b]: [u8; 3]) -> bool {
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let saturation = if max == 0 {
            0.0
        } else {
            f32::from(max - min) / f32::from(max)
        };
        saturation >= self.min_saturation && f32::from(max) / 255.0 <= self.max_brightness
    }

    /// Each cell of the overview, row by row: tissue or not; and the rule applied.
    pub fn mask(&self, overview: &RgbImage) -> (Vec<bool>, MaskRule) {
        let adaptive = self.method == MaskMethod::Adaptive;
        if let Some(found) = adaptive.then(|| adaptive_mask(overview)).flatten() {
            return found;
        }
        let tissue = (overview.pixels())
            .map(|p| self.is_tissue_fixed(p.0))
            .collect();
        (tissue, MaskRule::Fixed { fallback: adaptive })
    }
}

/// HSV saturation in levels of 255.
fn saturation([r, g, b]: [u8; 3]) -> u8 {
    let (max, min) = (u32::from(r.max(g).max(b)), u32::from(r.min(g).min(b)));
    ((max - min) * 255).checked_div(max).unwrap_or(0) as u8
}

/// 255 minus the HSV brightness (the largest channel).
fn darkness([r, g, b]: [u8; 3]) -> u8 {
    255 - r.max(g).max(b)
}

/// The adaptive mask, or `None` when the slide's scores show no two classes.
fn adaptive_mask(overview: &RgbImage) -> Option<(Vec<bool>, MaskRule)> {
    let (width, height) = (overview.width() as usize, overview.height() as usize);
    let saturations: Vec<u8> = overview.pixels().map(|p| saturation(p.0)).collect();
    let coloured = saturations
        .iter()
        .filter(|&&s| s >= GREY_SATURATION)
        .count();
    let grey = coloured * 100 < saturations.len();
    let (scores, min_contrast) = if grey {
        let darkness = overview.pixels().map(|p| darkness(p.0)).collect();
        (darkness, MIN_CONTRAST_DARKNESS)
    } else {
        (saturations, MIN_CONTRAST_SATURATION)
    };
    let smooth = median_filter(&scores, width, height, MEDIAN_RADIUS);
    let split = lowest_split(&histogram(smooth.iter()), min_contrast)?;
    // Glass is nearly colourless: a coloured lowest class means a slide without glass (a crop
    // inside the tissue), whose paler tissue the split would drop.
    if !grey && split.low_mean >= GLASS_MAX_SATURATION {
        return None;
    }
    let level = split.level;
    let mut tissue: Vec<bool> = smooth.iter().map(|&s| usize::from(s) >= level).collect();
    if grey {
        return Some((tissue, MaskRule::Brightness(brightness(level))));
    }
    // Grey tissue among the cells below the saturation level: darker than the glass there.
    let darkness: Vec<u8> = overview.pixels().map(|p| darkness(p.0)).collect();
    let dark = median_filter(&darkness, width, height, MEDIAN_RADIUS);
    let unsaturated = (dark.iter().zip(&tissue)).filter_map(|(d, &t)| (!t).then_some(d));
    let grey_tissue = otsu(&histogram(unsaturated))
        .filter(|split| split.high_mean - split.low_mean >= MIN_CONTRAST_GREY_TISSUE);
    if let Some(split) = grey_tissue {
        for (t, &d) in tissue.iter_mut().zip(&dark) {
            *t |= usize::from(d) >= split.level;
        }
    }
    let rule = MaskRule::Saturation {
        saturation: level as f32 / 255.0,
        brightness: grey_tissue.map(|split| brightness(split.level)),
    };
    Some((tissue, rule))
}

/// The histogram of some levels of 255.
fn histogram<'a>(levels: impl Iterator<Item = &'a u8>) -> [u64; 256] {
    let mut histogram = [0u64; 256];
    for &level in levels {
        histogram[usize::from(level)] += 1;
    }
    histogram
}

/// The brightness (0..1) below a level of darkness.
fn brightness(darkness_level: usize) -> f32 {
    (255 - darkness_level) as f32 / 255.0
}

/// The median of each cell's (2 `radius` + 1)-square window, clipped at the edges.
fn median_filter(values: &[u8], width: usize, height: usize, radius: usize) -> Vec<u8> {
    let mut out = vec![0u8; values.len()];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            let rows = y.saturating_sub(radius)..(y + radius + 1).min(height);
            let mut window = Vec::with_capacity((2 * radius + 1).pow(2));
            for (x, cell) in row.iter_mut().enumerate() {
                let cols = x.saturating_sub(radius)..(x + radius + 1).min(width);
                window.clear();
                for wy in rows.clone() {
                    window.extend_from_slice(&values[wy * width..][cols.clone()]);
                }
                let mid = window.len() / 2;
                *cell = *window.select_nth_unstable(mid).1;
            }
        });
    out
}

/// A split of histogram levels into `..level` and `level..`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Split {
    level: usize,
    low_mean: f64,
    high_mean: f64,
}

/// Otsu's split of a histogram: the level that maximises the between-class variance
/// w0 w1 (mu1 - mu0)^2 of the two classes; `None` with fewer than two occupied levels.
fn otsu(histogram: &[u64]) -> Option<Split> {
    let total: u64 = histogram.iter().sum();
    let sum: f64 = (histogram.iter().enumerate())
        .map(|(level, &n)| level as f64 * n as f64)
        .sum();
    let (mut below, mut below_sum) = (0u64, 0.0);
    let mut best: Option<(f64, Split)> = None;
    for level in 1..histogram.len() {
        below += histogram[level - 1];
        below_sum += (level - 1) as f64 * histogram[level - 1] as f64;
        let above = total - below;
        if below == 0 || above == 0 {
            continue;
        }
        let (low_mean, high_mean) = (below_sum / below as f64, (sum - below_sum) / above as f64);
        let variance = below as f64 * above as f64 * (high_mean - low_mean).powi(2);
        if best.is_none_or(|(v, _)| variance > v) {
            let split = Split {
                level,
                low_mean,
                high_mean,
            };
            best = Some((variance, split));
        }
    }
    best.map(|(_, split)| split)
}

/// The split of the lowest class from the rest: Otsu's split, repeated on the lower class
/// while its two classes' means differ by at least `min_contrast`; `None` when even the first
/// split's do not.
fn lowest_split(histogram: &[u64], min_contrast: f64) -> Option<Split> {
    let mut found = None;
    let mut end = histogram.len();
    while let Some(split) = otsu(&histogram[..end]) {
        if split.high_mean - split.low_mean < min_contrast {
            break;
        }
        found = Some(split);
        end = split.level;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_thresholds() {
        let t = TissueSettings {
            method: MaskMethod::Fixed,
            ..TissueSettings::default()
        };
        assert!(t.is_tissue_fixed([150, 80, 175]));
        assert!(!t.is_tissue_fixed([240, 238, 242]), "white glass");
        assert!(!t.is_tissue_fixed([20, 20, 20]), "black, unsaturated");
        assert!(
            !t.is_tissue_fixed([250, 200, 250]),
            "saturated but too bright"
        );
    }

    /// A histogram with these (level, count) pairs.
    fn counts_at(counts: &[(usize, u64)]) -> [u64; 256] {
        let mut histogram = [0u64; 256];
        for &(level, n) in counts {
            histogram[level] = n;
        }
        histogram
    }

    #[test]
    fn otsu_splits_two_clusters_between_them() {
        let histogram = counts_at(&[(10, 50), (12, 50), (100, 30)]);
        let split = otsu(&histogram).unwrap();
        assert!((13..=100).contains(&split.level), "{split:?}");
        assert_eq!((split.low_mean, split.high_mean), (11.0, 100.0));
        assert_eq!(otsu(&[0, 7, 0]), None, "one occupied level");
    }

    #[test]
    fn the_split_descends_to_the_palest_class() {
        // Glass at 3, pale tissue at 20 (a small class), stain at 150 (the largest).
        let histogram = counts_at(&[(2, 40), (4, 40), (20, 100), (150, 600)]);
        let first = otsu(&histogram).unwrap().level;
        assert!(
            first > 20,
            "plain Otsu puts the pale class with the glass: {first}"
        );
        let split = lowest_split(&histogram, 6.0).unwrap();
        assert!((5..=20).contains(&split.level), "{split:?}");
        assert_eq!(split.low_mean, 3.0);
        // Glass alone (noise of a few levels) shows no two classes.
        let mut glass = [0u64; 256];
        glass[2..9].copy_from_slice(&[5, 30, 80, 100, 70, 30, 4]);
        assert_eq!(lowest_split(&glass, 6.0), None);
    }

    #[test]
    fn median_filter_removes_specks() {
        let mut values = vec![10u8; 7 * 5];
        values[2 * 7 + 3] = 200;
        let smooth = median_filter(&values, 7, 5, 1);
        assert!(smooth.iter().all(|&v| v == 10));
        // A block larger than half the window survives.
        let block: Vec<u8> = (0..49).map(|i| if i % 7 < 4 { 200 } else { 10 }).collect();
        let smooth = median_filter(&block, 7, 7, 1);
        assert_eq!(smooth, block);
    }

    #[test]
    fn greyscale_slides_are_thresholded_on_brightness() {
        // Grey tissue (brightness 120/255) on the left, glass (235) on the right.
        let image = RgbImage::from_fn(40, 20, |x, _| {
            let v = if x < 20 { 120 } else { 235 };
            image::Rgb([v, v, v])
        });
        let (tissue, rule) = TissueSettings::default().mask(&image);
        assert!(matches!(rule, MaskRule::Brightness(t) if t > 120.0 / 255.0 && t < 235.0 / 255.0));
        assert!((0..40 * 20).all(|i| tissue[i] == (i % 40 < 20)));
        // The fixed thresholds see no tissue on a greyscale slide.
        let fixed = TissueSettings {
            method: MaskMethod::Fixed,
            ..TissueSettings::default()
        };
        assert!(fixed.mask(&image).0.iter().all(|&t| !t));
    }

    #[test]
    fn grey_tissue_darker_than_the_glass_is_kept() {
        // Brown stain on the left third, grey stroma (brightness 215/255, saturation 0.01) in
        // the middle, glass (238, 236, 233: saturation 0.02) on the right.
        let image = RgbImage::from_fn(60, 20, |x, y| {
            let n = ((x * 7 + y * 13) % 3) as u8;
            image::Rgb(match x / 20 {
                0 => [160 + n, 120, 90],
                1 => [213 + n, 213, 215],
                _ => [238 - n, 236, 233],
            })
        });
        let (tissue, rule) = TissueSettings::default().mask(&image);
        let MaskRule::Saturation {
            brightness: Some(brightness),
            ..
        } = rule
        else {
            panic!("no brightness level: {rule}");
        };
        assert!(
            brightness > 215.0 / 255.0 && brightness < 236.0 / 255.0,
            "{rule}"
        );
        assert!((0..60 * 20).all(|i| tissue[i] == (i % 60 < 40)));
    }

    #[test]
    fn blank_glass_falls_back_to_the_fixed_thresholds() {
        let image = RgbImage::from_fn(40, 20, |x, y| {
            let n = ((x * 7 + y * 13) % 5) as u8;
            image::Rgb([236 + n, 238, 240 - n])
        });
        let (tissue, rule) = TissueSettings::default().mask(&image);
        assert_eq!(rule, MaskRule::Fixed { fallback: true });
        assert!(tissue.iter().all(|&t| !t));
    }
}
