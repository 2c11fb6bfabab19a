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
//! overview of mean colours; pixels with enough saturation and not too bright are tissue. The
//! patch pass then decodes only the chunks under the kept patches, in blocks of about
//! [`UNIT_SIDE`] pixels, in parallel, and the store receives them in a fixed order.
//!
//! Memory: one decoded chunk per worker (a TIFF chunk is at most [`MAX_CHUNK_BYTES`]), the
//! patches of the blocks in flight (at most [`TileOptions::memory_budget`] bytes, or one
//! block), and per slide the overview (about [`MAX_MASK_CELLS`] cells at most) and the list of
//! kept corners. A level-0 image is never decoded whole, except PNG and JPEG slides.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::Tag;

use super::pack::{
    SkippedImage, check_output, find_files, open_image, prefix_label, quoted_list, read_labels,
};
use crate::atomic::write_atomic;
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
/// Pages of a TIFF examined for pyramid levels: bounds the walk over a broken file.
const MAX_PAGES: usize = 64;
/// Chunk side of sources without chunks of their own (PNG, JPEG, OpenSlide).
const BLOCK: u64 = 1024;
/// Chunks decoded together in the mask pass.
const MASK_GROUP_CHUNKS: usize = 64;
const OUTLINE: [u8; 3] = [0, 200, 0];

const TIFF_EXTENSIONS: [&str; 4] = ["tif", "tiff", "btf", "tf8"];
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// Vendor formats OpenSlide reads that are not plain TIFF.
pub const OPENSLIDE_EXTENSIONS: [&str; 8] =
    ["svs", "ndpi", "mrxs", "vms", "vmu", "scn", "bif", "svslide"];

/// Which mask pixels are tissue: stained cells are saturated, the glass background is white.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TissueThresholds {
    /// Least HSV saturation, (max - min) / max of R, G, B, in 0..=1.
    pub min_saturation: f32,
    /// Most HSV brightness, max(R, G, B) / 255, in 0..=1.
    pub max_brightness: f32,
}

impl Default for TissueThresholds {
    fn default() -> Self {
        Self {
            min_saturation: 0.07,
            max_brightness: 0.92,
        }
    }
}

impl TissueThresholds {
    pub fn is_tissue(&self, [r, g, b]: [u8; 3]) -> bool {
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let saturation = if max == 0 {
            0.0
        } else {
            f32::from(max - min) / f32::from(max)
        };
        saturation >= self.min_saturation && f32::from(max) / 255.0 <= self.max_brightness
    }
}

/// What `slam tile` does.
#[derive(Clone, Debug)]
pub struct TileOptions {
    /// Patch side in pixels at the tiling level.
    pub patch_size: usize,
    /// Pyramid level to tile (0 is full resolution).
    pub level: usize,
    pub tissue: TissueThresholds,
    /// Least share of a patch the mask must call tissue, in 0..=1.
    pub min_tissue: f64,
    /// Keep at most this many patches per slide, drawn at random with `seed`.
    pub max_patches: Option<usize>,
    pub seed: u64,
    /// CSV with header `slide,label` (the slide's file stem or name); `None` takes labels from
    /// the folders and file names.
    pub labels: Option<PathBuf>,
    /// Folder for a PNG thumbnail per slide with the kept patches outlined.
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
            tissue: TissueThresholds::default(),
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
        ensure!(
            (0.0..=1.0).contains(&self.tissue.min_saturation),
            "--min-saturation {} is outside 0..=1",
            self.tissue.min_saturation
        );
        ensure!(
            (0.0..=1.0).contains(&self.tissue.max_brightness),
            "--max-brightness {} is outside 0..=1",
            self.tissue.max_brightness
        );
        ensure!(
            self.max_patches != Some(0),
            "--max-patches must be at least 1"
        );
        ensure!(self.memory_budget > 0, "the memory budget must not be zero");
        Ok(())
    }
}

/// A slide to tile: its file, bag name (the file stem) and label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlideFile {
    pub path: PathBuf,
    pub name: String,
    pub label: BagLabel,
}

/// The slides of the inputs.
#[derive(Clone, Debug)]
pub struct FoundSlides {
    /// In the order of the inputs; in natural order of their paths within a folder.
    pub slides: Vec<SlideFile>,
    /// Files in the folders that are not slide images (by extension), or hidden.
    pub ignored: usize,
    /// Rows of the labels file naming no slide.
    pub unused_labels: usize,
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

/// Finds the slides of `inputs` (slide files, or folders searched at any depth) and labels
/// them: from `labels` (CSV `slide,label`, by file stem or name) when given, else from the
/// nearest folder named normal/abnormal (or negative/positive), else from the file name
/// prefix normal_/abnormal_.
pub fn find_slides(inputs: &[PathBuf], labels: Option<&Path>) -> Result<FoundSlides> {
    ensure!(!inputs.is_empty(), "no slides given");
    let mut files: Vec<(PathBuf, Option<BagLabel>)> = Vec::new();
    let mut ignored = 0;
    for input in inputs {
        if input.is_dir() {
            let (found, others) = find_files(input, input, is_slide_name)?;
            ignored += others;
            files.extend(found.into_iter().map(|f| {
                let label = layout_label(Path::new(&f.name));
                (f.path, label)
            }));
        } else {
            ensure!(input.exists(), "{} does not exist", input.display());
            // Only the slide's own folder counts: folders further up say nothing of it.
            let own = input.iter().rev().take(2).collect::<Vec<_>>();
            let own: PathBuf = own.into_iter().rev().collect();
            files.push((input.clone(), layout_label(&own)));
        }
    }
    let shown: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    ensure!(
        !files.is_empty(),
        "no slide images in {} (TIFF, PNG, JPEG or the OpenSlide formats {})",
        shown.join(", "),
        OPENSLIDE_EXTENSIONS.join(", ")
    );

    let mut by_name: HashMap<String, &Path> = HashMap::new();
    for (path, _) in &files {
        let name = stem(path)?;
        if let Some(before) = by_name.insert(name.clone(), path) {
            bail!(
                "slides {} and {} would both be bag {name:?}: bag names (file stems) must be unique",
                before.display(),
                path.display()
            );
        }
    }

    let mut slides = Vec::with_capacity(files.len());
    let mut unlabelled = Vec::new();
    let mut unused_labels = 0;
    match labels {
        Some(csv) => {
            let table = read_labels(csv, "slide")?;
            let mut used = HashSet::new();
            for (path, _) in &files {
                let name = stem(path)?;
                let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let key = [Some(name.clone()), file_name]
                    .into_iter()
                    .flatten()
                    .find(|k| table.contains_key(k));
                match key {
                    Some(key) => {
                        slides.push(SlideFile {
                            path: path.clone(),
                            name,
                            label: table[&key],
                        });
                        used.insert(key);
                    }
                    None => unlabelled.push(path.display().to_string()),
                }
            }
            ensure!(
                unlabelled.is_empty(),
                "{} has no row for slide(s) {}; every slide needs a label",
                csv.display(),
                quoted_list(&unlabelled.iter().collect::<Vec<_>>())
            );
            unused_labels = table.len() - used.len();
        }
        None => {
            for (path, label) in files {
                match label {
                    Some(label) => slides.push(SlideFile {
                        name: stem(&path)?,
                        path,
                        label,
                    }),
                    None => unlabelled.push(path.display().to_string()),
                }
            }
            ensure!(
                unlabelled.is_empty(),
                "cannot tell the label of slide(s) {}: put them in folders normal/ and abnormal/, name them normal_*/abnormal_*, or label them with --labels slides.csv (header slide,label)",
                quoted_list(&unlabelled.iter().collect::<Vec<_>>())
            );
        }
    }
    Ok(FoundSlides {
        slides,
        ignored,
        unused_labels,
    })
}

fn is_slide_name(path: &Path) -> bool {
    let ext = extension(path);
    TIFF_EXTENSIONS
        .iter()
        .chain(&IMAGE_EXTENSIONS)
        .chain(&OPENSLIDE_EXTENSIONS)
        .any(|e| *e == ext)
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn stem(path: &Path) -> Result<String> {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))
}

