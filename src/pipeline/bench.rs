//! Speed measurements: the training step on random inputs (`slam bench step`), the
//! eval-mode embedding forward pass (`slam bench embed`), and pretraining end to end from
//! stored patches to updated parameters (`slam bench e2e`).

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde::Serialize;

use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SynthConfig, write_dataset};
use crate::data::input::batch::HostBatch;
use crate::engine::cpu::CpuInfo;
use crate::engine::cuda::CudaEngine;
use crate::engine::{Backend, Engine};
use crate::feed::{Feed, ViewSettings};
use crate::model::{ModelState, NetSpec, Network, StepBatch, StepConfig, Trainer};
use crate::pretrain::{Observer, PretrainConfig, Run, StepLog};

/// The median of `v` (which must not be empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

/// Runs `body` `warmup` untimed then `timed` timed times, calling `on_run(index, seconds)`
/// after each; returns the timed runs' seconds and what `body` returned for each.
fn timed_runs<T>(
    warmup: usize,
    timed: usize,
    on_run: &mut dyn FnMut(usize, f64),
    mut body: impl FnMut() -> Result<T>,
) -> Result<Vec<(f64, T)>> {
    let mut runs = Vec::with_capacity(timed);
    for i in 0..warmup + timed {
        let start = Instant::now();
        let out = body()?;
        let seconds = start.elapsed().as_secs_f64();
        if i >= warmup {
            runs.push((seconds, out));
        }
        on_run(i, seconds);
    }
    Ok(runs)
}

/// What `slam bench step` times.
#[derive(Args, Clone, Debug)]
pub struct StepBench {
    #[command(flatten)]
    pub net: NetSpec,
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
    pub step: StepConfig,
}

/// What the timed steps measured.
#[derive(Debug, Serialize)]
pub struct StepTiming {
    pub engine: &'static str,
    pub precision: &'static str,
    pub images_per_step: usize,
    pub median_step_ms: f64,
    pub images_per_s: f64,
    /// Forward + backward FLOP/s of the convolutions and linear layers.
    pub flops_per_s: f64,
    /// Share of the step in the surgery reduction and the fused update.
    pub update_share: f64,
    /// The device memory high-water mark (the CUDA engine's stream-ordered pool).
    #[serde(rename = "gpu_mem_bytes", skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The device's measured matrix rate in the products' precision (FLOP/s).
    #[serde(
        rename = "gpu_matmul_flops_per_s",
        skip_serializing_if = "Option::is_none"
    )]
    pub matmul_rate: Option<f64>,
}

