//! `slam bench`: speed measurements (`pipeline::bench`, `pipeline::kernels`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{Device, EngineArgs, with_engine};
use crate::engine::cuda::{CudaEngine, MatmulMode};
use crate::feed::ViewSettings;
use crate::pipeline::bench::{E2eBench, EmbedBench, StepBench, StepTiming, cpu_note};
use crate::pipeline::kernels::{KernelBench, KernelRow};
use crate::pipeline::layers::LayersBench;

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
    /// Images per second of the eval-mode embedding forward pass (what `slam embed` runs).
    #[command(after_help = "Examples:
  slam bench embed                                  (ResNet-18, crop 224, 64 images per pass)
  slam bench embed --crop 64 --batch 256 --passes 10
  slam bench embed --device cuda --json

A randomly initialized network on random inputs, batch norms with running statistics, to
the projector output. Reports the median over the timed passes, after the warm-up ones.
On the CPU the header names the processor and the SIMD level of the products.")]
    Embed(BenchEmbedArgs),
    /// Each distinct convolution and batch norm of one training pass, timed alone.
    #[command(after_help = "Examples:
  slam bench layers                                 (ResNet-18, crop 64, 32 images per pass)
  slam bench layers --crop 224 --batch 32 --runs 3 --json

Times every distinct convolution (forward; backward: input and weight gradients, the stem's
weight gradient only) and batch norm with ReLU (training forward; backward through the mask)
on random operands, and reports the fastest of --runs runs of each, with how many layers of
one pass have that shape. pytorch/bench_cpu.py layers prints PyTorch's times for the same
rows.")]
    Layers(BenchLayersArgs),
    /// Each CUDA kernel timed with CUDA events, against the device's copy bandwidth.
    #[command(after_help = "Examples:
  slam bench kernels                     (the reference sizes: 11,701,824 parameters; 2n = 256 rows of 512)
  slam bench kernels --params 1000000 --n 64 --dim 128 --runs 50

Needs a CUDA GPU; without one it fails with the reason. Reports the median and fastest run
of each op, GB/s counting the bytes each pass must move, and the share of the measured
device-to-device copy bandwidth.")]
    Kernels(BenchKernelsArgs),
    /// End-to-end pretraining images per second, from stored patches to updated parameters.
    #[command(after_help = "Examples:
  slam bench e2e --device cuda                         (the reference configuration, TF32)
  slam bench e2e --device cuda --matmul bf16 --json
  slam bench e2e --device cuda --residency streamed    (pixels copied per step, not resident)
  slam bench e2e --patch-size 72 --crop 64 --batch 16 --width 8 --steps 3   (small, on the CPU)

Synthesizes a store of --patches cells at --patch-size (the reference patches are 250 x 250),
then pretrains on it for --warmup + --steps steps and reports the images through the network
per second (two views of every patch) over the timed steps, with the peak GPU memory on
--device cuda.")]
    E2e(BenchE2eArgs),
}

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub bench: StepBench,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchEmbedArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub bench: EmbedBench,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchLayersArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub bench: LayersBench,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    #[command(flatten)]
    pub bench: KernelBench,
}

#[derive(Args, Debug)]
pub struct BenchE2eArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub views: ViewSettings,
    #[command(flatten)]
    pub bench: E2eBench,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Step(args) => step(args),
        BenchCommand::Embed(args) => embed(args),
        BenchCommand::Layers(args) => layers(args),
        BenchCommand::Kernels(args) => kernels(args),
        BenchCommand::E2e(args) => e2e(args),
    }
}

fn steps_bar(len: u64, template: &str) -> Result<ProgressBar> {
    Ok(ProgressBar::new(len)
        .with_style(ProgressStyle::with_template(template)?.progress_chars("=> ")))
}