/// The label the layout gives a slide: its nearest folder named for a label, else its name.
fn layout_label(path: &Path) -> Option<BagLabel> {
    let folders = path.parent().into_iter().flat_map(|p| p.components().rev());
    let by_folder = folders
        .filter_map(
            |c| match c.as_os_str().to_string_lossy().to_lowercase().as_str() {
                "normal" | "negative" => Some(BagLabel::Normal),
                "abnormal" | "positive" => Some(BagLabel::Abnormal),
                _ => None,
            },
        )
        .next();
    by_folder.or_else(|| prefix_label(&path.file_name()?.to_string_lossy()))
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
            "no slide gave a patch ({read} read, {} skipped): lower --min-tissue or --min-saturation, or look at the mask with --thumbnails",
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

fn thumbnail_path(dir: &Path, slide: &SlideFile) -> PathBuf {
    dir.join(format!("{}.png", slide.name))
}

/// A slide read and its patches chosen, ready for the patch pass.
struct Plan {
    /// The slide's place in the input.
    index: usize,
    slide: SlideFile,
    reader: Box<dyn LevelReader>,
    /// Level-0 pixels per tiling-level pixel, across and down.
    scale: (f64, f64),
    file_name: String,
    /// Top-left corners of the kept patches at the tiling level, in store order.
    kept: Vec<(u64, u64)>,
    /// The blocks of `kept` read together, in order.
    units: Vec<Range<usize>>,
    report: SlideReport,
    thumbnail: Option<PathBuf>,
}

impl Plan {
    /// The patch's source name: the slide file and its corner in level-0 pixels.
    fn source(&self, (x, y): (u64, u64)) -> String {
        let (x0, y0) = (
            (x as f64 * self.scale.0).round() as u64,
            (y as f64 * self.scale.1).round() as u64,
        );
        format!("{}@{x0},{y0}", self.file_name)
    }
}

fn plan_slide(index: usize, slide: &SlideFile, options: &TileOptions) -> Result<Plan> {
    let source = open_slide(&slide.path)?;
    let levels = source.levels();
    let level = options.level;
    ensure!(
        level < levels.len(),
        "--level {level} does not exist: the slide has {} level(s) ({})",
        levels.len(),
        levels
            .iter()
            .map(|d| format!("{}x{}", d.width, d.height))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (base, dims) = (levels[0], levels[level]);
    let side = options.patch_size as u64;
    let (cols, rows) = (dims.width / side, dims.height / side);

    let reader = source.open_level(level)?;
    let (mask_level, cell) = mask_source(levels, level, side);
    let overview = if mask_level == level {
        overview(&*reader, cell)?
    } else {
        overview(&*source.open_level(mask_level)?, cell)?
    };
    let tissue: Vec<bool> = (overview.pixels())
        .map(|p| options.tissue.is_tissue(p.0))
        .collect();
    let mask = levels[mask_level];
    // Mask cells per tiling-level pixel.
    let per_pixel = (
        mask.width as f64 / (dims.width as f64 * cell as f64),
        mask.height as f64 / (dims.height as f64 * cell as f64),
    );
    let cells = (overview.width() as usize, overview.height() as usize);
    let mut kept: Vec<(u64, u64)> = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            let (x, y) = (c * side, r * side);
            let span = |start: u64, scale: f64| start as f64 * scale..(start + side) as f64 * scale;
            let fraction =
                tissue_fraction(&tissue, cells, span(x, per_pixel.0), span(y, per_pixel.1));
            if fraction >= options.min_tissue {
                kept.push((x, y));
            }
        }
    }
    let grid = (cols * rows) as usize;
    let with_tissue = kept.len();
    if let Some(max) = options.max_patches.filter(|&m| m < kept.len()) {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ fnv1a(&slide.name));
        let mut picked = rand::seq::index::sample(&mut rng, kept.len(), max).into_vec();
        picked.sort_unstable();
        kept = picked.into_iter().map(|i| kept[i]).collect();
    }

    // Blocks of patches read together. A strip spans the level's width, so for strips a block
    // is a row of patches (each strip is then decoded about once); otherwise it is square.
    let (block_w, block_h) = if reader.chunk_size().0 >= dims.width {
        (cols.max(1), 1)
    } else {
        let n = (UNIT_SIDE / side).max(1);
        (n, n)
    };
    let block = |&(x, y): &(u64, u64)| (y / side / block_h, x / side / block_w);
    kept.sort_by_key(|corner| (block(corner), corner.1, corner.0));
    let mut units = Vec::new();
    let mut first = 0;
    for i in 1..=kept.len() {
        if i == kept.len() || block(&kept[i]) != block(&kept[first]) {
            units.push(first..i);
            first = i;
        }
    }

    let scale = (
        base.width as f64 / dims.width as f64,
        base.height as f64 / dims.height as f64,
    );
    let thumbnail = match &options.thumbnails {
        Some(dir) => {
            let path = thumbnail_path(dir, slide);
            let image = thumbnail(&overview, base, &kept, scale, side);
            let mut png = Vec::new();
            image
                .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
                .context("cannot encode the thumbnail")?;
            write_atomic(&path, &png)?;
            Some(path)
        }
        None => None,
    };
    Ok(Plan {
        report: SlideReport {
            name: slide.name.clone(),
            path: slide.path.clone(),
            label: slide.label,
            level0_size: (base.width, base.height),
            size: (dims.width, dims.height),
            levels: levels.len(),
            grid,
            background: grid - with_tissue,
            over_cap: with_tissue - kept.len(),
            kept: kept.len(),
            mask_level,
            mask_cell: cell,
        },
        file_name: (slide.path.file_name())
            .map_or_else(|| slide.name.clone(), |n| n.to_string_lossy().into_owned()),
        index,
        slide: slide.clone(),
        reader,
        scale,
        kept,
        units,
        thumbnail,
    })
}

