//! `slam tile`: whole-slide images to a patch store, one bag per slide.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use super::pack::print_skipped;
use crate::data::build::tile::{TileOptions, TileProgress, TissueSettings, tile_slides};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam tile slides/ --out slides.patches          slides/normal/*.tif, slides/abnormal/*.tif
  slam tile s1.tif s2.tif --out x.patches --labels slides.csv
  slam tile slides/ --out x.patches --level 1 --patch-size 224 --max-patches 2000 --seed 7
  slam tile slides/ --out x.patches --thumbnails thumbs/       check the tissue mask by eye
  slam tile slides/ --out x.patches --mask fixed --min-saturation 0.05

Each slide becomes one bag named by its file stem. Labels come from --labels (CSV with header
`slide,label`, the slide's file stem or name, labels normal/abnormal, also negative/positive
or 0/1), else from the nearest folder named normal/ or abnormal/ (negative/, positive/), else
from the file name (normal_*, abnormal_*).

Patches are the whole squares of a grid from the top-left corner of the chosen level, kept
when at least --min-tissue of them is tissue on a mask computed at low resolution (a lower
pyramid level when there is one). The mask (--mask adaptive, the default) finds a threshold
per slide: Otsu's method on the median-smoothed HSV saturation, repeated on the lower class
so that pale tissue is kept, on the brightness for greyscale slides; a slide showing no two
classes (blank glass, or tissue throughout) gets the fixed thresholds, which --mask fixed
applies to every slide: saturation at least --min-saturation and brightness at most
--max-brightness. The slide table names each slide's rule; --thumbnails shows the mask, the
background shaded blue. Each patch's source is <slide file>@x,y, its top-left corner in
level-0 pixels; instance labels are unknown.

Formats: TIFF (tiled or stripped, BigTIFF too; uncompressed, LZW, Deflate, PackBits or JPEG;
8-bit RGB, RGBA, grey or YCbCr), read tile by tile, its reduced-resolution pages (IFD chain
or SubIFDs) being levels 1, 2, ...; PNG and JPEG, decoded whole (mind the memory for large
ones); SVS, NDPI, MRXS, VMS, SCN, BIF through OpenSlide when slam is built with
`--features openslide`.")]
pub struct TileArgs {
    /// Slide images, or folders searched for them at any depth.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Store to write (.patches).
    #[arg(long)]
    pub out: PathBuf,
    /// CSV labelling the slides (header slide,label).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Patch side in pixels at the tiled level.
    #[arg(long, default_value_t = 250)]
    pub patch_size: usize,
    /// Pyramid level to tile (0: full resolution).
    #[arg(long, default_value_t = 0)]
    pub level: usize,
    /// Least share of a patch that must be tissue, 0..=1.
    #[arg(long, default_value_t = 0.5)]
    pub min_tissue: f64,
    #[command(flatten)]
    pub tissue: TissueSettings,
    /// Keep at most this many patches per slide, drawn at random (see --seed).
    #[arg(long)]
    pub max_patches: Option<usize>,
    /// Seed of the --max-patches draw; the same seed keeps the same patches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for a PNG thumbnail per slide (`<bag>.png`) with the kept patches outlined.
    #[arg(long)]
    pub thumbnails: Option<PathBuf>,
    /// Skip unreadable, truncated or unsupported slides (each is listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Replace the store and thumbnails that exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &TileArgs) -> Result<()> {
    let options = TileOptions {
        patch_size: args.patch_size,
        level: args.level,
        tissue: args.tissue,
        min_tissue: args.min_tissue,
        max_patches: args.max_patches,
        seed: args.seed,
        labels: args.labels.clone(),
        thumbnails: args.thumbnails.clone(),
        skip_bad: args.skip_bad,
        overwrite: args.force,
        ..TileOptions::default()
    };
    // Shown on stderr; indicatif hides it when stderr is not a terminal.
    let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "[{bar:30}] {pos}/{len} patches, {msg}, {per_sec}, {eta} left",
    )?);
    let report = tile_slides(
        &args.inputs,
        &args.out,
        &options,
        &mut |p: &TileProgress| {
            bar.set_length(p.patches_planned as u64);
            bar.set_position(p.patches_done as u64);
            bar.set_message(format!("slide {}/{}", p.slides_done, p.slides));
        },
    );
    bar.finish_and_clear();
    let report = report?;
    let s = &report.summary;
    println!(
        "wrote {}: {} bags ({} abnormal, {} normal), {} patches of {} at level {}",
        args.out.display(),
        s.bags,
        s.abnormal_bags,
        s.bags - s.abnormal_bags,
        s.patches,
        s.patch_size,
        args.level
    );
    let name_width = (report.slides.iter())
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "  {:name_width$}  {:8}  {:>13}  {:>7}  {:>7}  {:>10}  {:>7}  mask",
        "slide", "label", "size", "grid", "kept", "background", "capped"
    );
    for r in &report.slides {
        println!(
            "  {:name_width$}  {:8}  {:>13}  {:>7}  {:>7}  {:>10}  {:>7}  {}",
            r.name,
            r.label.to_string(),
            format!("{}x{}", r.size.0, r.size.1),
            r.grid,
            r.kept,
            r.background,
            r.over_cap,
            r.mask_rule
        );
    }
    println!("  file     {}", HumanBytes(s.bytes));
    println!(
        "  speed    {:.1} megapixels/s ({:.1} megapixels of slide at level {} in {:.1} s)",
        report.megapixels / report.seconds.max(1e-9),
        report.megapixels,
        args.level,
        report.seconds
    );
    if let Some(dir) = &args.thumbnails {
        println!("  thumbnails in {}", dir.display());
    }
    let empty: Vec<&str> = (report.slides.iter())
        .filter(|r| r.kept == 0)
        .map(|r| r.name.as_str())
        .collect();
    if !empty.is_empty() {
        eprintln!(
            "warning: {} slide(s) had no patch with enough tissue and have no bag: {}",
            empty.len(),
            empty.join(", ")
        );
    }
    if report.ignored > 0 {
        println!(
            "ignored {} files that are not slide images (or are hidden)",
            report.ignored
        );
    }
    if report.unused_labels > 0 {
        println!(
            "{} rows of the labels file name no slide",
            report.unused_labels
        );
    }
    print_skipped("slide(s) that cannot be tiled", &report.skipped);
    Ok(())
}
