//! `slam pack`: image folders to a patch store. Also the image options, progress bar and
//! reporting that `slam bags` shares.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::data::PatchSize;
use crate::data::build::pack::{
    ImageOptions, ImageTally, Layout, PackOptions, SkippedImage, pack_folder,
};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam pack slides/ --out slides.patches        bag folders slides/normal_*, slides/abnormal_*
  slam pack slides/ --out slides.patches --labels labels.csv
  slam pack data/ --out data.patches            the reference's data/positive, data/negative
  slam pack slides/ --out slides.patches --size 224 --skip-bad

Layouts (detected; --layout overrides):
  bags    each subfolder of INPUT is one bag, labelled by its name (normal_*, abnormal_*) or by
          --labels, a CSV with header `bag,label` and labels normal/abnormal (also
          negative/positive or 0/1) that lists every folder
  pooled  INPUT/positive and INPUT/negative, one bag each (abnormal and normal)
Images are PNG or JPEG (by extension) at any depth of a bag folder, taken in natural order of
their names, converted to RGB; other files are counted and ignored. Images larger than the
patch size are center-cropped as torchvision's CenterCrop does.")]
pub struct PackArgs {
    /// Folder of bag folders, or of positive/ and negative/.
    pub input: PathBuf,
    /// Store to write (.patches).
    #[arg(long)]
    pub out: PathBuf,
    /// Folder layout, bags or pooled (default: detected).
    #[arg(long)]
    pub layout: Option<Layout>,
    /// CSV labelling the bag folders (header bag,label).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    #[command(flatten)]
    pub images: ImageArgs,
}

/// How images become patches.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Patch side in pixels (default: the first image's size).
    #[arg(long)]
    pub size: Option<usize>,
    /// Reject images of another size instead of center-cropping the larger ones.
    #[arg(long)]
    pub exact_size: bool,
    /// Skip unreadable, corrupt or too small images (each is listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Replace output files that exist.
    #[arg(long)]
    pub force: bool,
}

impl ImageArgs {
    pub fn options(&self) -> ImageOptions {
        ImageOptions {
            patch_size: self.size.map(PatchSize::square),
            exact_size: self.exact_size,
            skip_bad: self.skip_bad,
            overwrite: self.force,
        }
    }
}

pub fn run(args: &PackArgs) -> Result<()> {
    let options = PackOptions {
        layout: args.layout,
        labels: args.labels.clone(),
        images: args.images.options(),
    };
    let report = with_progress(|progress| pack_folder(&args.input, &args.out, &options, progress))?;
    let s = &report.summary;
    println!(
        "wrote {} from {} ({})",
        args.out.display(),
        args.input.display(),
        report.layout
    );
    println!(
        "  bags     {}: {} abnormal, {} normal",
        s.bags,
        s.abnormal_bags,
        s.bags - s.abnormal_bags
    );
    println!(
        "  patches  {} of {}: {} in abnormal bags, {} in normal bags",
        s.patches,
        s.patch_size,
        s.abnormal_bag_patches,
        s.patches - s.abnormal_bag_patches
    );
    println!("  file     {}", HumanBytes(s.bytes));
    print_speed(s.patches, report.seconds);
    print_tally(&report.tally, s.patch_size);
    if report.unused_labels > 0 {
        println!(
            "{} rows of the labels file name no folder of {}",
            report.unused_labels,
            args.input.display()
        );
    }
    Ok(())
}

/// Runs `work` with a bar over its images on stderr (indicatif hides it when stderr is not a
/// terminal), cleared when the work ends.
pub(super) fn with_progress<T>(
    work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<T>,
) -> Result<T> {
    let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "[{bar:30}] {pos}/{len} images, {per_sec}, {eta} left",
    )?);
    let result = work(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    result
}

/// What happened to the files that did not become patches as they are.
pub(super) fn print_tally(tally: &ImageTally, patch_size: PatchSize) {
    if tally.ignored > 0 {
        println!(
            "ignored {} files that are not PNG or JPEG (or are hidden)",
            tally.ignored
        );
    }
    if tally.cropped > 0 {
        println!(
            "center-cropped {} images larger than {patch_size}",
            tally.cropped
        );
    }
    print_skipped("images that cannot be used", &tally.skipped);
}

/// The inputs skipped as unusable, each with the reason, on stderr.
pub(super) fn print_skipped(what: &str, skipped: &[SkippedImage]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!("skipped {} {what}:", skipped.len());
    for skipped in skipped {
        eprintln!("  {}: {}", skipped.path.display(), skipped.reason);
    }
}

pub(super) fn print_speed(images: usize, seconds: f64) {
    println!(
        "  speed    {:.0} images/s ({images} in {seconds:.1} s)",
        images as f64 / seconds.max(1e-9)
    );
}