/// FNV-1a of a name: a per-slide sampling stream that does not depend on the other slides.
fn fnv1a(text: &str) -> u64 {
    (text.bytes()).fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The level the mask is computed from and the side of a mask cell in its pixels: the
/// coarsest level whose pixels are no larger than the wanted cell, binned further to it.
fn mask_source(levels: &[Dims], level: usize, side: u64) -> (usize, u64) {
    let (base, dims) = (levels[0], levels[level]);
    let area = dims.width as f64 * dims.height as f64;
    // Wanted cell side in tiling-level pixels, then in level-0 pixels.
    let cell = (side as f64 / MASK_CELLS_PER_PATCH)
        .max((area / MAX_MASK_CELLS as f64).sqrt().ceil())
        .max(1.0);
    let wanted = cell * base.width as f64 / dims.width as f64;
    let downsample = |d: &Dims| base.width as f64 / d.width as f64;
    // Levels are largest first, so those from `level` on are at most as fine as it is; the
    // tiling level itself always qualifies.
    let (mask, d) = (levels.iter().enumerate().skip(level))
        .rfind(|(_, d)| downsample(d) <= wanted * (1.0 + 1e-9))
        .map_or((level, dims), |(i, d)| (i, *d));
    (mask, ((wanted / downsample(&d)).floor() as u64).max(1))
}

/// The share of a rectangle (in mask cells, fractional) covered by tissue cells.
fn tissue_fraction(
    tissue: &[bool],
    (width, height): (usize, usize),
    x: Range<f64>,
    y: Range<f64>,
) -> f64 {
    let area = (x.end - x.start) * (y.end - y.start);
    let cells = |r: &Range<f64>, n: usize| {
        (r.start.floor().max(0.0) as usize)..(r.end.ceil().max(0.0) as usize).min(n)
    };
    let overlap = |r: &Range<f64>, i: usize| r.end.min(i as f64 + 1.0) - r.start.max(i as f64);
    let mut covered = 0.0;
    for j in cells(&y, height) {
        let h = overlap(&y, j);
        for i in cells(&x, width) {
            if tissue[j * width + i] {
                covered += overlap(&x, i) * h;
            }
        }
    }
    covered / area
}

/// The overview scaled to fit [`THUMBNAIL_SIDE`], with each kept patch outlined.
fn thumbnail(
    overview: &RgbImage,
    base: Dims,
    kept: &[(u64, u64)],
    scale: (f64, f64),
    side: u64,
) -> RgbImage {
    let s = (f64::from(THUMBNAIL_SIDE) / base.width.max(base.height) as f64).min(1.0);
    let size = |n: u64| ((n as f64 * s).round() as u32).max(1);
    let (width, height) = (size(base.width), size(base.height));
    let mut image = image::imageops::resize(
        overview,
        width,
        height,
        image::imageops::FilterType::Triangle,
    );
    let at = |v: u64, scale: f64, n: u32| ((v as f64 * scale * s) as u32).min(n - 1);
    for &(x, y) in kept {
        let (x0, y0) = (at(x, scale.0, width), at(y, scale.1, height));
        let (x1, y1) = (
            at(x + side, scale.0, width).max(x0),
            at(y + side, scale.1, height).max(y0),
        );
        for px in x0..=x1 {
            image.put_pixel(px, y0, image::Rgb(OUTLINE));
            image.put_pixel(px, y1, image::Rgb(OUTLINE));
        }
        for py in y0..=y1 {
            image.put_pixel(x0, py, image::Rgb(OUTLINE));
            image.put_pixel(x1, py, image::Rgb(OUTLINE));
        }
    }
    image
}

/// The store being written and the tally of the slides.
struct Run<'a> {
    writer: StoreWriter,
    spill_dir: PathBuf,
    options: &'a TileOptions,
    reports: Vec<SlideReport>,
    /// With the slide's place in the input, to list them in input order.
    skipped: Vec<(usize, SkippedImage)>,
    bags: usize,
    progress: TileProgress,
}

/// Where the patches of a slide go while it is read.
enum Bag {
    /// Straight into the store (a failure stops the run, so no bag is left half written).
    Store,
    /// Into a temporary file, copied into the store once the whole slide has been read, so
    /// that a slide failing midway can still be left out (`skip_bad`).
    Spill(BufWriter<File>),
    Failed,
}

