//! `slam demo`: the whole method on synthetic data, no download (`pipeline::demo`).

use anyhow::Result;
use clap::{ArgMatches, Args};

use super::args::{EngineArgs, with_engine};
use super::experiment::{print_results, refuse_variant_flags};
use super::progress::GridConsole;
use crate::engine::cuda::MatmulMode;
use crate::feed::ViewSettings;
use crate::pipeline::demo::{DEMO_NOTE, DemoConfig};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam demo                                  SLAM-AGS end to end into ./slam-demo
  slam demo --compare --out demo-compare     the baselines and ablations beside it
  slam demo --compare --seeds 3              ... over 3 seeds: mean, spread, paired differences
  slam demo --variants slam-ags,slam-ags@0.1 the reference's task weights against the demo's
  slam demo --epochs 20 --bags 200           longer and bigger

Everything is written under --out: data/ (the synthetic stores of the current seed, and a
contact sheet of the cells), runs/w<rate>/seed<seed>/<variant>/ (the pretraining run, the
model, the cell-level report instance.json, the MIL reports), runs.jsonl (one line per
finished run), results.md and results.json (the tables), and a chart per metric. Started again
with the same settings it continues where it stopped; --force starts over.

Cell level: AUROC of abnormal against normal held-out cells by the distance to the training
cells of normal bags (kNN, centroid; no labels), and by a linear probe (a diagnostic that
sees cell labels), on the encoder's h and the projector's z. Bag level, on z: gated-attention
MIL (ABMIL, columns \"ABMIL\", reports in mil/) and the reference's PAMIL (columns \"PAMIL\",
reports in mil-pamil/; fewer epochs than the reference's 100, to keep the demo short:
--pamil-epochs; --mil-heads abmil leaves it out); retrieval = abnormal cells among each
abnormal bag's K most attended patches.")]
pub struct DemoArgs {
    #[command(flatten)]
    pub config: DemoConfig,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub views: ViewSettings,
}

pub fn run(args: &DemoArgs, matches: &ArgMatches) -> Result<()> {
    refuse_variant_flags(matches)?;
    args.engine.check_views(&args.views)?;
    let results = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        args.config.run(eng, &args.views, &mut GridConsole::new())
    })?;
    print_results(&results);
    println!("\n{DEMO_NOTE}");
    Ok(())
}
