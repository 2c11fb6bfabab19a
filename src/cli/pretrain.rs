//! `slam pretrain`: a pretraining run from a patch store, with metrics, checkpoints and resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{Device, EngineArgs, GpuViewArgs, Matmul};
use crate::data::input::sampler::SamplerMode;
use crate::engine::Engine;
use crate::engine::cpu::CpuEngine;
use crate::model::Surgery;
use crate::pretrain::{self, EpochLog, Objective, Observer, PretrainConfig, Run, StepLog};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam pretrain data/train.patches --out runs/slam
  slam pretrain data/train.patches --out runs/small --arch resnet10 --width 16 --crop 48 --batch 32 --epochs 5
  slam pretrain --config run.toml --out runs/from-config --seed 3
  slam pretrain --resume runs/slam                         continue after a stop or crash
  slam pretrain --resume runs/slam --max-steps 20000       ... and go further
  slam pretrain data/train.patches --out runs/gpu --device cuda          on an NVIDIA GPU
  slam pretrain data/train.patches --out runs/gpu --device cuda --matmul bf16 --residency streamed

Defaults are the reference's: ResNet-18, out_dim 512, batch 256, 150 epochs (10 warm-up),
lr 1e-3, momentum 0.9, weight decay 1e-4, temperature 0.07, crop 224. A TOML config takes
the same names as the flags (with _ for -); flags override it. The run folder gets
config.toml, metrics.jsonl (one line per step), epochs.jsonl, checkpoints/ and, at the end,
model.safetensors (the reference state_dict: load_state_dict(..., strict=True) takes it).

On --device cuda the layers' products use TF32 unless --matmul says otherwise, and the views
are rendered on the GPU from the store's pixels, uploaded once when they fit (--views,
--residency); the views are the CPU augmentation's, so runs match across engines up to the
products' rounding.")]
pub struct PretrainArgs {
    /// Patch store to pretrain on (from `slam synth`, `slam bags` or `slam pack`).
    pub store: Option<PathBuf>,
    /// Run folder to create (must be empty or absent).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "store"])]
    pub resume: Option<PathBuf>,
    /// TOML file of settings (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub gpu_views: GpuViewArgs,
    /// Architecture: resnet18 (the reference), resnet10 or resnet34.
    #[arg(long)]
    pub arch: Option<String>,
    /// Channels of the stem and first stage (the reference: 64).
    #[arg(long)]
    pub width: Option<usize>,
    /// BasicBlocks per stage, e.g. 2,2,2,2.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<usize>>,
    /// Size of the projector output z (the reference: 512).
    #[arg(long)]
    pub out_dim: Option<usize>,
    /// Patches per step, split between abnormal-bag and normal-bag patches by pool size.
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    #[arg(long)]
    pub warmup_epochs: Option<u32>,
    /// Stop after this many steps in all (the schedule still spans --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub momentum: Option<f32>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Side of the random (and center) crops fed to the network.
    #[arg(long)]
    pub crop: Option<usize>,
    /// How the two task gradients are combined.
    #[arg(long, value_enum)]
    pub surgery: Option<Surgery>,
    /// slam (both tasks, slide labels) or simclr (contrastive only, no labels).
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// disjoint (every patch once per epoch) or sliding (the reference's overlapping batches).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerMode>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between checkpoints.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
}

/// Applies every given setting flag to a config (or, with `None`, lists the given ones).
macro_rules! settings {
    ($args:expr, $config:expr, $given:expr; $($field:ident),*; $($optional:ident),*) => {{
        $(if let Some(value) = &$args.$field {
            $given.push(stringify!($field));
            if let Some(c) = $config.as_mut() {
                c.$field = value.clone();
            }
        })*
        $(if $args.$optional.is_some() {
            $given.push(stringify!($optional));
            if let Some(c) = $config.as_mut() {
                c.$optional = $args.$optional.clone();
            }
        })*
    }};
}

