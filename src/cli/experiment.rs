//! `slam experiment`: variants over seeds and witness rates, compared with their spread
//! (`pipeline::experiment`).

use anyhow::{Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use super::args::{EngineArgs, with_engine};
use super::progress::GridConsole;
use crate::engine::cuda::MatmulMode;
use crate::feed::ViewSettings;
use crate::pipeline::experiment::{self, COMPARISON, ExperimentConfig, ExperimentResults};

#[derive(Args, Debug)]
#[command(
    mut_arg("variants", |a| a.default_value(COMPARISON)),
    after_help = "Examples:
  slam experiment --out study --seeds 5
      the baselines and SLAM over 5 seeds at witness rate 0.1
  slam experiment --out study --seeds 5 --witness-rates 0.1,0.02 \\
      --variants random-init,simclr,weak,slam-ags,slam-ags@0.1,slam-ags@0.03
      task weights at two witness rates
  slam experiment --out big --seeds 3 --bags 200 --eval-cells 3000 --epochs 20
  slam experiment --out heads --seeds 3 --mil-heads abmil,pamil
      both MIL heads on every run's embeddings

Each (witness rate, seed) gets its own synthetic data; every variant of that seed trains on
it from the same start, so variants are compared pair by pair. A run: pretraining (or the
random initialization with recomputed batch-norm statistics), embedding, the cell-level
evaluation on held-out cells (h and z) and gated-attention MIL on z (metrics bag.*), with
--mil-heads abmil,pamil also the reference's PAMIL on the same z (metrics pamil.*).
results.md holds, per witness rate, mean ± standard deviation of every metric and the paired
differences against SimCLR and random init with their 95% intervals; results.json
everything; runs.jsonl one line per run. Started again with the same settings it continues where it stopped.")]
pub struct ExperimentArgs {
    #[command(flatten)]
    pub config: ExperimentConfig,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub views: ViewSettings,
}

/// Refuses --objective and --surgery, which each variant sets.
pub fn refuse_variant_flags(matches: &ArgMatches) -> Result<()> {
    for flag in ["objective", "surgery"] {
        if matches.value_source(flag) == Some(ValueSource::CommandLine) {
            bail!(
                "--{flag} is set by each variant here: name the variants instead, e.g. \
                 --variants slam-pcgrad,simclr"
            );
        }
    }
    Ok(())
}

pub fn run(args: &ExperimentArgs, matches: &ArgMatches) -> Result<()> {
    refuse_variant_flags(matches)?;
    args.engine.check_views(&args.views)?;
    let results = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        experiment::run(&args.config, eng, &args.views, &mut GridConsole::new())
    })?;
    print_results(&results);
    Ok(())
}

/// The results table and where the files are.
pub fn print_results(results: &ExperimentResults) {
    println!("\n{}", results.markdown);
    let ran = results.runs.len();
    let warned = results
        .runs
        .iter()
        .filter(|r| r.collapse_warnings > 0)
        .count();
    println!(
        "{ran} runs in {:.0} s{}",
        results.seconds,
        if warned > 0 {
            format!("; {warned} of them warned that their embeddings were collapsing")
        } else {
            "; no run warned of collapsing embeddings".to_owned()
        }
    );
    if let Some(data) = &results.last_data {
        println!(
            "contact sheet of the cells: {}",
            data.paths.contact_sheet.display()
        );
    }
}