impl Run<'_> {
    /// Records a slide that cannot be tiled, or returns the error that stops the run.
    fn reject(&mut self, index: usize, slide: &SlideFile, err: anyhow::Error) -> Result<()> {
        if !self.options.skip_bad {
            return Err(err.context(format!(
                "cannot tile slide {} (--skip-bad skips such files)",
                slide.path.display()
            )));
        }
        let skipped = SkippedImage {
            path: slide.path.clone(),
            reason: format!("{err:#}"),
        };
        self.skipped.push((index, skipped));
        Ok(())
    }

    /// The patch pass over planned slides: blocks are read in parallel, a budget's worth at
    /// a time, and handed to the store in plan order.
    fn write(&mut self, plans: Vec<Plan>, progress: &mut dyn FnMut(&TileProgress)) -> Result<()> {
        let side = self.options.patch_size;
        let patch_bytes = PatchSize::square(side).bytes();
        let units: Vec<(usize, Range<usize>)> = (plans.iter().enumerate())
            .flat_map(|(p, plan)| plan.units.iter().map(move |u| (p, u.clone())))
            .collect();
        let mut remaining: Vec<usize> = plans.iter().map(|p| p.units.len()).collect();
        let mut bags: Vec<Option<Bag>> = plans.iter().map(|_| None).collect();
        // A slide without tissue gets no bag but is reported.
        self.progress.slides_done += plans.iter().filter(|p| p.units.is_empty()).count();
        let mut next = 0;
        while next < units.len() {
            let mut end = next + 1;
            let mut bytes = units[next].1.len() * patch_bytes;
            while end < units.len() {
                bytes += units[end].1.len() * patch_bytes;
                if bytes > self.options.memory_budget {
                    break;
                }
                end += 1;
            }
            let failed: Vec<bool> = bags
                .iter()
                .map(|b| matches!(b, Some(Bag::Failed)))
                .collect();
            let results: Vec<Option<Result<Vec<Vec<u8>>>>> = units[next..end]
                .par_iter()
                .map(|(p, range)| {
                    let plan = &plans[*p];
                    (!failed[*p]).then(|| read_unit(&*plan.reader, &plan.kept[range.clone()], side))
                })
                .collect();
            for ((p, range), result) in units[next..end].iter().zip(results) {
                let plan = &plans[*p];
                if let Some(result) = result {
                    self.take(plan, &mut bags[*p], &plan.kept[range.clone()], result)?;
                }
                remaining[*p] -= 1;
                if remaining[*p] == 0 {
                    self.finish_bag(plan, &mut bags[*p])?;
                }
            }
            next = end;
            progress(&self.progress);
        }
        for (plan, bag) in plans.iter().zip(&bags) {
            if !matches!(bag, Some(Bag::Failed)) {
                self.reports.push(plan.report.clone());
            }
        }
        Ok(())
    }

    /// Takes one block's patches (or its error) for `plan`'s bag.
    fn take(
        &mut self,
        plan: &Plan,
        bag: &mut Option<Bag>,
        corners: &[(u64, u64)],
        result: Result<Vec<Vec<u8>>>,
    ) -> Result<()> {
        if matches!(bag, Some(Bag::Failed)) {
            // Blocks read alongside the one that failed.
            return Ok(());
        }
        let patches = match result {
            Ok(patches) => patches,
            Err(err) => {
                self.reject(plan.index, &plan.slide, err)?;
                if let Some(path) = &plan.thumbnail {
                    // The thumbnail of a skipped slide would show patches the store lacks.
                    let _ = fs::remove_file(path);
                }
                *bag = Some(Bag::Failed);
                return Ok(());
            }
        };
        if bag.is_none() {
            *bag = Some(if self.options.skip_bad {
                let file = tempfile::tempfile_in(&self.spill_dir).with_context(|| {
                    format!(
                        "cannot create a temporary file in {}",
                        self.spill_dir.display()
                    )
                })?;
                Bag::Spill(BufWriter::with_capacity(1 << 20, file))
            } else {
                self.writer.begin_bag(&plan.slide.name, plan.slide.label)?;
                Bag::Store
            });
        }
        match bag {
            Some(Bag::Store) => {
                for (pixels, &corner) in patches.iter().zip(corners) {
                    self.writer.push_patch(pixels, None, &plan.source(corner))?;
                }
            }
            Some(Bag::Spill(file)) => {
                for pixels in &patches {
                    file.write_all(pixels)
                        .context("cannot write a temporary file")?;
                }
            }
            _ => {}
        }
        self.progress.patches_done += patches.len();
        Ok(())
    }

    /// Closes a slide whose blocks have all been taken.
    fn finish_bag(&mut self, plan: &Plan, bag: &mut Option<Bag>) -> Result<()> {
        self.progress.slides_done += 1;
        match bag.take() {
            Some(Bag::Store) => {}
            Some(Bag::Spill(file)) => {
                let mut file = file
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .context("cannot write a temporary file")?;
                file.seek(SeekFrom::Start(0))?;
                let mut reader = BufReader::with_capacity(1 << 20, file);
                let mut pixels = vec![0; PatchSize::square(self.options.patch_size).bytes()];
                self.writer.begin_bag(&plan.slide.name, plan.slide.label)?;
                for &corner in &plan.kept {
                    reader
                        .read_exact(&mut pixels)
                        .context("cannot read back a temporary file")?;
                    self.writer
                        .push_patch(&pixels, None, &plan.source(corner))?;
                }
            }
            failed @ Some(Bag::Failed) => {
                *bag = failed;
                return Ok(());
            }
            None => return Ok(()),
        }
        self.bags += 1;
        Ok(())
    }
}

/// The patches with top-left corners `corners` (side `side`), decoding each chunk under them
/// once.
fn read_unit(level: &dyn LevelReader, corners: &[(u64, u64)], side: usize) -> Result<Vec<Vec<u8>>> {
    let side64 = side as u64;
    let (cw, ch) = level.chunk_size();
    let mut chunks = BTreeSet::new();
    for &(x, y) in corners {
        for cy in y / ch..=(y + side64 - 1) / ch {
            for cx in x / cw..=(x + side64 - 1) / cw {
                chunks.insert((cy, cx));
            }
        }
    }
    let mut patches = vec![vec![0u8; side * side * 3]; corners.len()];
    let mut buffer = Vec::new();
    for (cy, cx) in chunks {
        level.read_chunk(cx, cy, &mut buffer)?;
        let chunk = level.chunk_rect(cx, cy);
        for (patch, &(x, y)) in patches.iter_mut().zip(corners) {
            let Some(common) = chunk.intersect(&Rect::new(x, y, side64, side64)) else {
                continue;
            };
            let len = common.w as usize * 3;
            for row in common.y..common.bottom() {
                let from = (((row - chunk.y) * chunk.w + common.x - chunk.x) * 3) as usize;
                let to = (((row - y) * side64 + common.x - x) * 3) as usize;
                patch[to..to + len].copy_from_slice(&buffer[from..from + len]);
            }
        }
    }
    Ok(patches)
}

/// The mean colours of `cell` x `cell` squares of a level (the last row and column of cells
/// may be smaller), read chunk by chunk: groups of chunks are decoded in parallel and their
/// cell sums merged into the rows of cells still open.
fn overview(level: &dyn LevelReader, cell: u64) -> Result<RgbImage> {
    let dims = level.dims();
    let (width, height) = (dims.width.div_ceil(cell), dims.height.div_ceil(cell));
    let w = width as usize;
    let mut image = RgbImage::new(width as u32, height as u32);
    let (across, down) = level.grid();
    let (_, ch) = level.chunk_size();
    let rows_per_group = (MASK_GROUP_CHUNKS as u64 / across).max(1);
    // Sums of the cell rows from `open_row` on.
    let mut sums: Vec<[u64; 3]> = Vec::new();
    let mut open_row = 0;
    for first in (0..down).step_by(rows_per_group as usize) {
        let last = (first + rows_per_group).min(down);
        let chunks: Vec<(u64, u64)> = (first..last)
            .flat_map(|cy| (0..across).map(move |cx| (cx, cy)))
            .collect();
        let partials = chunks
            .par_iter()
            .map(|&(cx, cy)| cell_sums(level, cx, cy, cell))
            .collect::<Result<Vec<_>>>()?;
        let read_to = (last * ch).min(dims.height);
        let rows_touched = (read_to - 1) / cell + 1;
        sums.resize((rows_touched - open_row) as usize * w, [0; 3]);
        for part in partials {
            for (j, row) in part.sums.chunks_exact(part.width).enumerate() {
                let at = ((part.top + j as u64 - open_row) as usize) * w + part.left as usize;
                for (acc, add) in sums[at..at + part.width].iter_mut().zip(row) {
                    for c in 0..3 {
                        acc[c] += add[c];
                    }
                }
            }
        }
        // Rows whose pixels have all been read are final.
        let done = if read_to == dims.height {
            height
        } else {
            read_to / cell
        };
        for r in open_row..done {
            let cell_h = ((r + 1) * cell).min(dims.height) - r * cell;
            let row = &sums[(r - open_row) as usize * w..][..w];
            for (c, sum) in row.iter().enumerate() {
                let cell_w = ((c as u64 + 1) * cell).min(dims.width) - c as u64 * cell;
                let n = cell_w * cell_h;
                let mean = sum.map(|s| ((s + n / 2) / n) as u8);
                image.put_pixel(c as u32, r as u32, image::Rgb(mean));
            }
        }
        sums.drain(..(done - open_row) as usize * w);
        open_row = done;
    }
    Ok(image)
}