fn step(args: &BenchStepArgs) -> Result<()> {
    let bench = &args.bench;
    args.engine.check()?;
    bench.validate()?;
    let bar = steps_bar(
        (bench.warmup + bench.steps) as u64,
        "{prefix} [{bar:30}] {pos}/{len} steps {msg}",
    )?;
    let images = 2 * bench.batch;
    let mut on_step = |i: usize, seconds: f64| {
        bar.set_prefix(if i + 1 < bench.warmup {
            "warm-up"
        } else {
            "timing "
        });
        bar.set_message(format!("{:.1} images/s", images as f64 / seconds));
        bar.inc(1);
    };
    // The settings go to stderr under --json, which keeps stdout to the one object.
    let show = |header: String| match args.json {
        true => eprintln!("{header}"),
        false => println!("{header}"),
    };
    let timing = match args.engine.device {
        Device::Cpu => {
            let eng = &crate::engine::cpu::CpuEngine;
            show(bench.describe(eng)?);
            bench.run(eng, &mut on_step)?
        }
        Device::Cuda => {
            let eng = args.engine.open_cuda(MatmulMode::Tf32)?;
            show(bench.describe(&eng)?);
            bench.run_on_cuda(&eng, &mut on_step)?
        }
    };
    bar.finish_and_clear();
    print_step_timing(&timing, args.json)
}

fn embed(args: &BenchEmbedArgs) -> Result<()> {
    let bench = &args.bench;
    let bar = steps_bar(
        (bench.warmup + bench.passes) as u64,
        "embed [{bar:30}] {pos}/{len} passes {msg}",
    )?;
    let mut on_pass = |_: usize, seconds: f64| {
        bar.set_message(format!("{:.1} images/s", bench.batch as f64 / seconds));
        bar.inc(1);
    };
    let (header, timing) = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        bench
            .describe(eng)
            .and_then(|header| Ok((header, bench.run(eng, &mut on_pass)?)))
    })?;
    bar.finish_and_clear();
    if args.json {
        eprintln!("{header}");
        println!("{}", serde_json::to_string(&timing)?);
        return Ok(());
    }
    println!("{header}");
    println!("median pass      {:>10.1} ms", timing.median_pass_ms);
    println!("images/s         {:>10.1}", timing.images_per_s);
    Ok(())
}

fn layers(args: &BenchLayersArgs) -> Result<()> {
    let bench = &args.bench;
    let net = bench.net.resolve()?;
    let header = format!(
        "bench layers: {net}, crop {}, {} images per pass, fastest of {} runs, {} engine",
        bench.crop,
        bench.batch,
        bench.runs,
        args.engine.device.name()
    );
    let cpu = cpu_note(args.engine.device.name());
    let bar = ProgressBar::new_spinner();
    let mut on_layer = |row: &crate::pipeline::layers::LayerTiming| {
        bar.set_message(row.name.clone());
        bar.tick();
    };
    let rows = with_engine!(args.engine, MatmulMode::Tf32, |eng| bench
        .run(eng, &mut on_layer))?;
    bar.finish_and_clear();
    if args.json {
        eprintln!("{header}{cpu}");
        println!("{}", serde_json::json!({ "rows": rows }));
        return Ok(());
    }
    println!("{header}{cpu}");
    println!(
        "{:<28} {:>5} {:>12} {:>12}",
        "layer", "count", "forward ms", "backward ms"
    );
    for row in &rows {
        println!(
            "{:<28} {:>5} {:>12.2} {:>12.2}",
            row.name, row.count, row.forward_ms, row.backward_ms
        );
    }
    Ok(())
}

fn print_step_timing(t: &StepTiming, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(t)?);
        return Ok(());
    }
    println!("median step      {:>10.1} ms", t.median_step_ms);
    println!("images/s         {:>10.1}", t.images_per_s);
    println!(
        "GFLOP/s          {:>10.1} (forward + backward, convolutions and linear layers)",
        t.flops_per_s / 1e9
    );
    if let Some(rate) = t.matmul_rate {
        println!(
            "matmul ceiling   {:>10.1} GFLOP/s measured ({} sgemm 8192^3, random operands): the step reaches {:.1} %",
            rate / 1e9,
            t.precision,
            100.0 * t.flops_per_s / rate
        );
    }
    if let Some(peak) = t.peak_memory_bytes {
        println!(
            "GPU memory peak  {:>10.2} GiB (the stream-ordered pool's high-water mark)",
            peak as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "AGS + SGD share  {:>10.2} % of the step (device time: the trainer waits for each part)",
        100.0 * t.update_share
    );
    Ok(())
}

