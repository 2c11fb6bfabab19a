//! `slam bench`: speed measurements.

mod kernels;

use std::time::Instant;

use anyhow::{Result, ensure};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{ArchArgs, Device, StepArgs};
use crate::engine::cpu::CpuEngine;
use crate::model::{HostBatch, ModelState, Network, Trainer};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Images per second of the full SLAM-AGS training step on random data.
    #[command(after_help = "Examples:
  slam bench step
  slam bench step --arch resnet18 --crop 64 --batch 64 --steps 10
  slam bench step --crop 224 --batch 256 --steps 3        (the reference configuration)

Each step runs 2 x batch images through the network (two views of every patch). Reports
the median over the timed steps, after the warm-up ones.")]
    Step(BenchStepArgs),
    /// Each CUDA kernel timed with CUDA events, against the device's copy bandwidth.
    #[command(after_help = "Examples:
  slam bench kernels                     (the reference sizes: 11,701,824 parameters; 2n = 256 rows of 512)
  slam bench kernels --params 1000000 --n 64 --dim 128 --runs 50

Needs a CUDA GPU; without one it fails with the reason. Reports the median and fastest run
of each op, GB/s counting the bytes each pass must move, and the share of the measured
device-to-device copy bandwidth.")]
    Kernels(kernels::BenchKernelsArgs),
}

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Side of the input crops.
    #[arg(long, default_value_t = 64)]
    pub crop: usize,
    /// Patches per step, half slide-positive and half slide-negative.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub step: StepArgs,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

pub fn run(cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Step(args) => run_step(args),
        BenchCommand::Kernels(args) => kernels::run(args),
    }
}

fn run_step(args: &BenchStepArgs) -> Result<()> {
    args.device.require_available()?;
    ensure!(args.steps > 0, "--steps must be at least 1");
    ensure!(
        args.batch >= 4,
        "--batch must be at least 4 (two images per view and kind)"
    );
    let step_cfg = args.step.config()?;
    let config = args.arch.config()?;
    let n_pos = args.batch / 2;
    let batch = HostBatch::random(n_pos, args.batch - n_pos, args.crop, 0);
    let eng = CpuEngine;
    let mut trainer = Trainer::new(&eng, &ModelState::init(config, 0)?)?;
    let device_batch = batch.upload(&eng)?;
    let images = 2 * args.batch;
    println!(
        "bench step: {config}, {} parameters, crop {}, batch {} ({} + {}), {images} images per step, {} engine on {} threads",
        Network::new(config).param_len(),
        args.crop,
        args.batch,
        batch.n_pos,
        batch.n_neg,
        args.device
            .to_possible_value()
            .expect("devices have names")
            .get_name(),
        rayon::current_num_threads()
    );
    let bar = ProgressBar::new((args.warmup + args.steps) as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")?
            .progress_chars("=> "),
    );
    let (mut step_seconds, mut update_share) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        bar.set_prefix(if i < args.warmup {
            "warm-up"
        } else {
            "timing "
        });
        let start = Instant::now();
        let report = trainer.step(&eng, &device_batch, &step_cfg, step_cfg.sgd.lr as f64, None)?;
        let seconds = start.elapsed().as_secs_f64();
        if i >= args.warmup {
            step_seconds.push(seconds);
            update_share.push(report.seconds_update / seconds);
        }
        bar.set_message(format!("{:.1} images/s", images as f64 / seconds));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let step = median(step_seconds);
    println!("median step      {:>10.1} ms", step * 1e3);
    println!("images/s         {:>10.1}", images as f64 / step);
    let flops = 3.0 * 2.0 * Network::new(config).forward_macs(args.crop) as f64 * images as f64;
    println!(
        "GFLOP/s          {:>10.1} (forward + backward, convolutions and linear layers)",
        flops / step / 1e9
    );
    println!(
        "AGS + SGD share  {:>10.2} % of the step",
        100.0 * median(update_share)
    );
    Ok(())
}
