//! Whole slides to bags (`slam tile`): every slide image becomes one bag of non-overlapping
//! square patches, taken where a low-resolution tissue mask finds tissue.
//!
//! Formats: plain TIFF (tiled or stripped, classic or BigTIFF; reduced-resolution pages in the
//! IFD chain or in the first page's SubIFDs are its pyramid levels), read chunk by chunk with
//! the `tiff` crate; PNG and JPEG, decoded whole; the vendor formats (SVS, NDPI, MRXS, ...)
//! through OpenSlide with the `openslide` cargo feature.
//!
//! A slide is read in two passes. The mask pass reads the coarsest level that is still fine
//! enough (at least [`MASK_CELLS_PER_PATCH`] cells per patch side) chunk by chunk into an
//! overview of mean colours, whose tissue `tissue` tells (by default with a threshold found
//! per slide). The patch pass then decodes only the chunks under the kept patches, in blocks
//! of about [`UNIT_SIDE`] pixels, in parallel, and the store receives them in a fixed order.
//!
//! Memory: one decoded chunk per worker (a TIFF chunk is at most [`MAX_CHUNK_BYTES`]), the
//! patches of the blocks in flight (at most [`TileOptions::memory_budget`] bytes, or one
//! block), and per slide the overview (about [`MAX_MASK_CELLS`] cells at most) and the list of
//! kept corners. A level-0 image is never decoded whole, except PNG and JPEG slides.
//!
//! Here: the options, reports and the run ([`tile_slides`]). Around it: `discover` finds the
//! slides and their labels ([`find_slides`]), `mask` is the mask pass and each slide's plan
//! (the patches kept, the thumbnail), `tissue` the tissue mask, `write` the patch pass into
//! the store, and `readers` the slide formats behind one interface of chunked levels.

mod discover;
mod mask;
mod readers;
mod tissue;
mod write;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;

pub use discover::{FoundSlides, OPENSLIDE_EXTENSIONS, SlideFile, find_slides};
use mask::{Plan, plan_slide, thumbnail_path};
pub use tissue::{MaskMethod, MaskRule, TissueSettings};
use write::Run;

use crate::data::build::pack::{SkippedImage, check_output};
use crate::data::store::{BagLabel, MAX_PATCH_SIDE, PatchSize, StoreSummary, StoreWriter};

/// Mask cells along a patch side, at least: enough to measure a patch's tissue fraction.
pub const MASK_CELLS_PER_PATCH: f64 = 8.0;
/// Cells of a slide's mask, about at most: larger slides get coarser cells, so that the
/// overview stays small.
pub const MAX_MASK_CELLS: u64 = 1 << 22;
/// Side in pixels of the blocks of patches read together: large enough that few chunks are
/// decoded twice (once for each block they straddle), small enough to share out among workers.
pub const UNIT_SIDE: u64 = 2048;
/// Largest decoded TIFF chunk (tile or strip) accepted; a slide stored as larger strips is
/// refused rather than read whole.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;
/// Longer side of the thumbnails in pixels.
pub const THUMBNAIL_SIDE: u32 = 1024;
/// Default bound on the patch bytes in flight.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;

/// What `slam tile` does.
#[derive(Clone, Debug)]
pub struct TileOptions {
    /// Patch side in pixels at the tiling level.
    pub patch_size: usize,
    /// Pyramid level to tile (0 is full resolution).
    pub level: usize,
    pub tissue: TissueSettings,
    /// Least share of a patch the mask must call tissue, in 0..=1.
    pub min_tissue: f64,
    /// Keep at most this many patches per slide, drawn at random with `seed`.
    pub max_patches: Option<usize>,
    pub seed: u64,
    /// CSV with header `slide,label` (the slide's file stem or name); `None` takes labels from
    /// the folders and file names.
    pub labels: Option<PathBuf>,
    /// Folder for a PNG thumbnail per slide: the mask (background shaded) and the kept patches
    /// outlined.
    pub thumbnails: Option<PathBuf>,
    /// Skip unreadable slides (each is reported) instead of stopping.
    pub skip_bad: bool,
    /// Replace the store and thumbnails that exist.
    pub overwrite: bool,
    /// Patch bytes read ahead of the store at most (at least one block is always read).
    pub memory_budget: usize,
}

impl Default for TileOptions {
    fn default() -> Self {
        Self {
            patch_size: 250,
            level: 0,
            tissue: TissueSettings::default(),
            min_tissue: 0.5,
            max_patches: None,
            seed: 0,
            labels: None,
            thumbnails: None,
            skip_bad: false,
            overwrite: false,
            memory_budget: DEFAULT_MEMORY_BUDGET,
        }
    }
}

