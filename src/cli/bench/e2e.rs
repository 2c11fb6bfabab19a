//! `slam bench e2e`: end-to-end pretraining speed, from the stored u8 patches to the updated
//! parameters (sampling, augmentation, the four passes, surgery and SGD), on a synthetic
//! store at the reference configuration.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::median;
use crate::cli::args::{ArchArgs, Device, EngineArgs, GpuViewArgs, Matmul};
use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SynthConfig, write_dataset};
use crate::engine::Backend;
use crate::engine::cpu::CpuEngine;
use crate::pretrain::{Observer, PretrainConfig, Run, StepLog};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam bench e2e --device cuda                         (the reference configuration, TF32)
  slam bench e2e --device cuda --matmul bf16 --json
  slam bench e2e --device cuda --residency streamed    (pixels copied per step, not resident)
  slam bench e2e --patch-size 72 --crop 64 --batch 16 --width 8 --steps 3   (small, on the CPU)

Synthesizes a store of --patches cells at --patch-size (the reference patches are 250 x 250),
then pretrains on it for --warmup + --steps steps and reports the images through the network
per second (two views of every patch) over the timed steps, with the peak GPU memory on
--device cuda.")]
pub struct BenchE2eArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub gpu_views: GpuViewArgs,
    #[command(flatten)]
    pub arch: ArchArgs,
    /// Patches in the synthetic store.
    #[arg(long, default_value_t = 4096)]
    pub patches: usize,
    /// Side of the stored patches.
    #[arg(long, default_value_t = 250)]
    pub patch_size: usize,
    /// Side of the crops fed to the network.
    #[arg(long, default_value_t = 224)]
    pub crop: usize,
    /// Patches per step (split between the pools).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Records when each step ended.
struct StepClock {
    ends: Vec<Instant>,
    images: f64,
    bar: ProgressBar,
}

impl Observer for StepClock {
    fn step(&mut self, log: &StepLog) {
        self.ends.push(Instant::now());
        self.bar
            .set_message(format!("{:.0} images/s", log.images_per_s));
        self.bar.inc(1);
    }
}

pub fn run(args: &BenchE2eArgs) -> Result<()> {
    args.engine.check()?;
    args.gpu_views.check(&args.engine)?;
    ensure!(args.steps > 0, "--steps must be at least 1");
    let net = args.arch.config()?;
    let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
    let bag_size = args.patches.div_ceil(18).max(10);
    let plan = BagPlanConfig {
        bags: 20,
        bag_size,
        witness_rate: 0.1,
        abnormal_fraction: 0.5,
        train_fraction: 0.9,
        seed: 0,
    };
    let synth = SynthConfig {
        patch_size: args.patch_size,
        seed: 0,
    };
    let started = Instant::now();
    let data = write_dataset(&synth, &plan, dir.path(), false, &mut |_| {})?;
    let synth_seconds = started.elapsed().as_secs_f64();
    let total = args.warmup + args.steps;
    let config = PretrainConfig {
        store: data.paths.train.clone(),
        arch: args.arch.arch.clone(),
        width: Some(net.width),
        blocks: Some(net.blocks),
        out_dim: Some(net.out_dim),
        batch: args.batch,
        crop: args.crop,
        max_steps: Some(total),
        checkpoint_every: total + 1,
        ..PretrainConfig::default()
    };
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("e2e [{bar:30}] {pos}/{len} steps {msg}")?
            .progress_chars("=> "),
    );
    let mut clock = StepClock {
        ends: Vec::new(),
        images: 2.0 * args.batch as f64,
        bar,
    };
    let run_dir = dir.path().join("run");
    let (precision, gpu) = match args.engine.device {
        Device::Cpu => {
            let mut run = Run::create(&CpuEngine, &run_dir, config)?;
            run.train(&CpuEngine, &mut clock)?;
            (CpuEngine.precision(), None)
        }
        Device::Cuda => {
            let eng = args.engine.open_cuda(Matmul::Tf32)?;
            let mut run = Run::create(&eng, &run_dir, config)?;
            eng.reset_peak_memory()?;
            args.gpu_views.train(&eng, &mut run, &mut clock)?;
            (eng.precision(), Some(eng.peak_memory_bytes()?))
        }
    };
    clock.bar.finish_and_clear();
    ensure!(
        clock.ends.len() as u64 == total,
        "the run stopped after {} of {total} steps",
        clock.ends.len()
    );
    // The step ends' spacing after the warm-up: the loop's steady throughput, including the
    // waits a step's reported scalars impose.
    let timed = &clock.ends[args.warmup.max(1) as usize - 1..];
    let gaps: Vec<f64> = timed
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let step = if gaps.is_empty() {
        (clock.ends[0] - started).as_secs_f64()
    } else {
        median(gaps)
    };
    let images_per_s = clock.images / step;
    let result = serde_json::json!({
        "engine": args.engine.device.name(),
        "compute": precision,
        "views": match args.engine.device {
            Device::Cpu => "host".to_owned(),
            Device::Cuda => format!("{:?}", args.gpu_views.views).to_lowercase(),
        },
        "images_per_step": clock.images,
        "median_step_ms": step * 1e3,
        "images_per_s": images_per_s,
        "gpu_mem_bytes": gpu,
        "patches": args.patches,
        "patch_size": args.patch_size,
        "crop": args.crop,
        "batch": args.batch,
        "network": net.to_string(),
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "bench e2e: {net}, crop {} from {}px patches, batch {} ({} images per step), {} engine ({precision})",
            args.crop,
            args.patch_size,
            args.batch,
            clock.images,
            args.engine.device.name()
        );
        println!(
            "synthetic store  {:>10.1} s for {} patches",
            synth_seconds, data.train.patches
        );
        println!("median step      {:>10.1} ms", step * 1e3);
        println!("images/s         {:>10.1}", images_per_s);
        if let Some(bytes) = gpu {
            println!(
                "GPU memory peak  {:>10.2} GiB",
                bytes as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