/// Colour sums of the cells one chunk touches.
struct CellSums {
    left: u64,
    top: u64,
    width: usize,
    sums: Vec<[u64; 3]>,
}

fn cell_sums(level: &dyn LevelReader, cx: u64, cy: u64, cell: u64) -> Result<CellSums> {
    let mut pixels = Vec::new();
    level.read_chunk(cx, cy, &mut pixels)?;
    let rect = level.chunk_rect(cx, cy);
    let (left, top) = (rect.x / cell, rect.y / cell);
    let width = ((rect.right() - 1) / cell - left + 1) as usize;
    let height = ((rect.bottom() - 1) / cell - top + 1) as usize;
    let mut sums = vec![[0u64; 3]; width * height];
    // Columns where each cell's run of pixels starts within the chunk row.
    let runs: Vec<(usize, Range<usize>)> = (0..width)
        .map(|i| {
            let start = ((left + i as u64) * cell).max(rect.x) - rect.x;
            let end = ((left + i as u64 + 1) * cell).min(rect.right()) - rect.x;
            (i, start as usize * 3..end as usize * 3)
        })
        .collect();
    for (y, row) in pixels.chunks_exact(rect.w as usize * 3).enumerate() {
        let j = ((rect.y + y as u64) / cell - top) as usize;
        for (i, run) in &runs {
            let acc = &mut sums[j * width + i];
            for px in row[run.clone()].chunks_exact(3) {
                acc[0] += u64::from(px[0]);
                acc[1] += u64::from(px[1]);
                acc[2] += u64::from(px[2]);
            }
        }
    }
    Ok(CellSums {
        left,
        top,
        width,
        sums,
    })
}

/// A rectangle of pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rect {
    x: u64,
    y: u64,
    w: u64,
    h: u64,
}

impl Rect {
    fn new(x: u64, y: u64, w: u64, h: u64) -> Self {
        Self { x, y, w, h }
    }

    fn right(&self) -> u64 {
        self.x + self.w
    }

    fn bottom(&self) -> u64 {
        self.y + self.h
    }

    fn intersect(&self, other: &Rect) -> Option<Rect> {
        let (x, y) = (self.x.max(other.x), self.y.max(other.y));
        let (right, bottom) = (
            self.right().min(other.right()),
            self.bottom().min(other.bottom()),
        );
        (x < right && y < bottom).then(|| Rect::new(x, y, right - x, bottom - y))
    }
}

/// Size of a resolution level in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    width: u64,
    height: u64,
}

/// A slide: its resolution levels, largest first.
trait SlideSource {
    fn levels(&self) -> &[Dims];
    fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>>;
}

/// One resolution level read as a grid of chunks (TIFF tiles or strips, or blocks). Readers
/// are shared by the workers.
trait LevelReader: Send + Sync {
    fn dims(&self) -> Dims;
    /// Nominal chunk size; the chunks of the last column and row are clipped to the level.
    fn chunk_size(&self) -> (u64, u64);
    /// Chunk (`cx`, `cy`) as 8-bit RGB rows of its clipped width, into `out`.
    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()>;

    /// Chunks across and down.
    fn grid(&self) -> (u64, u64) {
        let ((cw, ch), dims) = (self.chunk_size(), self.dims());
        (dims.width.div_ceil(cw), dims.height.div_ceil(ch))
    }

    fn chunk_rect(&self, cx: u64, cy: u64) -> Rect {
        let ((cw, ch), dims) = (self.chunk_size(), self.dims());
        let (x, y) = (cx * cw, cy * ch);
        Rect::new(x, y, cw.min(dims.width - x), ch.min(dims.height - y))
    }
}

/// Opens a slide by its format: OpenSlide's vendor formats by extension, TIFF, PNG and
/// JPEG by content.
fn open_slide(path: &Path) -> Result<Box<dyn SlideSource>> {
    let ext = extension(path);
    if OPENSLIDE_EXTENSIONS.contains(&ext.as_str()) {
        return open_vendor(path, &ext);
    }
    let mut head = Vec::with_capacity(4);
    File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .context("cannot open it")?;
    let tiff_magic = [b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"]
        .iter()
        .any(|m| head == m[..]);
    if tiff_magic || TIFF_EXTENSIONS.contains(&ext.as_str()) {
        return Ok(Box::new(TiffSlide::open(path)?));
    }
    let image = open_image(path)?.into_rgb8();
    ensure!(
        image.width() > 0 && image.height() > 0,
        "the image is empty"
    );
    Ok(Box::new(MemorySlide {
        dims: [Dims {
            width: u64::from(image.width()),
            height: u64::from(image.height()),
        }],
        image: Arc::new(image),
    }))
}

#[cfg(not(feature = "openslide"))]
fn open_vendor(_path: &Path, ext: &str) -> Result<Box<dyn SlideSource>> {
    bail!(
        ".{ext} slides are read through OpenSlide, which this build of slam leaves out: rebuild with `cargo build --release --features openslide` (needs the OpenSlide C library, e.g. `apt-get install libopenslide-dev`), or convert the slide to a pyramidal TIFF"
    )
}

#[cfg(feature = "openslide")]
fn open_vendor(path: &Path, _ext: &str) -> Result<Box<dyn SlideSource>> {
    Ok(Box::new(vendor::VendorSlide::open(path)?))
}

/// A PNG or JPEG slide, decoded whole; read in blocks like the chunks of a TIFF.
struct MemorySlide {
    dims: [Dims; 1],
    image: Arc<RgbImage>,
}

impl SlideSource for MemorySlide {
    fn levels(&self) -> &[Dims] {
        &self.dims
    }

    fn open_level(&self, _level: usize) -> Result<Box<dyn LevelReader>> {
        Ok(Box::new(MemoryLevel(self.image.clone())))
    }
}

struct MemoryLevel(Arc<RgbImage>);

impl LevelReader for MemoryLevel {
    fn dims(&self) -> Dims {
        Dims {
            width: u64::from(self.0.width()),
            height: u64::from(self.0.height()),
        }
    }

    fn chunk_size(&self) -> (u64, u64) {
        (BLOCK, BLOCK)
    }

    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
        let rect = self.chunk_rect(cx, cy);
        let stride = self.0.width() as usize * 3;
        out.clear();
        for row in self
            .0
            .as_raw()
            .chunks_exact(stride)
            .skip(rect.y as usize)
            .take(rect.h as usize)
        {
            out.extend_from_slice(&row[rect.x as usize * 3..rect.right() as usize * 3]);
        }
        Ok(())
    }
}