impl StepBench {
    /// The settings checked, and the network they describe.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be at least 1");
        ensure!(
            self.batch >= 4,
            "--batch must be at least 4 (two images per view and kind)"
        );
        self.step.validate()?;
        self.net.resolve()?;
        Ok(())
    }

    /// One line naming what is timed on `eng`.
    pub fn describe<E: Engine>(&self, eng: &E) -> Result<String> {
        let config = self.net.resolve()?;
        let n_pos = self.batch / 2;
        Ok(format!(
            "bench step: {config}, {} parameters, crop {}, batch {} ({} + {}), {} images per step, {} engine ({}){threads}",
            Network::new(config).param_len(),
            self.crop,
            self.batch,
            n_pos,
            self.batch - n_pos,
            2 * self.batch,
            eng.name(),
            eng.precision(),
            threads = cpu_note(eng.name()),
        ))
    }

    /// Times the step on `eng`: `warmup` untimed steps, then `steps` timed ones; calls
    /// `on_step(index, seconds)` after each. Reports the median.
    pub fn run<E: Engine>(
        &self,
        eng: &E,
        on_step: &mut dyn FnMut(usize, f64),
    ) -> Result<StepTiming> {
        self.validate()?;
        let config = self.net.resolve()?;
        let n_pos = self.batch / 2;
        let batch = HostBatch::random(n_pos, self.batch - n_pos, self.crop, 0);
        let mut trainer = Trainer::new(eng, &ModelState::init(config, 0)?)?;
        // The update's share is of the device's time, not of its launch.
        trainer.timed = true;
        let device_batch = StepBatch::upload(eng, &batch)?;
        let images = 2 * self.batch;
        let runs = timed_runs(self.warmup, self.steps, on_step, || {
            trainer.step(eng, &device_batch, &self.step, self.step.lr as f64, None)
        })?;
        let update_share = runs.iter().map(|(s, r)| r.seconds_update / s).collect();
        let step = median(runs.into_iter().map(|(s, _)| s).collect());
        let flops = 3.0 * 2.0 * Network::new(config).forward_macs(self.crop) as f64 * images as f64;
        Ok(StepTiming {
            engine: eng.name(),
            precision: eng.precision(),
            images_per_step: images,
            median_step_ms: step * 1e3,
            images_per_s: images as f64 / step,
            flops_per_s: flops / step,
            update_share: median(update_share),
            peak_memory_bytes: None,
            matmul_rate: None,
        })
    }

    /// [`StepBench::run`] on the GPU, with the peak device memory and the device's matrix
    /// rate.
    pub fn run_on_cuda(
        &self,
        eng: &CudaEngine,
        on_step: &mut dyn FnMut(usize, f64),
    ) -> Result<StepTiming> {
        eng.reset_peak_memory()?;
        let mut timing = self.run(eng, on_step)?;
        timing.peak_memory_bytes = eng.peak_memory_bytes()?;
        timing.matmul_rate = Some(eng.matmul_rate()?);
        Ok(timing)
    }
}

/// `" on N threads of CPU"` for the CPU engine (by its name), nothing for others.
pub fn cpu_note(engine: &str) -> String {
    match engine {
        "cpu" => format!(
            " on {} threads of {}",
            rayon::current_num_threads(),
            CpuInfo::detect()
        ),
        _ => String::new(),
    }
}

/// What `slam bench embed` times.
#[derive(Args, Clone, Debug)]
pub struct EmbedBench {
    #[command(flatten)]
    pub net: NetSpec,
    /// Side of the center crops.
    #[arg(long, default_value_t = 224)]
    pub crop: usize,
    /// Images per forward pass (`slam embed --batch`).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed passes.
    #[arg(long, default_value_t = 5)]
    pub passes: usize,
    /// Untimed passes first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

/// What the timed passes measured.
#[derive(Debug, Serialize)]
pub struct EmbedTiming {
    pub engine: &'static str,
    pub precision: &'static str,
    pub images_per_pass: usize,
    pub median_pass_ms: f64,
    pub images_per_s: f64,
}

impl EmbedBench {
    /// One line naming what is timed on `eng`.
    pub fn describe<E: Engine>(&self, eng: &E) -> Result<String> {
        Ok(format!(
            "bench embed: {}, eval-mode forward to the projector output, crop {}, {} images per pass, {} engine ({}){threads}",
            self.net.resolve()?,
            self.crop,
            self.batch,
            eng.name(),
            eng.precision(),
            threads = cpu_note(eng.name()),
        ))
    }

    /// Times the eval-mode forward pass (what `slam embed` runs per batch) of a randomly
    /// initialized network on random inputs: `warmup` untimed passes, then `passes` timed
    /// ones; calls `on_pass(index, seconds)` after each. Reports the median.
    pub fn run<E: Engine>(
        &self,
        eng: &E,
        on_pass: &mut dyn FnMut(usize, f64),
    ) -> Result<EmbedTiming> {
        ensure!(self.passes > 0, "--passes must be at least 1");
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.crop > 0, "--crop must be at least 1");
        let state = ModelState::init(self.net.resolve()?, 0)?;
        let net = state.validate()?;
        let params = eng.upload(&state.params)?;
        let running = eng.upload(&state.running)?;
        let input = eng.upload(&HostBatch::random(self.batch, 0, self.crop, 0).pos_i)?;
        let runs = timed_runs(self.warmup, self.passes, on_pass, || {
            drop(net.forward_eval(eng, &params, &running, &input, self.batch, self.crop)?);
            eng.synchronize()
        })?;
        let pass = median(runs.into_iter().map(|(s, ())| s).collect());
        Ok(EmbedTiming {
            engine: eng.name(),
            precision: eng.precision(),
            images_per_pass: self.batch,
            median_pass_ms: pass * 1e3,
            images_per_s: self.batch as f64 / pass,
        })
    }
}

