//! `slam bags`: bags at a chosen witness rate from labelled cell crops, as two stores.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::HumanBytes;

use super::pack::{ImageArgs, print_speed, print_tally, with_progress};
use crate::data::build::bags::{BagsOptions, TEST_FILE, TRAIN_FILE, build_bags};
use crate::data::build::plan::BagPlanConfig;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam bags cells/ --out bags/ --negative-class LYT --positive-class BLA \\
      --bags 60 --bag-size 1000 --witness-rate 0.01 --split 0.5 --seed 0
  slam bags cells/ --out bags/ --negative-class LYT,NGS --positive-class BLA,PMO \\
      --bags 20 --bag-size 500 --witness-rate 0.05 --size 224

CELLS holds one folder per cell class (BLA/, LYT/, ...; images at any depth), as the public
bone-marrow dataset does. Cells of the negative classes are normal, of the positive classes
abnormal. A normal bag holds normal cells only; an abnormal bag holds round(bag size x witness
rate) abnormal cells and normal cells for the rest. Each cell goes into at most one bag; the
bags of each label are split between OUT/train.patches and OUT/test.patches. Each patch keeps
its cell's class (normal or abnormal) as instance truth and its path as source. With
--skip-bad an unreadable cell is replaced by an unused cell of the same side.")]
#[command(
    mut_arg("bags", |a| a.required(true).default_value(None)),
    mut_arg("bag_size", |a| a.required(true).default_value(None)),
    mut_arg("witness_rate", |a| a.required(true).default_value(None))
)]
pub struct BagsArgs {
    /// Folder of class folders.
    pub cells: PathBuf,
    /// Folder for train.patches and test.patches (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Classes of normal cells, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub negative_class: Vec<String>,
    /// Classes of abnormal cells (the witnesses), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub positive_class: Vec<String>,
    #[command(flatten)]
    pub plan: BagPlanConfig,
    /// Seed of the draw; the same seed and cells give the same bags.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub images: ImageArgs,
}

pub fn run(args: &BagsArgs) -> Result<()> {
    let options = BagsOptions {
        plan: BagPlanConfig {
            seed: args.seed,
            ..args.plan.clone()
        },
        negative_classes: args.negative_class.clone(),
        positive_classes: args.positive_class.clone(),
        images: args.images.options(),
    };
    let report = with_progress(|progress| build_bags(&args.cells, &args.out, &options, progress))?;
    println!(
        "wrote {} and {} in {} from {}: {} cells per bag, {} abnormal in each abnormal bag",
        TRAIN_FILE,
        TEST_FILE,
        args.out.display(),
        args.cells.display(),
        options.plan.bag_size,
        options.plan.witnesses_per_bag()
    );
    println!(
        "  cells    {} normal ({}), {} abnormal ({})",
        report.normal_cells,
        args.negative_class.join(", "),
        report.abnormal_cells,
        args.positive_class.join(", ")
    );
    for (name, s) in [("train", &report.train), ("test ", &report.test)] {
        println!(
            "  {name}    {} bags ({} abnormal, {} normal), {} patches of {} ({} abnormal cells), {}",
            s.bags,
            s.abnormal_bags,
            s.bags - s.abnormal_bags,
            s.patches,
            s.patch_size,
            s.abnormal_instances,
            HumanBytes(s.bytes)
        );
    }
    let patches = report.train.patches + report.test.patches;
    print_speed(patches, report.seconds);
    print_tally(&report.tally, report.train.patch_size);
    Ok(())
}
