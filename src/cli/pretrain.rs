//! `slam pretrain`: a pretraining run from a patch store, with metrics, checkpoints and resume.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::{ArgMatches, Args};

use super::args::{EngineArgs, with_engine};
use super::progress::Progress;
use crate::engine::cuda::MatmulMode;
use crate::feed::ViewSettings;
use crate::pretrain::{self, PretrainConfig, Run, Start};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam pretrain data/train.patches --out runs/slam
  slam pretrain data/train.patches --out runs/small --arch resnet10 --width 16 --crop 48 --batch 32 --epochs 5
  slam pretrain --config run.toml --out runs/from-config --seed 3
  slam pretrain --resume runs/slam                         continue after a stop or crash
  slam pretrain --resume runs/slam --max-steps 20000       ... and go further
  slam pretrain data/train.patches --out runs/gpu --device cuda          on an NVIDIA GPU
  slam pretrain data/train.patches --out runs/gpu --device cuda --matmul bf16 --residency streamed
  slam pretrain data/train.patches --out runs/w --cohesion-weight 0.1     task weights l1, l2
  slam pretrain data/train.patches --out runs/weak --objective weak      the weak baseline
  slam pretrain data/train.patches --out runs/in --init resnet18-imagenet.safetensors
                                     start from torchvision ResNet-18 weights (safetensors)

Defaults are the reference's: ResNet-18, out_dim 512, batch 256, 150 epochs (10 warm-up),
lr 1e-3, momentum 0.9, weight decay 1e-4, temperature 0.07, crop 224, task weights 1 and 1. A TOML config takes
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
    pub views: ViewSettings,
    #[command(flatten)]
    pub settings: PretrainConfig,
}

impl PretrainArgs {
    /// The settings given on the command line (the store among them).
    fn given(matches: &ArgMatches) -> Vec<String> {
        PretrainConfig::keys()
            .into_iter()
            .filter(|key| matches.value_source(key) == Some(clap::parser::ValueSource::CommandLine))
            .collect()
    }

    /// Defaults, then the config file, then the flags.
    fn config(&self, given: &[String]) -> Result<PretrainConfig> {
        let base = match &self.config {
            Some(path) => PretrainConfig::from_toml_file(path)?,
            None => PretrainConfig::default(),
        };
        let flags = PretrainConfig {
            store: self.store.clone().unwrap_or_default(),
            ..self.settings.clone()
        };
        let given: Vec<&str> = given.iter().map(String::as_str).collect();
        let config = base.overridden_by(&flags, &given)?;
        config.validate()?;
        Ok(config)
    }

    /// The run to start: a new one (--out), or the one in --resume, which keeps its settings.
    fn start(&self, matches: &ArgMatches) -> Result<Start> {
        let mut given = Self::given(matches);
        Ok(match (&self.resume, &self.out) {
            (Some(dir), _) => {
                given.retain(|name| name != "max_steps");
                ensure!(
                    given.is_empty(),
                    "a resumed run keeps its settings (from {}); only --max-steps, --device, \
                     --matmul and --threads may be given, not --{}",
                    dir.join(pretrain::CONFIG_FILE).display(),
                    given.join(", --").replace('_', "-")
                );
                Start::Resume {
                    dir: dir.clone(),
                    max_steps: self.settings.max_steps,
                }
            }
            (None, Some(out)) => Start::New {
                dir: out.clone(),
                config: self.config(&given)?,
            },
            (None, None) => unreachable!("clap requires --out or --resume"),
        })
    }
}

pub fn run(args: &PretrainArgs, matches: &ArgMatches) -> Result<()> {
    // First, so that a signal during the set-up also ends in a clean stop.
    let mut progress = Progress::new();
    progress.stop_on_signals()?;
    args.engine.check_views(&args.views)?;
    let start = args.start(matches)?;
    let resuming = matches!(start, Start::Resume { .. });
    let (run, state) = with_engine!(args.engine, MatmulMode::Tf32, |eng| {
        let mut run = Run::start(eng, start)?;
        if resuming {
            eprintln!("resuming {} at step {}", run.dir.display(), run.step());
        }
        if let (Some(init), Some(path)) = (&run.init_report, &run.config.init) {
            eprintln!(
                "starting from {} ({:?} names): {} tensors loaded{}{}",
                path.display(),
                init.naming,
                init.loaded,
                if init.kept.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} kept at their random start (the projector)",
                        init.kept.len()
                    )
                },
                if init.ignored.is_empty() {
                    String::new()
                } else {
                    format!(", ignored: {}", init.ignored.join(" "))
                }
            );
        }
        let state = run.train_fed(eng, &args.views, &mut progress)?;
        (run, state)
    });
    progress.bar.finish_and_clear();
    ensure!(
        run.step() == run.end_step(),
        "stopped on request at step {} of {}, after writing a checkpoint; continue with \
         `slam pretrain --resume {}`",
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