/// What `slam bench e2e` times.
#[derive(Args, Clone, Debug)]
pub struct E2eBench {
    #[command(flatten)]
    pub net: NetSpec,
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
}

/// What the end-to-end run measured.
#[derive(Debug, Serialize)]
pub struct E2eTiming {
    pub synth_seconds: f64,
    pub store_patches: usize,
    pub images_per_step: f64,
    pub median_step_ms: f64,
    pub images_per_s: f64,
    pub precision: &'static str,
    pub peak_memory_bytes: Option<u64>,
}

/// Records when each step ended, and reports each step to the caller.
struct StepClock<'a> {
    ends: Vec<Instant>,
    on_step: &'a mut dyn FnMut(&StepLog),
}

impl Observer for StepClock<'_> {
    fn step(&mut self, log: &StepLog) {
        self.ends.push(Instant::now());
        (self.on_step)(log);
    }
}

impl E2eBench {
    /// Synthesizes a store of `patches` cells in a temporary folder, then pretrains on it for
    /// `warmup + steps` steps with the reference's settings (at this shape and batch), the
    /// views rendered as `views` says; calls `on_step` after each step. Reports the median
    /// spacing of the step ends after the warm-up: the loop's steady throughput, including
    /// the waits a step's reported scalars impose.
    pub fn run<E: Feed>(
        &self,
        eng: &E,
        views: &ViewSettings,
        on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<E2eTiming> {
        ensure!(self.steps > 0, "--steps must be at least 1");
        self.net.resolve()?;
        let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
        let plan = BagPlanConfig {
            bags: 20,
            bag_size: self.patches.div_ceil(18).max(10),
            witness_rate: 0.1,
            abnormal_fraction: 0.5,
            train_fraction: 0.9,
            seed: 0,
        };
        let synth = SynthConfig {
            patch_size: self.patch_size,
            seed: 0,
            eval_cells: 0,
        };
        let started = Instant::now();
        let data = write_dataset(&synth, &plan, dir.path(), false, &mut |_| {})?;
        let synth_seconds = started.elapsed().as_secs_f64();
        let total = self.warmup + self.steps;
        let config = PretrainConfig {
            store: data.paths.train.clone(),
            net: self.net.clone(),
            batch: self.batch,
            crop: self.crop,
            max_steps: Some(total),
            checkpoint_every: total + 1,
            ..PretrainConfig::default()
        };
        let mut run = Run::create(eng, &dir.path().join("run"), config)?;
        eng.reset_peak_memory()?;
        let mut clock = StepClock {
            ends: Vec::new(),
            on_step,
        };
        run.train_fed(eng, views, &mut clock)?;
        let ends = clock.ends;
        ensure!(
            ends.len() as u64 == total,
            "the run stopped after {} of {total} steps",
            ends.len()
        );
        let timed = &ends[self.warmup.max(1) as usize - 1..];
        let gaps: Vec<f64> = timed
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let step = if gaps.is_empty() {
            (ends[0] - started).as_secs_f64()
        } else {
            median(gaps)
        };
        let images = 2.0 * self.batch as f64;
        Ok(E2eTiming {
            synth_seconds,
            store_patches: data.train.patches,
            images_per_step: images,
            median_step_ms: step * 1e3,
            images_per_s: images / step,
            precision: eng.precision(),
            peak_memory_bytes: eng.peak_memory_bytes()?,
        })
    }
}
