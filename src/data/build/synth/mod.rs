//! Procedural cytology: bags of single-cell patches for runs without the bone-marrow data.
//!
//! Each patch is a stained smear seen through a microscope: a lavender background with uneven
//! illumination, a centred cell (cytoplasm around an eccentric, textured nucleus), fragments
//! of neighbouring cells and red blood cells at the edges, blur and sensor noise. Pixels are
//! composed in optical density (three stains: nuclear purple, cytoplasmic blue, eosin pink)
//! and developed with Beer-Lambert, so overlapping things darken as on a slide.
//!
//! The two classes differ only in the centred cell's morphology, through one latent
//! "abnormality" drawn per cell from overlapping class distributions: abnormal cells tend to
//! be a little larger with a larger, irregular nucleus (higher N/C ratio), coarse clumped and
//! slightly paler chromatin, and 1-3 nucleoli; normal cells have a small round dense nucleus.
//! Everything else (stain colours, brightness, blur, illumination, position, neighbours, red
//! cells, noise) is drawn from the same ranges for both classes, from a random stream of its
//! own: the same patch id renders the same scene for either class, and colour statistics do
//! not give the label away.
//!
//! Every patch is rendered from its own RNG keyed by (seed, patch id), so stores are
//! byte-identical for a seed whatever the thread count, and any patch can be re-rendered
//! from its id ([`patch_id`]).
//!
//! Here: the settings, the contact sheet and the dataset writer ([`write_dataset`]); the
//! drawing of one patch (scene, cells, canvas, development) is in `cells`.

mod cells;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use image::{ImageEncoder, RgbImage};
use rayon::prelude::*;

use super::plan::{BagPlanConfig, Cell, PlannedBag, Split, plan_bags};
use crate::data::BagLabel;
use crate::data::store::{MAX_PATCH_SIDE, PatchSize, StoreSummary, StoreWriter};

/// Smallest patch side accepted for datasets: below it a cell is a handful of pixels.
pub const MIN_PATCH_SIDE: usize = 16;
pub const TRAIN_STORE: &str = "train.patches";
pub const TEST_STORE: &str = "test.patches";
/// The held-out cells for instance-level evaluation ([`SynthConfig::eval_cells`]).
pub const EVAL_STORE: &str = "cells.patches";
/// Cells per bag of the evaluation store.
const EVAL_BAG_SIZE: usize = 100;
pub const CONTACT_SHEET: &str = "contact_sheet.png";
/// PNG folders in the reference layout: `png/{train,test}/<bag>/<n>.png`.
pub const PNG_DIR: &str = "png";
/// Cells of each class on the contact sheet, and the sheet's columns.
pub const SHEET_CELLS_PER_CLASS: usize = 8;
const SHEET_COLUMNS: usize = 4;

/// What to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    /// Side of the square patches in pixels; the geometry scales with it.
    pub patch_size: usize,
    pub seed: u64,
    /// Cells of each class in a held-out store for instance-level evaluation (`slam eval`),
    /// drawn after the plan's cells (so none is in a bag); 0 writes none.
    pub eval_cells: usize,
}

/// The patch id a planned cell is rendered from: normal and abnormal cells take the even and
/// odd ids, so they never share one and a cell keeps its image when the plan grows.
pub fn patch_id(cell: Cell) -> u64 {
    2 * cell.index as u64 + cell.abnormal as u64
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (MIN_PATCH_SIDE..=MAX_PATCH_SIDE as usize).contains(&self.patch_size),
            "the patch size must be {MIN_PATCH_SIDE} to {MAX_PATCH_SIDE} pixels, got {}",
            self.patch_size
        );
        Ok(())
    }

    pub fn patch_bytes(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    /// Renders patch `id` as u8 HWC RGB.
    pub fn render_patch(&self, id: u64, abnormal: bool) -> Vec<u8> {
        let mut out = vec![0; self.patch_bytes()];
        self.render_into(id, abnormal, &mut out);
        out
    }

    /// A grid of [`SHEET_CELLS_PER_CLASS`] normal cells (top rows) above as many abnormal
    /// ones (bottom rows), the first cells of each pool, to see what a model trains on.
    pub fn contact_sheet(&self) -> RgbImage {
        let s = self.patch_size;
        let gap = (s / 32).max(2);
        let rows = SHEET_CELLS_PER_CLASS.div_ceil(SHEET_COLUMNS);
        let width = SHEET_COLUMNS * (s + gap) + gap;
        // A wider band between the classes.
        let height = 2 * rows * (s + gap) + 4 * gap;
        let mut sheet = RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255; 3]));
        for abnormal in [false, true] {
            for index in 0..SHEET_CELLS_PER_CLASS {
                let pixels = self.render_patch(patch_id(Cell { abnormal, index }), abnormal);
                let x0 = gap + (index % SHEET_COLUMNS) * (s + gap);
                let y0 = gap
                    + (index / SHEET_COLUMNS + abnormal as usize * rows) * (s + gap)
                    + abnormal as usize * 3 * gap;
                for (i, rgb) in pixels.chunks_exact(3).enumerate() {
                    let (x, y) = (x0 + i % s, y0 + i / s);
                    sheet.put_pixel(x as u32, y as u32, image::Rgb([rgb[0], rgb[1], rgb[2]]));
                }
            }
        }
        sheet
    }
}