/// The 8-bit pixel layouts read from TIFF pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pixels {
    Rgb,
    Rgba,
    Gray,
    /// JPEG-compressed pages store YCbCr, which the decoder leaves as it is.
    YCbCr,
}

impl Pixels {
    fn of(color: tiff::ColorType) -> Option<Self> {
        match color {
            tiff::ColorType::RGB(8) => Some(Pixels::Rgb),
            tiff::ColorType::RGBA(8) => Some(Pixels::Rgba),
            tiff::ColorType::Gray(8) => Some(Pixels::Gray),
            tiff::ColorType::YCbCr(8) => Some(Pixels::YCbCr),
            _ => None,
        }
    }

    fn samples(self) -> usize {
        match self {
            Pixels::Rgb | Pixels::YCbCr => 3,
            Pixels::Rgba => 4,
            Pixels::Gray => 1,
        }
    }

    /// Converts to RGB into `out` (alpha is dropped, as `slam pack` does).
    fn to_rgb(self, data: Vec<u8>, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Pixels::Rgb => *out = data,
            Pixels::Rgba => out.extend(data.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]])),
            Pixels::Gray => out.extend(data.iter().flat_map(|&g| [g, g, g])),
            Pixels::YCbCr => out.extend(data.chunks_exact(3).flat_map(|p| {
                // JFIF's full-range BT.601 conversion, as JPEG decoders apply it.
                let (y, cb, cr) = (
                    f32::from(p[0]),
                    f32::from(p[1]) - 128.0,
                    f32::from(p[2]) - 128.0,
                );
                [
                    y + 1.402 * cr,
                    y - 0.344_136 * cb - 0.714_136 * cr,
                    y + 1.772 * cb,
                ]
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
            })),
        }
    }
}

/// A TIFF file's header facts.
#[derive(Clone, Copy, Debug)]
struct TiffHeader {
    little_endian: bool,
    big: bool,
}

impl TiffHeader {
    /// A header whose first IFD is at `ifd`, so that a decoder opens that page as its first.
    fn pointing_at(&self, ifd: u64) -> Result<Vec<u8>> {
        let u16b = |v: u16| {
            if self.little_endian {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            }
        };
        let mut header = if self.little_endian {
            b"II".to_vec()
        } else {
            b"MM".to_vec()
        };
        if self.big {
            header.extend(u16b(43));
            header.extend(u16b(8));
            header.extend(u16b(0));
            header.extend(if self.little_endian {
                ifd.to_le_bytes()
            } else {
                ifd.to_be_bytes()
            });
        } else {
            let ifd =
                u32::try_from(ifd).context("an IFD offset is beyond 4 GiB in a classic TIFF")?;
            header.extend(u16b(42));
            header.extend(if self.little_endian {
                ifd.to_le_bytes()
            } else {
                ifd.to_be_bytes()
            });
        }
        Ok(header)
    }
}

/// The file seen with its header replaced: the `tiff` decoder opens only pages of the main
/// chain, so a page anywhere (a SubIFD) is opened by pointing the header at it.
struct PageReader {
    file: BufReader<File>,
    header: Vec<u8>,
    len: u64,
    pos: u64,
    /// The file's position is `pos` (reads from the header move only `pos`).
    synced: bool,
}

impl Read for PageReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(rest) = self
            .header
            .get(self.pos as usize..)
            .filter(|r| !r.is_empty())
        {
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.pos += n as u64;
            self.synced = false;
            return Ok(n);
        }
        if !self.synced {
            self.file.seek(SeekFrom::Start(self.pos))?;
            self.synced = true;
        }
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PageReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        if pos != self.pos {
            self.pos = pos;
            self.synced = false;
        }
        Ok(pos)
    }
}

/// A page of a TIFF usable as a pyramid level.
#[derive(Clone, Copy, Debug)]
struct TiffPage {
    ifd: u64,
    dims: Dims,
    pixels: Pixels,
}

/// A TIFF file, from which decoders are opened at any page.
#[derive(Clone, Debug)]
struct TiffFile {
    path: PathBuf,
    header: TiffHeader,
    len: u64,
}

type TiffDecoder = Decoder<PageReader>;

impl TiffFile {
    /// A decoder at the page whose IFD is at `ifd` (`None`: the file's first page).
    fn decoder(&self, ifd: Option<u64>) -> Result<TiffDecoder> {
        let file = File::open(&self.path).context("cannot open it")?;
        let header = match ifd {
            Some(ifd) => self.header.pointing_at(ifd)?,
            None => Vec::new(),
        };
        let reader = PageReader {
            file: BufReader::new(file),
            header,
            len: self.len,
            pos: 0,
            synced: true,
        };
        // The decoder's default limits bound what it reads from the file (256 MiB of tag
        // values, 128 MiB per compressed chunk); `open_level` bounds the decoded chunks.
        Decoder::new(reader).map_err(tiff_error)
    }
}

/// A plain TIFF: the first page is level 0; the other pages (of the IFD chain, or the first
/// page's SubIFDs) that are smaller with the same aspect ratio are its lower levels.
struct TiffSlide {
    file: TiffFile,
    levels: Vec<TiffPage>,
    dims: Vec<Dims>,
}

