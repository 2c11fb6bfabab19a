//! The `slam` command line: parsing, dispatch and error reporting. The work itself is done by
//! the library; each command's module turns arguments into library calls and prints results.

mod args;
mod bench;
mod dump_step;
mod init;
mod synth;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "slam",
    version,
    about = "SLAM-AGS pretraining: slide-label aware multi-task learning with adaptive gradient surgery",
    after_help = "Examples:
  slam bench step                                   time one training step (ResNet-18, crop 64)
  slam init --out model.safetensors                 a fresh ResNet-18 + projector
  slam dump-step --out step.safetensors             one step, every tensor, for cross-checks
  slam synth --out data/synth --patch-size 64       a synthetic cytology dataset (bags of cells)

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
    /// Write a freshly initialized model as a safetensors checkpoint with the reference names.
    Init(init::InitArgs),
    /// Run one training step and write its inputs, losses, gradients and states.
    DumpStep(dump_step::DumpStepArgs),
    /// Write a synthetic cytology dataset: bags of generated normal and abnormal cells.
    Synth(synth::SynthArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot start the worker threads")?;
    }
    match &cli.command {
        Command::Init(args) => init::run(args),
        Command::DumpStep(args) => dump_step::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

/// Runs the command line; errors are printed with their causes and give exit status 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