fn kernels(args: &BenchKernelsArgs) -> Result<()> {
    args.bench.validate()?;
    let eng = CudaEngine::new(args.gpu).context("slam bench kernels needs a CUDA GPU")?;
    let (major, minor) = eng.compute_capability();
    let (dmaj, dmin) = eng.driver_version()?;
    let sources: Vec<String> = eng
        .kernel_sources()
        .iter()
        .map(|(name, source)| format!("{name}.cu: {source:?}"))
        .collect();
    println!(
        "bench kernels: {} (sm_{major}{minor}, {} SMs), driver CUDA {dmaj}.{dmin}; {}",
        eng.device_name(),
        eng.sm_count(),
        sources.join(", ")
    );
    println!(
        "median and fastest of {} runs after {} warm-up runs, each timed with CUDA events \
         behind two untimed runs",
        args.bench.runs, args.bench.warmup
    );
    print_kernel_rows(&args.bench.run(&eng)?);
    Ok(())
}

/// The table: each row's GB/s and share of the copy bandwidth (the first row), its TFLOP/s.
fn print_kernel_rows(rows: &[KernelRow]) {
    let copy_gbs = rows[0].bytes.unwrap_or(0.0) / rows[0].median_us / 1e3;
    println!(
        "{:<42} {:>22} {:>10} {:>10} {:>10} {:>9} {:>10}",
        "op", "size", "median us", "min us", "GB/s", "% copy", "TFLOP/s"
    );
    for row in rows {
        let gbs = row.bytes.map(|b| b / row.median_us / 1e3);
        let cell =
            |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        println!(
            "{:<42} {:>22} {:>10.1} {:>10.1} {:>10} {:>9} {:>10}",
            row.name,
            row.size,
            row.median_us,
            row.min_us,
            cell(gbs, 0),
            cell(gbs.map(|g| 100.0 * g / copy_gbs), 1),
            cell(row.flops.map(|f| f / row.median_us / 1e6), 2),
        );
    }
    println!(
        "GB/s counts the bytes each pass must move (every input read once, every output written \
         once); the copy counts bytes read + written. A convolution's FLOPs are 2 x its \
         multiply-adds (im2col's unfolding and zero padding not counted)."
    );
}

fn e2e(args: &BenchE2eArgs) -> Result<()> {
    let bench = &args.bench;
    args.engine.check_views(&args.views)?;
    let bar = steps_bar(
        bench.warmup + bench.steps,
        "e2e [{bar:30}] {pos}/{len} steps {msg}",
    )?;
    let mut on_step = |log: &crate::pretrain::StepLog| {
        bar.set_message(format!("{:.0} images/s", log.images_per_s));
        bar.inc(1);
    };
    let timing = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        bench.run(eng, &args.views, &mut on_step)
    })?;
    bar.finish_and_clear();
    let net = bench.net.resolve()?;
    let device = args.engine.device;
    let result = serde_json::json!({
        "engine": device.name(),
        "compute": timing.precision,
        "views": match device {
            Device::Cpu => "host".to_owned(),
            Device::Cuda => format!("{:?}", args.views.views).to_lowercase(),
        },
        "images_per_step": timing.images_per_step,
        "median_step_ms": timing.median_step_ms,
        "images_per_s": timing.images_per_s,
        "gpu_mem_bytes": timing.peak_memory_bytes,
        "patches": bench.patches,
        "patch_size": bench.patch_size,
        "crop": bench.crop,
        "batch": bench.batch,
        "network": net.to_string(),
    });
    if args.json {
        println!("{result}");
        return Ok(());
    }
    println!(
        "bench e2e: {net}, crop {} from {}px patches, batch {} ({} images per step), {} engine ({})",
        bench.crop,
        bench.patch_size,
        bench.batch,
        timing.images_per_step,
        device.name(),
        timing.precision
    );
    println!(
        "synthetic store  {:>10.1} s for {} patches",
        timing.synth_seconds, timing.store_patches
    );
    println!("median step      {:>10.1} ms", timing.median_step_ms);
    println!("images/s         {:>10.1}", timing.images_per_s);
    if let Some(bytes) = timing.peak_memory_bytes {
        println!(
            "GPU memory peak  {:>10.2} GiB",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}