impl PretrainArgs {
    /// Applies the setting flags to `config` (when given); returns the names of those set.
    fn apply(&self, mut config: Option<&mut PretrainConfig>) -> Vec<&'static str> {
        let mut given = Vec::new();
        settings!(self, config, given;
            store, arch, batch, epochs, warmup_epochs, lr, momentum, weight_decay,
            temperature, crop, surgery, objective, sampler, seed, checkpoint_every;
            width, out_dim, max_steps);
        given
    }

    /// Defaults, then the config file, then the flags.
    fn config(&self) -> Result<PretrainConfig> {
        let mut c = match &self.config {
            Some(path) => PretrainConfig::from_toml_file(path)?,
            None => PretrainConfig::default(),
        };
        self.apply(Some(&mut c));
        if let Some(blocks) = &self.blocks {
            c.blocks = Some(blocks.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("--blocks takes 4 numbers (one per stage), got {blocks:?}")
            })?);
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: &PretrainArgs) -> Result<()> {
    // First, so that a signal during the set-up also ends in a clean stop.
    let mut progress = Progress::new();
    progress.stop_on_signals()?;
    args.engine.check()?;
    args.gpu_views.check(&args.engine)?;
    let (run, state) = match args.engine.device {
        Device::Cpu => {
            let eng = &CpuEngine;
            let mut run = open_run(eng, args)?;
            let state = run.train(eng, &mut progress)?;
            (run, state)
        }
        Device::Cuda => {
            let eng = args.engine.open_cuda(Matmul::Tf32)?;
            let mut run = open_run(&eng, args)?;
            let state = args.gpu_views.train(&eng, &mut run, &mut progress)?;
            (run, state)
        }
    };
    progress.bar.finish_and_clear();
    ensure!(
        run.step() == run.end_step(),
        "stopped on request at step {} of {}, after writing a checkpoint; continue with          `slam pretrain --resume {}`",
        run.step(),
        run.end_step(),
        run.dir.display()
    );
    let model = run.dir.join(pretrain::MODEL_FILE);
    println!(
        "trained {} ({}) to step {} in {:.1} s; model: {}",
        run.config.store.display(),
        state.config,
        run.step(),
        progress.bar.elapsed().as_secs_f64(),
        model.display()
    );
    Ok(())
}

/// The progress bar: losses, gradient cosine and speed; a line per epoch and checkpoint.
/// With [`Progress::stop_on_signals`], SIGINT and SIGTERM ask the run to stop cleanly.
pub struct Progress {
    pub bar: ProgressBar,
    stop: Arc<AtomicBool>,
}

impl Progress {
    /// Makes SIGINT (Ctrl-C) and SIGTERM request a clean stop (checkpoint, then exit)
    /// instead of killing the process.
    pub fn stop_on_signals(&mut self) -> Result<()> {
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&self.stop))
                .context("cannot install the signal handlers")?;
        }
        Ok(())
    }

    pub fn new() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:25}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        Self {
            bar: ProgressBar::new(0).with_style(style),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Progress {
    fn started(&mut self, first_step: u64, end_step: u64, steps_per_epoch: u64) {
        self.bar.set_length(end_step);
        self.bar.set_position(first_step);
        self.bar.reset_eta();
        self.bar
            .set_prefix(format!("pretrain ({steps_per_epoch} steps/epoch)"));
    }

    fn step(&mut self, log: &StepLog) {
        let r = &log.report;
        self.bar.set_message(format!(
            "epoch {} | contrastive {:.4} cohesion {:.4} | cos {:+.3}{} | {:.1} img/s",
            log.epoch,
            r.loss_contrastive,
            r.loss_cohesion,
            r.combination.cosine,
            if r.combination.fired {
                " (surgery)"
            } else {
                ""
            },
            log.images_per_s
        ));
        self.bar.inc(1);
    }

    fn epoch(&mut self, log: &EpochLog) {
        // println is dropped when the bar is hidden (stderr not a terminal); suspend is not.
        self.bar.suspend(|| eprintln!(
            "epoch {:>4}: contrastive {:.4}, cohesion {:.4}, mean cosine {:+.3}, surgery on {:.0}% of steps, {:.1} img/s",
            log.epoch,
            log.loss_contrastive,
            log.loss_cohesion,
            log.cosine,
            100.0 * log.fired,
            log.images_per_s
        ));
    }

    fn checkpoint(&mut self, step: u64, path: &Path) {
        self.bar
            .suspend(|| eprintln!("step {step}: checkpoint {}", path.display()));
    }

    fn warn(&mut self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The run --out starts or --resume continues, checked against `eng`'s memory.
fn open_run<E: Engine>(eng: &E, args: &PretrainArgs) -> Result<Run> {
    let run = match (&args.resume, &args.out) {
        (Some(dir), _) => {
            let mut changed = args.apply(None);
            changed.retain(|&name| name != "max_steps");
            if args.blocks.is_some() {
                changed.push("blocks");
            }
            ensure!(
                changed.is_empty(),
                "a resumed run keeps its settings (from {}); only --max-steps, --device, \
                 --matmul and --threads may be given, not --{}",
                dir.join(pretrain::CONFIG_FILE).display(),
                changed.join(", --").replace('_', "-")
            );
            let run = Run::resume(eng, dir, args.max_steps)?;
            eprintln!("resuming {} at step {}", dir.display(), run.step());
            run
        }
        (None, Some(out)) => Run::create(eng, out, args.config()?)?,
        (None, None) => unreachable!("clap requires --out or --resume"),
    };
    // A run killed between its last checkpoint and the final model still gets the model.
    ensure!(
        run.step() < run.end_step() || !run.dir.join(pretrain::MODEL_FILE).exists(),
        "the run in {} is already complete ({} steps); pass a larger --max-steps to go on",
        run.dir.display(),
        run.step()
    );
    Ok(run)
}
