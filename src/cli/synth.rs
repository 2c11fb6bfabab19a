//! `slam synth`: a synthetic cytology dataset (procedural cells in bags) as patch stores.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::StoreSummary;
use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SHEET_CELLS_PER_CLASS, SynthConfig, SynthPaths, write_dataset};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam synth --out data/synth
      20 bags of 100 cells at 250x250 (10 abnormal bags with 10 abnormal cells each),
      half of each label's bags for training
  slam synth --out data/small --patch-size 64 --bags 40 --bag-size 200 --witness-rate 0.02
      small patches for CPU runs, 4 abnormal cells in each abnormal bag
  slam synth --out data/look --bags 4 --bag-size 10 --png
      also PNG files in data/look/png/{train,test}/<bag>/<n>.png
  slam synth --out data/eval --patch-size 64 --bags 96 --bag-size 50 --eval-cells 1500
      also data/eval/cells.patches: 1500 normal and 1500 abnormal held-out cells for
      `slam eval` (cell-level AUROC with thousands of test cells)

Writes DIR/train.patches, DIR/test.patches and DIR/contact_sheet.png (normal cells in the
top rows, abnormal ones below). Normal bags hold normal cells only; abnormal bags hold
round(bag size x witness rate) abnormal cells. Abnormal cells are a little larger, with a
larger irregular nucleus, coarse chromatin and nucleoli; stain colour, brightness, blur and
neighbouring cells vary the same way in both classes. The same seed gives identical files.")]
pub struct SynthArgs {
    /// Folder to write the dataset into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the square patches in pixels (the bone-marrow data: 250).
    #[arg(long, default_value_t = 250)]
    pub patch_size: usize,
    #[command(flatten)]
    pub plan: BagPlanConfig,
    /// Seed of the bag plan and of every patch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write a store of held-out cells for instance-level evaluation (`slam eval`): this
    /// many of each class, in class-pure bags, none of them in a training or test bag.
    #[arg(long, default_value_t = 0)]
    pub eval_cells: usize,
    /// Also write every patch as a PNG file.
    #[arg(long)]
    pub png: bool,
    /// Replace the files of an existing dataset in the folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let synth = SynthConfig {
        patch_size: args.patch_size,
        seed: args.seed,
        eval_cells: args.eval_cells,
    };
    let plan = BagPlanConfig {
        seed: args.seed,
        ..args.plan.clone()
    };
    // Checked before the overwrite test so bad values are reported first.
    synth.validate()?;
    plan.validate()?;
    let paths = SynthPaths::in_dir(&args.out);
    let mut outputs = vec![&paths.train, &paths.test, &paths.contact_sheet];
    if args.eval_cells > 0 {
        outputs.push(&paths.cells);
    }
    if args.png {
        outputs.push(&paths.png);
    }
    let existing: Vec<String> = outputs
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() && !args.force {
        let verb = if existing.len() == 1 {
            "exists"
        } else {
            "exist"
        };
        bail!("{} {verb}; pass --force to replace", existing.join(" and "));
    }

    let total = plan
        .bags
        .saturating_mul(plan.bag_size)
        .saturating_add(2 * args.eval_cells);
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("rendering [{bar:30}] {pos}/{len} patches, {per_sec}")?
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let dataset = write_dataset(&synth, &plan, &args.out, args.png, &mut |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let patches = dataset.train.patches + dataset.test.patches;
    let abnormal_bags = dataset.train.abnormal_bags + dataset.test.abnormal_bags;
    println!(
        "synthetic cytology, seed {}: {} bags of {} cells, {} patches; {abnormal_bags} abnormal bags at witness rate {:.4} ({} of {} cells abnormal)",
        args.seed,
        plan.bags,
        plan.bag_size,
        dataset.train.patch_size,
        dataset.witnesses_per_bag as f64 / plan.bag_size as f64,
        dataset.witnesses_per_bag,
        plan.bag_size,
    );
    let line = |name: &str, path: &PathBuf, s: &StoreSummary| {
        println!(
            "  {name} {}: {} bags ({} abnormal), {} patches, abnormal cells: {}, {:.1} MB",
            path.display(),
            s.bags,
            s.abnormal_bags,
            s.patches,
            s.abnormal_instances,
            s.bytes as f64 / 1e6
        )
    };
    line("train", &dataset.paths.train, &dataset.train);
    line("test ", &dataset.paths.test, &dataset.test);
    if let Some(cells) = &dataset.cells {
        line("cells", &dataset.paths.cells, cells);
    }
    println!(
        "  contact sheet {}: {SHEET_CELLS_PER_CLASS} normal cells above {SHEET_CELLS_PER_CLASS} abnormal ones",
        dataset.paths.contact_sheet.display()
    );
    if dataset.png {
        println!(
            "  png {}/{{train,test,cells}}/<bag>/<n>.png",
            dataset.paths.png.display()
        );
    }
    println!(
        "{patches} patches in {seconds:.2} s: {:.0} patches/s",
        patches as f64 / seconds.max(1e-9)
    );
    Ok(())
}
