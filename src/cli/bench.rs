//! `slam bench`: speed measurements.

mod e2e;
mod kernels;

use std::time::Instant;

use anyhow::{Result, ensure};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{ArchArgs, Device, EngineArgs, Matmul, StepArgs};
use crate::engine::Engine;
use crate::engine::cpu::CpuEngine;
use crate::model::{HostBatch, ModelState, Network, Trainer};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Images per second of the full SLAM-AGS training step on random data.
    #[command(after_help = "Examples:
  slam bench step
  slam bench step --arch resnet18 --crop 64 --batch 64 --steps 10
  slam bench step --crop 224 --batch 256 --steps 3        (the reference configuration)
  slam bench step --device cuda --crop 224 --batch 256 --steps 10 --warmup 3
  slam bench step --device cuda --matmul bf16 --json

On --device cuda the products default to TF32 (--matmul exact|tf32|bf16), and the report
adds the peak GPU memory and the share of the device's measured matrix rate reached.

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
    /// End-to-end pretraining images per second, from stored patches to updated parameters.
    E2e(e2e::BenchE2eArgs),
}

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
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
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
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
        BenchCommand::E2e(args) => e2e::run(args),
    }
}

/// What the timed steps measured.
#[derive(Debug, serde::Serialize)]
struct StepTiming {
    engine: &'static str,
    precision: &'static str,
    images_per_step: usize,
    median_step_ms: f64,
    images_per_s: f64,
    /// Forward + backward FLOP/s of the convolutions and linear layers.
    flops_per_s: f64,
    /// Share of the step in the surgery reduction and the fused update.
    update_share: f64,
}

fn run_step(args: &BenchStepArgs) -> Result<()> {
    args.engine.check()?;
    ensure!(args.steps > 0, "--steps must be at least 1");
    ensure!(
        args.batch >= 4,
        "--batch must be at least 4 (two images per view and kind)"
    );
    match args.engine.device {
        Device::Cpu => {
            let timing = time_steps(&CpuEngine, args)?;
            print_timing(args, &timing, None)
        }
        Device::Cuda => {
            let eng = args.engine.open_cuda(Matmul::Tf32)?;
            eng.reset_peak_memory()?;
            let timing = time_steps(&eng, args)?;
            let peak = eng.peak_memory_bytes()?;
            let rate = eng.matmul_rate()?;
            print_timing(args, &timing, Some((peak, rate)))
        }
    }
}

fn time_steps<E: Engine>(eng: &E, args: &BenchStepArgs) -> Result<StepTiming> {
    let step_cfg = args.step.config()?;
    let config = args.arch.config()?;
    let n_pos = args.batch / 2;
    let batch = HostBatch::random(n_pos, args.batch - n_pos, args.crop, 0);
    let mut trainer = Trainer::new(eng, &ModelState::init(config, 0)?)?;
    let device_batch = batch.upload(eng)?;
    let images = 2 * args.batch;
    let threads = match eng.name() {
        "cpu" => format!(" on {} threads", rayon::current_num_threads()),
        _ => String::new(),
    };
    // The settings go to stderr under --json, which keeps stdout to the one object.
    let header = format!(
        "bench step: {config}, {} parameters, crop {}, batch {} ({} + {}), {images} images per step, {} engine ({}){threads}",
        Network::new(config).param_len(),
        args.crop,
        args.batch,
        batch.n_pos,
        batch.n_neg,
        eng.name(),
        eng.precision(),
    );
    if args.json {
        eprintln!("{header}");
    } else {
        println!("{header}");
    }
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
        let report = trainer.step(eng, &device_batch, &step_cfg, step_cfg.sgd.lr as f64, None)?;
        // The step's last op (the update) is queued, not finished: wait for it.
        eng.download(eng.view(&trainer.params, 0..1))?;
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
    let flops = 3.0 * 2.0 * Network::new(config).forward_macs(args.crop) as f64 * images as f64;
    Ok(StepTiming {
        engine: eng.name(),
        precision: eng.precision(),
        images_per_step: images,
        median_step_ms: step * 1e3,
        images_per_s: images as f64 / step,
        flops_per_s: flops / step,
        update_share: median(update_share),
    })
}

/// Prints the timing; on a GPU also the peak device memory and the achieved share of the
/// device's measured matrix rate.
fn print_timing(args: &BenchStepArgs, t: &StepTiming, gpu: Option<(u64, f64)>) -> Result<()> {
    if args.json {
        let mut value = serde_json::to_value(t)?;
        if let Some((peak, rate)) = gpu {
            value["gpu_mem_bytes"] = peak.into();
            value["gpu_matmul_flops_per_s"] = rate.into();
        }
        println!("{value}");
        return Ok(());
    }
    println!("median step      {:>10.1} ms", t.median_step_ms);
    println!("images/s         {:>10.1}", t.images_per_s);
    println!(
        "GFLOP/s          {:>10.1} (forward + backward, convolutions and linear layers)",
        t.flops_per_s / 1e9
    );
    if let Some((peak, rate)) = gpu {
        println!(
            "matmul ceiling   {:>10.1} GFLOP/s measured ({} sgemm 8192^3): the step reaches {:.1} %",
            rate / 1e9,
            t.precision,
            100.0 * t.flops_per_s / rate
        );
        println!(
            "GPU memory peak  {:>10.2} GiB (the stream-ordered pool's high-water mark)",
            peak as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "AGS + SGD share  {:>10.2} % of the step",
        100.0 * t.update_share
    );
    Ok(())
}
