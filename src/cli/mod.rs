//! The `slam` command line: parsing, dispatch and error reporting. The work itself is done by
//! the library; each command's module turns arguments into library calls and prints results.

mod args;
mod bags;
mod bench;
mod demo;
mod dump_step;
mod embed;
mod eval;
mod experiment;
mod init;
mod inspect;
mod mil;
mod pack;
mod pretrain;
mod progress;
mod synth;
mod tile;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "slam",
    version,
    about = "SLAM-AGS pretraining: slide-label aware multi-task learning with adaptive gradient surgery",
    after_help = "Examples:
  slam demo                                         everything on synthetic data, in minutes
  slam demo --compare                               ... with the baselines and ablations side by side
  slam experiment --out study --seeds 5             variants over seeds: mean, spread, paired tests

  slam synth --out data/synth --patch-size 64       a synthetic cytology dataset (bags of cells)
  slam pack slides/ --out slides.patches            image folders (one per bag) to a patch store
  slam tile slides/ --out slides.patches            whole slides (TIFF, ...) to bags of tissue patches
  slam bags cells/ --out bags/ --negative-class LYT --positive-class BLA --bags 60 \\
      --bag-size 1000 --witness-rate 0.01          bags at a witness rate from cell classes
  slam inspect data/train.patches --bags            what a patch store holds
  slam pretrain data/train.patches --out runs/a     pretrain (checkpoints, metrics, resume)
  slam embed runs/a data/test.patches --out test.embed.safetensors
  slam mil train train.embed.safetensors --test test.embed.safetensors --out mil/
  slam eval --train train.embed.safetensors --test test.embed.safetensors   cell-level AUROC

  slam init --out model.safetensors                 a fresh ResNet-18 + projector
  slam dump-step --out step.safetensors             one step, every tensor, for cross-checks
  slam bench step                                   time one training step (ResNet-18, crop 64)
  slam bench embed                                  time the embedding forward pass (crop 224)

Run `slam <command> --help` for each command's options."
)]
struct Cli {
    /// Worker threads of the CPU engine (default: every core, or RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Synthesize bags, pretrain, embed, train MIL and print the results (no data needed).
    Demo(demo::DemoArgs),
    /// Write a synthetic cytology dataset: bags of generated normal and abnormal cells.
    Synth(synth::SynthArgs),
    /// Pack folders of PNG/JPEG images (one folder per bag) into a patch store.
    Pack(pack::PackArgs),
    /// Build bags at a chosen witness rate from folders of labelled cells: train and test stores.
    Bags(bags::BagsArgs),
    /// Tile whole-slide images (TIFF, PNG, JPEG, OpenSlide formats) into bags of tissue patches.
    Tile(tile::TileArgs),
    /// Describe a patch store: counts, pools, witness rates, bags.
    Inspect(inspect::InspectArgs),
    /// Pretrain the encoder on a patch store (SLAM-AGS, or an ablation).
    Pretrain(pretrain::PretrainArgs),
    /// Embed every patch of a store with a trained model.
    Embed(embed::EmbedArgs),
    /// Compare variants over seeds and witness rates: cell- and bag-level metrics, spread, paired differences.
    Experiment(experiment::ExperimentArgs),
    /// Instance-level evaluation of embeddings: linear probe, anomaly scores, retrieval, spread.
    Eval(eval::EvalArgs),
    /// Multiple-instance learning on embedded bags: gated attention (ABMIL) or PAMIL.
    #[command(subcommand)]
    Mil(mil::MilCommand),
    /// Write a freshly initialized model as a safetensors checkpoint with the reference names.
    Init(init::InitArgs),
    /// Run one training step and write its inputs, losses, gradients and states.
    DumpStep(dump_step::DumpStepArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn run(cli: &Cli, matches: &ArgMatches) -> Result<()> {
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot start the worker threads")?;
    }
    match &cli.command {
        Command::Demo(args) => demo::run(args, subcommand(matches, "demo")),
        Command::Experiment(args) => experiment::run(args, subcommand(matches, "experiment")),
        Command::Synth(args) => synth::run(args),
        Command::Pack(args) => pack::run(args),
        Command::Bags(args) => bags::run(args),
        Command::Tile(args) => tile::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Pretrain(args) => pretrain::run(args, subcommand(matches, "pretrain")),
        Command::Embed(args) => embed::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Mil(cmd) => mil::run(cmd),
        Command::Init(args) => init::run(args),
        Command::DumpStep(args) => dump_step::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

/// The matches of the subcommand `name` (which the parsed command says was given).
fn subcommand<'a>(matches: &'a ArgMatches, name: &str) -> &'a ArgMatches {
    matches
        .subcommand_matches(name)
        .unwrap_or_else(|| unreachable!("the {name} command was parsed"))
}

/// Runs the command line; errors are printed with their causes and give exit status 1.
pub fn main() -> ExitCode {
    // The matches are kept beside the parsed flags: `slam pretrain` asks which settings were
    // given on the command line (they override its config file).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(&cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