impl TiffSlide {
    fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).context("cannot open it")?;
        let len = file.metadata().context("cannot open it")?.len();
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .context("it is too short to be a TIFF file")?;
        let little_endian = &head[..2] == b"II";
        let magic = if little_endian {
            u16::from_le_bytes([head[2], head[3]])
        } else {
            u16::from_be_bytes([head[2], head[3]])
        };
        let mut slide = Self {
            file: TiffFile {
                path: path.to_path_buf(),
                header: TiffHeader {
                    little_endian,
                    big: magic == 43,
                },
                len,
            },
            levels: Vec::new(),
            dims: Vec::new(),
        };
        let mut pages = Vec::new();
        let mut decoder = slide.file.decoder(None)?;
        let mut sub_ifds = Vec::new();
        for index in 0..MAX_PAGES {
            let page = describe_page(&mut decoder);
            if index == 0 {
                // Level 0 must be readable; later pages that are not are just not levels.
                let page = page?;
                let pixels = page.pixels.map_err(|color| {
                    anyhow!(
                        "its pixels are {color:?}; slides must be 8-bit RGB, RGBA, greyscale or YCbCr"
                    )
                })?;
                ensure!(!page.planar, "planar TIFF pages are not supported");
                ensure!(
                    page.dims.width > 0 && page.dims.height > 0,
                    "the image is empty"
                );
                sub_ifds = (decoder.find_tag_unsigned_vec::<u64>(Tag::SubIfd))
                    .map_err(tiff_error)?
                    .unwrap_or_default();
                sub_ifds.truncate(MAX_PAGES);
                slide.levels.push(TiffPage {
                    ifd: page.ifd,
                    dims: page.dims,
                    pixels,
                });
            } else if let Ok(page) = page {
                pages.push(page);
            }
            if !decoder.more_images() {
                break;
            }
            if decoder.next_image().is_err() {
                break;
            }
        }
        for ifd in sub_ifds {
            if let Ok(page) =
                (slide.file.decoder(Some(ifd))).and_then(|mut d| describe_page(&mut d))
            {
                pages.push(page);
            }
        }
        let base = slide.levels[0].dims;
        let mut lower: Vec<TiffPage> = pages
            .into_iter()
            .filter(|p| !p.planar && !p.mask)
            .filter(|p| p.dims.width < base.width && p.dims.height < base.height)
            .filter(|p| p.dims.width > 0 && p.dims.height > 0)
            // The same aspect ratio up to rounding each side by less than a pixel.
            .filter(|p| {
                let cross = |a: u64, b: u64| u128::from(a) * u128::from(b);
                cross(p.dims.width, base.height).abs_diff(cross(p.dims.height, base.width))
                    <= u128::from(base.width + base.height)
            })
            .filter_map(|p| {
                Some(TiffPage {
                    ifd: p.ifd,
                    dims: p.dims,
                    pixels: p.pixels.ok()?,
                })
            })
            .collect();
        lower.sort_by_key(|p| std::cmp::Reverse(p.dims.width));
        lower.dedup_by_key(|p| p.dims.width);
        slide.levels.extend(lower);
        slide.dims = slide.levels.iter().map(|p| p.dims).collect();
        Ok(slide)
    }
}

/// What a page is, as far as choosing levels goes.
struct PageFacts {
    ifd: u64,
    dims: Dims,
    pixels: std::result::Result<Pixels, tiff::ColorType>,
    planar: bool,
    /// NewSubfileType says transparency mask.
    mask: bool,
}

fn describe_page(decoder: &mut TiffDecoder) -> Result<PageFacts> {
    let ifd = decoder
        .ifd_pointer()
        .ok_or_else(|| anyhow!("a page has no IFD"))?
        .0;
    let (width, height) = decoder.dimensions().map_err(tiff_error)?;
    let color = decoder.colortype().map_err(tiff_error)?;
    let planar = decoder
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .map_err(tiff_error)?
        == Some(2);
    let subfile = decoder
        .find_tag_unsigned::<u32>(Tag::NewSubfileType)
        .map_err(tiff_error)?
        .unwrap_or(0);
    Ok(PageFacts {
        ifd,
        dims: Dims {
            width: u64::from(width),
            height: u64::from(height),
        },
        pixels: Pixels::of(color).ok_or(color),
        planar,
        mask: subfile & 4 != 0,
    })
}

fn tiff_error(err: tiff::TiffError) -> anyhow::Error {
    anyhow!("it is not a readable TIFF: {err}")
}

impl SlideSource for TiffSlide {
    fn levels(&self) -> &[Dims] {
        &self.dims
    }

    fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>> {
        let page = self.levels[level];
        let mut decoder = self.file.decoder(Some(page.ifd))?;
        let strips = decoder.get_chunk_type() == tiff::decoder::ChunkType::Strip;
        let (cw, ch) = decoder.chunk_dimensions();
        let dims = page.dims;
        let (cw, ch) = (u64::from(cw), u64::from(ch).min(dims.height));
        ensure!(cw > 0 && ch > 0, "its chunk size is {cw}x{ch}");
        let what = if strips { "strip" } else { "tile" };
        // Decoded chunks are clipped to the image (a tile may be wider than it).
        let chunk_bytes = (cw.min(dims.width))
            .saturating_mul(ch)
            .saturating_mul(page.pixels.samples() as u64);
        ensure!(
            chunk_bytes <= MAX_CHUNK_BYTES as u64,
            "a {what} of level {level} is {cw}x{ch} pixels, more than the {} MiB read at once; re-save the slide tiled (e.g. `vips tiffsave in.tif out.tif --tile --pyramid`)",
            MAX_CHUNK_BYTES >> 20
        );
        // Every chunk must lie within the file: a truncated file is reported here, by name,
        // rather than by a failing read midway.
        let (offsets, counts) = if strips {
            (Tag::StripOffsets, Tag::StripByteCounts)
        } else {
            (Tag::TileOffsets, Tag::TileByteCounts)
        };
        let offsets = decoder.get_tag_u64_vec(offsets).map_err(tiff_error)?;
        let counts = decoder.get_tag_u64_vec(counts).map_err(tiff_error)?;
        for (i, (&offset, &count)) in offsets.iter().zip(&counts).enumerate() {
            let end = offset.checked_add(count);
            ensure!(
                end.is_some_and(|e| e <= self.file.len),
                "the file is truncated: {what} {i} of level {level} lies at bytes {offset}..{} but the file has {} bytes",
                end.map_or_else(|| "?".into(), |e| e.to_string()),
                self.file.len
            );
        }
        let reader = TiffLevel {
            file: self.file.clone(),
            level,
            page,
            chunk: (cw, ch),
            across: dims.width.div_ceil(cw),
            what,
            pool: Mutex::new(vec![decoder]),
        };
        ensure!(
            reader.grid().0 * reader.grid().1 <= offsets.len() as u64,
            "level {level} has {} {what}s; its size needs {}",
            offsets.len(),
            reader.grid().0 * reader.grid().1
        );
        Ok(Box::new(reader))
    }
}

/// A TIFF page read chunk by chunk; each worker takes a decoder of its own from the pool.
struct TiffLevel {
    file: TiffFile,
    level: usize,
    page: TiffPage,
    chunk: (u64, u64),
    across: u64,
    what: &'static str,
    pool: Mutex<Vec<TiffDecoder>>,
}

impl LevelReader for TiffLevel {
    fn dims(&self) -> Dims {
        self.page.dims
    }

