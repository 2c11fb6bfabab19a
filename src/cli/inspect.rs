//! `slam inspect`: what a patch store holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::{BagLabel, PatchStore};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam inspect data/train.patches                 counts, pools and witness rates
  slam inspect data/train.patches --bags          one line per bag
  slam inspect data/train.patches --verify        also check every pixel against its checksum
  slam inspect data/train.patches --json          the same figures as one JSON object")]
pub struct InspectArgs {
    /// Patch store to describe (written by `slam pack`, `slam bags` or `slam synth`).
    pub store: PathBuf,
    /// List every bag: name, label, patches, known abnormal cells.
    #[arg(long)]
    pub bags: bool,
    /// Read every pixel and check it against the store's checksum.
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct BagLine<'a> {
    name: &'a str,
    label: BagLabel,
    patches: usize,
    /// Cells known to be abnormal; `None` when the store has no instance truth for the bag.
    abnormal_cells: Option<usize>,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let store = PatchStore::open(&args.store)?;
    if args.verify {
        store.verify_pixels()?;
    }
    let summary = store.summary();
    let bags: Vec<BagLine> = store
        .bags()
        .iter()
        .map(|bag| {
            let truth: Option<Vec<bool>> = bag.patches.clone().map(|i| store.instance(i)).collect();
            BagLine {
                name: &bag.name,
                label: bag.label,
                patches: bag.patches.len(),
                abnormal_cells: truth.map(|t| t.iter().filter(|&&a| a).count()),
            }
        })
        .collect();
    if args.json {
        let value = serde_json::json!({
            "path": args.store,
            "summary": summary,
            "pixels_verified": args.verify,
            "bags": bags,
        });
        println!("{value}");
        return Ok(());
    }
    let normal_patches = summary.patches - summary.abnormal_bag_patches;
    println!(
        "{}: {} patches of {} in {} bags ({} abnormal, {} normal), {:.1} MiB",
        args.store.display(),
        summary.patches,
        summary.patch_size,
        summary.bags,
        summary.abnormal_bags,
        summary.bags - summary.abnormal_bags,
        summary.bytes as f64 / (1 << 20) as f64
    );
    println!(
        "pretraining pools: P = {} patches of abnormal bags, N = {normal_patches} of normal bags",
        summary.abnormal_bag_patches
    );
    let known: Vec<&BagLine> = bags
        .iter()
        .filter(|b| b.label.is_abnormal() && b.abnormal_cells.is_some())
        .collect();
    if known.is_empty() {
        println!("instance truth: not recorded for the abnormal bags");
    } else {
        let cells: usize = known.iter().map(|b| b.patches).sum();
        let witnesses: usize = known.iter().filter_map(|b| b.abnormal_cells).sum();
        println!(
            "instance truth: {witnesses} abnormal cells in {cells} patches of abnormal bags \
             (witness rate {:.2}%)",
            100.0 * witnesses as f64 / cells as f64
        );
    }
    if args.verify {
        println!("pixels: checksum verified");
    }
    if args.bags {
        let width = bags.iter().map(|b| b.name.len()).max().unwrap_or(0).max(3);
        println!("\n{:<width$}  label     patches  abnormal cells", "bag");
        for bag in &bags {
            let cells = bag
                .abnormal_cells
                .map_or_else(|| "unknown".to_owned(), |c| c.to_string());
            println!(
                "{:<width$}  {:<8}  {:>7}  {cells:>14}",
                bag.name,
                bag.label.to_string(),
                bag.patches
            );
        }
    }
    Ok(())
}