/// Where a synthetic dataset's files go inside its output folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthPaths {
    pub train: PathBuf,
    pub test: PathBuf,
    pub cells: PathBuf,
    pub contact_sheet: PathBuf,
    pub png: PathBuf,
}

impl SynthPaths {
    pub fn in_dir(out: &Path) -> Self {
        Self {
            train: out.join(TRAIN_STORE),
            test: out.join(TEST_STORE),
            cells: out.join(EVAL_STORE),
            contact_sheet: out.join(CONTACT_SHEET),
            png: out.join(PNG_DIR),
        }
    }
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug)]
pub struct SynthDataset {
    pub paths: SynthPaths,
    pub train: StoreSummary,
    pub test: StoreSummary,
    /// The held-out evaluation cells, when [`SynthConfig::eval_cells`] asked for them.
    pub cells: Option<StoreSummary>,
    /// Abnormal cells in each abnormal bag.
    pub witnesses_per_bag: usize,
    /// Whether the PNG folders were written.
    pub png: bool,
}

/// Plans the bags of `plan` and renders them into `out`: `train.patches` and `test.patches`
/// (bag names and labels from the plan, instance truth from the rendered class, sources
/// `synth/<bag>/<n>.png`), `contact_sheet.png`, and with `png` the same patches as PNG files
/// in `png/{train,test}/<bag>/<n>.png`. Existing files of those names are replaced.
///
/// Everything is written into a hidden staging folder in `out` first and moved into place at
/// the end, so a failed or interrupted run leaves no partial store or PNG folder under the
/// final names (a killed process can leave the hidden `.synth-*` folder behind).
/// `progress` is called with the number of patches finished since its last call.
pub fn write_dataset(
    synth: &SynthConfig,
    plan: &BagPlanConfig,
    out: &Path,
    png: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<SynthDataset> {
    synth.validate()?;
    plan.validate()?;
    ensure!(
        plan.bags
            .checked_mul(plan.bag_size)
            .is_some_and(|n| n <= u32::MAX as usize),
        "{} bags of {} cells are more patches than a store holds ({})",
        plan.bags,
        plan.bag_size,
        u32::MAX
    );
    // The pools of synthetic cells are unbounded: offer exactly what the plan takes.
    let (normal, abnormal) = plan.cells_needed();
    let bags = plan_bags(plan, normal, abnormal)?;
    let split = |split| -> Vec<&PlannedBag> { bags.iter().filter(|b| b.split == split).collect() };
    let (train_bags, test_bags) = (split(Split::Train), split(Split::Test));
    for (name, bags) in [("training", &train_bags), ("test", &test_bags)] {
        ensure!(
            !bags.is_empty(),
            "the {name} split gets none of the {} bags at a train share of {}: use more bags or a share further from 0 and 1",
            plan.bags,
            plan.train_fraction
        );
    }

    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".synth-")
        .tempdir_in(out)
        .with_context(|| format!("cannot create a folder in {}", out.display()))?;
    let staged = SynthPaths::in_dir(staging.path());
    let name_width = plan.bag_size.saturating_sub(1).to_string().len().max(3);
    let mut write = |bags, path, split| {
        let png_dir = png.then(|| staged.png.join(split));
        write_split(synth, bags, path, png_dir.as_deref(), name_width, progress)
    };
    let train = write(&train_bags, &staged.train, "train")?;
    let test = write(&test_bags, &staged.test, "test")?;
    let eval_bags = eval_bags(synth.eval_cells, (normal, abnormal));
    let eval_bags: Vec<&PlannedBag> = eval_bags.iter().collect();
    let cells = (!eval_bags.is_empty())
        .then(|| write(&eval_bags, &staged.cells, "cells"))
        .transpose()?;
    write_png(&staged.contact_sheet, &synth.contact_sheet())?;

    let paths = SynthPaths::in_dir(out);
    let mut moves = vec![
        (&staged.train, &paths.train),
        (&staged.test, &paths.test),
        (&staged.contact_sheet, &paths.contact_sheet),
    ];
    if cells.is_some() {
        moves.push((&staged.cells, &paths.cells));
    } else if paths.cells.exists() {
        // A store of evaluation cells from an earlier dataset would not match this one.
        fs::remove_file(&paths.cells)
            .with_context(|| format!("cannot remove the old {}", paths.cells.display()))?;
    }
    for (from, to) in moves {
        fs::rename(from, to).with_context(|| format!("cannot move {} into place", to.display()))?;
    }
    if png {
        // A folder cannot be renamed over a non-empty one: move the old one into the staging
        // folder (deleted with it), then the new one into place.
        if paths.png.exists() {
            fs::rename(&paths.png, staging.path().join("old-png"))
                .with_context(|| format!("cannot replace {}", paths.png.display()))?;
        }
        fs::rename(&staged.png, &paths.png)
            .with_context(|| format!("cannot move {} into place", paths.png.display()))?;
    }
    staging
        .close()
        .with_context(|| format!("cannot remove the staging folder in {}", out.display()))?;
    Ok(SynthDataset {
        paths,
        train,
        test,
        cells,
        witnesses_per_bag: plan.witnesses_per_bag(),
        png,
    })
}