    fn chunk_size(&self) -> (u64, u64) {
        self.chunk
    }

    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
        let index = cy * self.across + cx;
        let popped = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut decoder = match popped {
            Some(decoder) => decoder,
            None => self.file.decoder(Some(self.page.ifd))?,
        };
        let context = || {
            format!(
                "cannot decode {} {index} of level {}",
                self.what, self.level
            )
        };
        let index32 = u32::try_from(index).with_context(context)?;
        let read = decoder.read_chunk(index32).map_err(|e| anyhow!("{e}"));
        let data = match read.with_context(context)? {
            DecodingResult::U8(data) => data,
            _ => bail!("{}: the samples are not 8-bit", context()),
        };
        // The decoder is returned only after a clean read: one that failed may be midway.
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(decoder);
        let rect = self.chunk_rect(cx, cy);
        let expected = (rect.w * rect.h) as usize * self.page.pixels.samples();
        ensure!(
            data.len() == expected,
            "{}: {} bytes decoded, {expected} expected",
            context(),
            data.len()
        );
        self.page.pixels.to_rgb(data, out);
        Ok(())
    }
}

#[cfg(feature = "openslide")]
mod vendor {
    //! The vendor formats through OpenSlide: levels and downsamples as OpenSlide reports them,
    //! read in blocks with `read_region`.

    use std::path::Path;
    use std::sync::Arc;

    use anyhow::{Context, Result, anyhow};
    use openslide_rs::{Address, OpenSlide, Region, Size};

    use super::{BLOCK, Dims, LevelReader, SlideSource};

    pub(super) struct VendorSlide {
        slide: Arc<OpenSlide>,
        dims: Vec<Dims>,
    }

    impl VendorSlide {
        pub(super) fn open(path: &Path) -> Result<Self> {
            let slide =
                OpenSlide::new(path).map_err(|e| anyhow!("OpenSlide cannot open it: {e}"))?;
            let dims = (slide.get_all_level_dimensions())
                .map_err(|e| anyhow!("OpenSlide cannot read its levels: {e}"))?
                .into_iter()
                .map(|s| Dims {
                    width: u64::from(s.w),
                    height: u64::from(s.h),
                })
                .collect::<Vec<_>>();
            anyhow::ensure!(
                dims.first().is_some_and(|d| d.width > 0 && d.height > 0),
                "OpenSlide finds no image in it"
            );
            Ok(Self {
                slide: Arc::new(slide),
                dims,
            })
        }
    }

    impl SlideSource for VendorSlide {
        fn levels(&self) -> &[Dims] {
            &self.dims
        }

        fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>> {
            let downsample = (self.slide.get_level_downsample(level as u32))
                .map_err(|e| anyhow!("OpenSlide cannot read level {level}: {e}"))?;
            Ok(Box::new(VendorLevel {
                slide: self.slide.clone(),
                level,
                dims: self.dims[level],
                downsample,
            }))
        }
    }

    struct VendorLevel {
        slide: Arc<OpenSlide>,
        level: usize,
        dims: Dims,
        downsample: f64,
    }

    impl LevelReader for VendorLevel {
        fn dims(&self) -> Dims {
            self.dims
        }

        fn chunk_size(&self) -> (u64, u64) {
            (BLOCK, BLOCK)
        }

        fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
            let rect = self.chunk_rect(cx, cy);
            let at = |v: u64| u32::try_from((v as f64 * self.downsample).round() as u64);
            let region = Region {
                size: Size {
                    w: rect.w as u32,
                    h: rect.h as u32,
                },
                level: self.level as u32,
                address: Address {
                    x: at(rect.x).context("the slide is too large")?,
                    y: at(rect.y).context("the slide is too large")?,
                },
            };
            let argb = (self.slide.read_region(&region))
                .map_err(|e| anyhow!("OpenSlide cannot read level {}: {e}", self.level))?;
            // Premultiplied ARGB words, composited over white (OpenSlide leaves the area
            // outside the scan transparent).
            out.clear();
            out.extend(argb.chunks_exact(4).flat_map(|p| {
                let v = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                let a = (v >> 24) as u8;
                [(v >> 16) as u8, (v >> 8) as u8, v as u8].map(|c| c.saturating_add(255 - a))
            }));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tissue_thresholds() {
        let t = TissueThresholds::default();
        assert!(t.is_tissue([150, 80, 175]));
        assert!(!t.is_tissue([240, 238, 242]), "white glass");
        assert!(!t.is_tissue([20, 20, 20]), "black, unsaturated");
        assert!(!t.is_tissue([250, 200, 250]), "saturated but too bright");
    }

    #[test]
    fn fraction_weights_partial_cells() {
        // 2x2 cells, only the top-left one tissue.
        let tissue = [true, false, false, false];
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.0..1.0, 0.0..1.0), 1.0);
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.0..2.0, 0.0..2.0), 0.25);
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.5..1.5, 0.0..1.0), 0.5);
        // Outside the mask counts as background.
        assert_eq!(tissue_fraction(&tissue, (2, 2), 1.0..3.0, 1.0..3.0), 0.0);
    }

    #[test]
    fn mask_source_takes_the_coarsest_fine_enough_level() {
        let dims = |w, h| Dims {
            width: w,
            height: h,
        };
        let levels = [
            dims(8000, 6000),
            dims(4000, 3000),
            dims(1000, 750),
            dims(250, 187),
        ];
        // 200-pixel patches want 25-pixel cells: the 1/8 level, binned by 3.
        assert_eq!(mask_source(&levels, 0, 200), (2, 3));
        // 256-pixel patches want 32-pixel cells: the pixels of the 1/32 level.
        assert_eq!(mask_source(&levels, 0, 256), (3, 1));
        // At level 1, 100-pixel patches want 25 level-0 pixels again.
        assert_eq!(mask_source(&levels, 1, 100), (2, 3));
        // One level: bin it.
        assert_eq!(mask_source(&levels[..1], 0, 200), (0, 25));
        // Large slides get coarser cells to bound the mask.
        let (_, cell) = mask_source(&[dims(200_000, 100_000)], 0, 64);
        assert!(200_000 / cell * (100_000 / cell) <= MAX_MASK_CELLS);
    }

    #[test]
    fn labels_from_the_layout() {
        assert_eq!(
            layout_label(Path::new("a/Abnormal/x/s.tif")),
            Some(BagLabel::Abnormal)
        );
        assert_eq!(
            layout_label(Path::new("normal/abnormal_s.tif")),
            Some(BagLabel::Normal)
        );
        assert_eq!(
            layout_label(Path::new("abnormal_s.tif")),
            Some(BagLabel::Abnormal)
        );
        assert_eq!(layout_label(Path::new("slides/s.tif")), None);
    }
}