impl TileOptions {
    pub fn validate(&self) -> Result<()> {
        let max = MAX_PATCH_SIDE as usize;
        ensure!(
            (1..=max).contains(&self.patch_size),
            "--patch-size {} is outside 1..={max}",
            self.patch_size
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_tissue),
            "--min-tissue {} is outside 0..=1",
            self.min_tissue
        );
        self.tissue.validate()?;
        ensure!(
            self.max_patches != Some(0),
            "--max-patches must be at least 1"
        );
        ensure!(self.memory_budget > 0, "the memory budget must not be zero");
        Ok(())
    }
}

/// What became of one slide.
#[derive(Clone, Debug, PartialEq)]
pub struct SlideReport {
    pub name: String,
    pub path: PathBuf,
    pub label: BagLabel,
    /// Width and height at level 0 and at the tiling level.
    pub level0_size: (u64, u64),
    pub size: (u64, u64),
    pub levels: usize,
    /// Whole patches in the grid at the tiling level.
    pub grid: usize,
    /// Patches with less tissue than `min_tissue`.
    pub background: usize,
    /// Patches with enough tissue left out by `max_patches`.
    pub over_cap: usize,
    pub kept: usize,
    /// The mask came from this level, a cell being `mask_cell` x `mask_cell` of its pixels.
    pub mask_level: usize,
    pub mask_cell: u64,
    /// What told its tissue.
    pub mask_rule: MaskRule,
}

/// What a tiling run wrote and met.
#[derive(Clone, Debug)]
pub struct TileReport {
    pub summary: StoreSummary,
    /// Every slide read, in store order; those with no kept patch have no bag.
    pub slides: Vec<SlideReport>,
    pub skipped: Vec<SkippedImage>,
    pub ignored: usize,
    pub unused_labels: usize,
    /// Area of the slides read, at the tiling level.
    pub megapixels: f64,
    pub seconds: f64,
}

/// How far a run is.
#[derive(Clone, Copy, Debug, Default)]
pub struct TileProgress {
    pub slides_done: usize,
    pub slides: usize,
    pub patches_done: usize,
    /// Patches chosen so far (grows as slides are planned).
    pub patches_planned: usize,
}

/// Tiles every slide of `inputs` into a store at `output`, one bag per slide. Nothing
/// appears at `output` unless the whole run succeeds.
pub fn tile_slides(
    inputs: &[PathBuf],
    output: &Path,
    options: &TileOptions,
    progress: &mut dyn FnMut(&TileProgress),
) -> Result<TileReport> {
    let start = Instant::now();
    options.validate()?;
    check_output(output, options.overwrite)?;
    let found = find_slides(inputs, options.labels.as_deref())?;
    if let Some(dir) = &options.thumbnails {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for slide in &found.slides {
            check_output(&thumbnail_path(dir, slide), options.overwrite)?;
        }
    }
    let mut run = Run {
        writer: StoreWriter::create(output, PatchSize::square(options.patch_size))?,
        spill_dir: match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
        options,
        reports: Vec::new(),
        skipped: Vec::new(),
        bags: 0,
        progress: TileProgress {
            slides: found.slides.len(),
            ..TileProgress::default()
        },
    };
    // Slides are planned a batch at a time so that several are read at once while the plans
    // held (decoders, PNG/JPEG images, kept corners) stay few.
    let batch = rayon::current_num_threads().max(2);
    for (b, slides) in found.slides.chunks(batch).enumerate() {
        let plans: Vec<Result<Plan>> = (slides.par_iter().enumerate())
            .map(|(i, slide)| plan_slide(b * batch + i, slide, options))
            .collect();
        let mut ready = Vec::with_capacity(plans.len());
        for (i, (slide, plan)) in slides.iter().zip(plans).enumerate() {
            match plan {
                Ok(plan) => {
                    run.progress.patches_planned += plan.kept.len();
                    ready.push(plan);
                }
                Err(err) => {
                    run.reject(b * batch + i, slide, err)?;
                    run.progress.slides_done += 1;
                }
            }
        }
        progress(&run.progress);
        run.write(ready, progress)?;
    }
    if run.bags == 0 {
        let read = run.reports.len();
        bail!(
            "no slide gave a patch ({read} read, {} skipped): lower --min-tissue, or look at the mask with --thumbnails (--mask fixed with a lower --min-saturation overrides the adaptive mask)",
            run.skipped.len()
        );
    }
    let megapixels = (run.reports.iter())
        .map(|r| r.size.0 as f64 * r.size.1 as f64 / 1e6)
        .sum();
    run.skipped.sort_by_key(|(index, _)| *index);
    Ok(TileReport {
        summary: run.writer.finish()?,
        slides: run.reports,
        skipped: run.skipped.into_iter().map(|(_, s)| s).collect(),
        ignored: found.ignored,
        unused_labels: found.unused_labels,
        megapixels,
        seconds: start.elapsed().as_secs_f64(),
    })
}
