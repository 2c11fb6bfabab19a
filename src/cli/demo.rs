//! `slam demo`: the whole method on synthetic data, no download (`pipeline::demo`).

use std::path::Path;

use anyhow::Result;
use clap::Args;

use super::args::{EngineArgs, with_engine};
use super::mil::print_evaluation;
use super::progress::Progress;
use crate::engine::cuda::MatmulMode;
use crate::feed::ViewSettings;
use crate::mil::Evaluation;
use crate::pipeline::demo::{DemoConfig, DemoObserver};
use crate::pretrain::Observer;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam demo                                  SLAM-AGS end to end into ./slam-demo
  slam demo --compare --out demo-compare     random init, SimCLR, SLAM without surgery, SLAM-AGS
  slam demo --epochs 20 --bags 40            longer and bigger
  slam demo --surgery pcgrad --compare       ... and SLAM with PCGrad beside them

Everything is written under --out: data/ (the synthetic stores and a contact sheet of the
cells), one folder per variant (the pretraining run, the embeddings, the MIL reports) and
results.md / results.json with the table, auc.png and retrieval.png. Retrieval counts abnormal
cells among the K most attended patches of each abnormal bag, with K the number of abnormal
cells per bag. Every pretraining flag applies (at the demo's small defaults); --objective and
--surgery choose the main variant.")]
pub struct DemoArgs {
    #[command(flatten)]
    pub config: DemoConfig,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub views: ViewSettings,
}

/// Stages on stderr, a progress bar per pretraining run, each variant's metrics on stdout.
struct Console;

impl DemoObserver for Console {
    fn stage(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn pretraining(&mut self, _variant: &str) -> Box<dyn Observer> {
        Box::new(Progress::new())
    }

    fn evaluated(&mut self, _variant: &str, dir: &Path, evaluation: &Evaluation) {
        print_evaluation(dir, evaluation);
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    args.engine.check_views(&args.views)?;
    let results = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        args.config.run(eng, &args.views, &mut Console)
    })?;
    println!("\n{}", results.table);
    println!(
        "total {:.0} s; contact sheet of the cells: {}",
        results.seconds,
        results.data.paths.contact_sheet.display()
    );
    Ok(())
}