/// The bags of the evaluation store: `count` cells of each class after the `taken` (normal,
/// abnormal) cells of the plan, in class-pure bags of [`EVAL_BAG_SIZE`] labelled by their
/// class (`eval_normal_NNN`, `eval_abnormal_NNN`).
fn eval_bags(count: usize, taken: (usize, usize)) -> Vec<PlannedBag> {
    let mut bags = Vec::new();
    for (abnormal, first) in [(false, taken.0), (true, taken.1)] {
        let (kind, label) = if abnormal {
            ("abnormal", BagLabel::Abnormal)
        } else {
            ("normal", BagLabel::Normal)
        };
        for (b, start) in (0..count).step_by(EVAL_BAG_SIZE).enumerate() {
            let cells = (start..count.min(start + EVAL_BAG_SIZE))
                .map(|i| Cell {
                    abnormal,
                    index: first + i,
                })
                .collect();
            bags.push(PlannedBag {
                name: format!("eval_{kind}_{b:03}"),
                label,
                split: Split::Test,
                cells,
            });
        }
    }
    bags
}

/// Renders one split's bags in parallel, chunk by chunk, and writes them in order into the
/// store at `path` and, when given, as PNG files into `png_dir/<bag>/<n>.png`.
fn write_split(
    synth: &SynthConfig,
    bags: &[&PlannedBag],
    path: &Path,
    png_dir: Option<&Path>,
    name_width: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<StoreSummary> {
    let mut writer = StoreWriter::create(path, PatchSize::square(synth.patch_size))?;
    if let Some(png_dir) = png_dir {
        for bag in bags {
            let dir = png_dir.join(&bag.name);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let jobs: Vec<(&PlannedBag, usize, Cell)> = bags
        .iter()
        .flat_map(|bag| {
            bag.cells
                .iter()
                .enumerate()
                .map(move |(n, &c)| (*bag, n, c))
        })
        .collect();
    // Chunks of about 32 MB of pixels keep every core busy without holding a whole store.
    let chunk = ((32 << 20) / synth.patch_bytes()).clamp(16, 4096);
    for jobs in jobs.chunks(chunk) {
        let rendered = jobs
            .par_iter()
            .map(|&(bag, n, cell)| {
                let pixels = synth.render_patch(patch_id(cell), cell.abnormal);
                if let Some(png_dir) = png_dir {
                    let size = synth.patch_size as u32;
                    let image = RgbImage::from_raw(size, size, pixels.clone())
                        .ok_or_else(|| anyhow!("a patch has the wrong number of bytes"))?;
                    let file = png_dir
                        .join(&bag.name)
                        .join(format!("{n:0name_width$}.png"));
                    write_png(&file, &image)?;
                }
                Ok(pixels)
            })
            .collect::<Result<Vec<_>>>()?;
        for (&(bag, n, cell), pixels) in jobs.iter().zip(&rendered) {
            if n == 0 {
                writer.begin_bag(&bag.name, bag.label)?;
            }
            let source = format!("synth/{}/{n:0name_width$}.png", bag.name);
            writer.push_patch(pixels, Some(cell.abnormal), &source)?;
        }
        progress(jobs.len());
    }
    writer.finish()
}

/// Encodes a PNG into the staging folder (plain writes: the folder as a whole is moved into
/// place at the end).
fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut bytes,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )
    .with_context(|| format!("cannot encode {}", path.display()))?;
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
