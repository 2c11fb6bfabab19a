//! A pretraining run: the sampler, the augmentation and the training step in a loop, with
//! per-step metrics, periodic checkpoints, exact resume, and a guard against divergence.
//!
//! A run folder holds:
//! - `config.toml`: the resolved settings (what `--resume` continues with);
//! - `metrics.jsonl`: one JSON object per step; `epochs.jsonl`: one per finished epoch;
//! - `checkpoints/step-NNNNNNNN/`: `model.safetensors` (the reference `state_dict`, loadable
//!   with `load_state_dict(strict=True)`) and `state.safetensors` (momentum, step, sampler
//!   position); each folder appears whole or not at all, the last two are kept;
//! - `model.safetensors`: the final model;
//! - `plots/losses.png`, `plots/conflict.png`: the losses and the gradient cosine per step.

mod checkpoints;
pub mod config;
mod logs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use checkpoints::{checkpoint_dirs, latest_checkpoint, remove_staging_leftovers};
pub use config::{Objective, PretrainConfig};
pub use logs::{EpochLog, StepLog, write_plots};
use logs::{line_field, open_log, truncate_log};

use crate::atomic::{AtomicDir, write_atomic};
use crate::checkpoint::{self, InitReport, TensorFile, TensorWriter};
use crate::data::input::batch::{Augmenter, Views};
use crate::data::input::sampler::{BalancedSampler, SamplerPosition};
use crate::data::{BagLabel, PatchStore};
use crate::engine::Engine;
use crate::feed::{Feed, FeedPlan, HostViews, StepInput, ViewSettings, ViewSource};
use crate::memory;
use crate::model::{ModelState, Network, StepReport, Trainer, WeakHead};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const EPOCHS_FILE: &str = "epochs.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const PLOTS_DIR: &str = "plots";
const STATE_FILE: &str = "state.safetensors";
const KEEP_CHECKPOINTS: usize = 2;
/// The weak baseline's classifier and its momentum in a checkpoint's state file.
const WEAK_HEAD: &str = "weak_head.weights";
const WEAK_HEAD_MOMENTUM: &str = "weak_head.momentum";
/// Embeddings whose spread `embedding_std * sqrt(dim)` falls below this have collapsed.
/// The spread is about `sqrt(1 - mean pairwise cosine)`: 1 for unit vectors spread out, 0 for
/// one point. Measured on the demo's data: a fresh network starts near 0.45, a learning SLAM
/// run stays above 0.25, and the collapsed one (contrastive loss stuck at `log(2n - 1)`)
/// falls below 0.1 within an epoch and ends near 0.06.
const COLLAPSE_SPREAD: f32 = 0.1;

/// What a run reports while it trains (the command line shows it).
pub trait Observer {
    fn started(&mut self, _first_step: u64, _end_step: u64, _steps_per_epoch: u64) {}
    fn step(&mut self, _log: &StepLog) {}
    fn epoch(&mut self, _log: &EpochLog) {}
    fn checkpoint(&mut self, _step: u64, _path: &Path) {}
    fn warn(&mut self, _message: &str) {}
    /// The embeddings are collapsing at `step` (at most once per epoch); by default a warning.
    fn collapsing(&mut self, _step: u64, message: &str) {
        self.warn(message);
    }
    /// Polled after every step: when true the run writes a checkpoint and returns early.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that reports nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// The run-level state saved beside the model in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
struct RunState {
    step: u64,
    sampler: SamplerPosition,
    store_fingerprint: String,
}

/// A run being set up or continued: the data, the sampler and the model state.
pub struct Run {
    pub dir: PathBuf,
    pub config: PretrainConfig,
    store: PatchStore,
    sampler: BalancedSampler,
    augmenter: Augmenter,
    state: ModelState,
    momentum: Option<Vec<f32>>,
    /// The weak baseline's classifier a resumed run continues with.
    weak_head: Option<WeakHead>,
    /// What a new run took from its `--init` weights.
    pub init_report: Option<InitReport>,
    step: u64,
    /// The estimated memory of one training step (activations and gradients).
    step_bytes: u64,
}

/// How a command starts training: a new run in a folder, or the run in a folder continued.
#[derive(Clone, Debug)]
pub enum Start {
    /// A new run in `dir` (see [`Run::create`]).
    New {
        dir: PathBuf,
        config: PretrainConfig,
    },
    /// The run in `dir` from its latest checkpoint; `max_steps` extends it (see
    /// [`Run::resume`]).
    Resume {
        dir: PathBuf,
        max_steps: Option<u64>,
    },
}

impl Run {
    /// Opens the run `start` names, refusing one that is already complete.
    pub fn start<E: Engine>(eng: &E, start: Start) -> Result<Self> {
        let run = match start {
            Start::New { dir, config } => Self::create(eng, &dir, config)?,
            Start::Resume { dir, max_steps } => Self::resume(eng, &dir, max_steps)?,
        };
        // A run killed between its last checkpoint and the final model still gets the model.
        ensure!(
            run.step() < run.end_step() || !run.dir.join(MODEL_FILE).exists(),
            "the run in {} is already complete ({} steps); pass a larger --max-steps to go on",
            run.dir.display(),
            run.step()
        );
        Ok(run)
    }

    /// Starts a new run in `dir` (created; must be empty or absent, apart from the staging
    /// files an interrupted start may have left).
    /// The step's memory is checked against what `eng` has (see [`crate::memory::available_for`]).
    pub fn create<E: Engine>(eng: &E, dir: &Path, config: PretrainConfig) -> Result<Self> {
        config.validate()?;
        if dir.exists() {
            let entries =
                std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            for entry in entries {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                ensure!(
                    name.starts_with('.') && name.ends_with(".tmp"),
                    "{} is not empty: continue the run there with --resume, or choose another folder",
                    dir.display()
                );
            }
        }
        let (state, init_report) = config.initial_state()?;
        // Everything is checked before the folder is made: a refused run leaves nothing.
        let mut run = Self::assemble(eng, dir, config, state, None, 0, SamplerPosition::default())?;
        run.init_report = init_report;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // The settings are the run's first file: once they exist, --resume can continue it.
        write_atomic(&dir.join(CONFIG_FILE), run.config.to_toml()?.as_bytes())?;
        Ok(run)
    }

    /// Continues the run in `dir` from its latest complete checkpoint. `max_steps`, when given,
    /// replaces the run's own limit (to extend it).
    pub fn resume<E: Engine>(eng: &E, dir: &Path, max_steps: Option<u64>) -> Result<Self> {
        let mut config = PretrainConfig::from_toml_file(&dir.join(CONFIG_FILE))
            .with_context(|| format!("{} is not a pretraining run folder", dir.display()))?;
        if max_steps.is_some() {
            config.max_steps = max_steps;
        }
        config.validate()?;
        remove_staging_leftovers(&dir.join(CHECKPOINTS_DIR))?;
        let Some(checkpoint) = latest_checkpoint(dir)? else {
            // Stopped before its first checkpoint: the start is the same as before.
            let (state, _) = config.initial_state()?;
            let run = Self::assemble(eng, dir, config, state, None, 0, SamplerPosition::default())?;
            truncate_log(&dir.join(METRICS_FILE), |_| false)?;
            truncate_log(&dir.join(EPOCHS_FILE), |_| false)?;
            return Ok(run);
        };
        let state = checkpoint::load(&checkpoint.join(MODEL_FILE))?;
        ensure!(
            state.config == config.net()?,
            "{}: the checkpoint holds a {} model, the run's config asks for {}",
            checkpoint.display(),
            state.config,
            config.net()?
        );
        let file = TensorFile::open(&checkpoint.join(STATE_FILE))?;
        let run_state: RunState = serde_json::from_value(
            file.info("run")
                .with_context(|| format!("{}: no run state", checkpoint.display()))?,
        )?;
        let momentum = file.f32_shaped("momentum", &[Network::new(state.config).param_len()])?;
        let weak_head = match config.objective {
            Objective::Weak => {
                let len = [state.config.feature_dim() + 1];
                Some(WeakHead {
                    weights: file.tensor_shaped(WEAK_HEAD, &len)?,
                    momentum: file.tensor_shaped(WEAK_HEAD_MOMENTUM, &len)?,
                    grad: vec![0.0; len[0]],
                })
            }
            _ => None,
        };
        let mut run = Self::assemble(
            eng,
            dir,
            config,
            state,
            Some(momentum),
            run_state.step,
            run_state.sampler,
        )?;
        run.weak_head = weak_head;
        ensure!(
            run.store.fingerprint() == run_state.store_fingerprint,
            "{} is not the store this run was trained on (its contents changed)",
            run.config.store.display()
        );
        truncate_log(&dir.join(METRICS_FILE), |line| {
            line_field(line, "step").is_some_and(|s| s < run.step)
        })?;
        let epoch = run.step / run.sampler.batches_per_epoch();
        truncate_log(&dir.join(EPOCHS_FILE), |line| {
            line_field(line, "epoch").is_some_and(|e| e < epoch)
        })?;
        Ok(run)
    }

    fn assemble<E: Engine>(
        eng: &E,
        dir: &Path,
        config: PretrainConfig,
        state: ModelState,
        momentum: Option<Vec<f32>>,
        step: u64,
        position: SamplerPosition,
    ) -> Result<Self> {
        let store = PatchStore::open(&config.store)?;
        let augment = config.augment();
        augment.validate(store.patch_size())?;
        // SimCLR samples the same way and then gives every patch of the batch two contrastive
        // views: the slide labels never reach its loss.
        let (positive, negative) = (store.pool(BagLabel::Abnormal), store.pool(BagLabel::Normal));
        let mut sampler = BalancedSampler::new(
            positive,
            negative,
            config.batch,
            config.sampler,
            config.seed,
        )?;
        sampler.seek(position)?;
        let split = sampler.split();
        let largest_task = match config.objective {
            Objective::Slam => split.positive.max(split.negative),
            Objective::Simclr | Objective::Weak => split.positive + split.negative,
        };
        let step_bytes = Network::new(state.config).step_memory_bytes(largest_task, config.crop);
        let (available, kind) = memory::available_for(eng.memory()?)?;
        memory::ensure_fits(
            step_bytes,
            available,
            kind,
            &format!(
                "a training step of {} patches ({} + {}) at crop {} with a {} network",
                config.batch, split.positive, split.negative, config.crop, state.config
            ),
            "lower --batch or --crop",
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            augmenter: Augmenter::new(augment, config.seed),
            config,
            store,
            sampler,
            state,
            momentum,
            weak_head: None,
            init_report: None,
            step,
            step_bytes,
        })
    }

    /// The patch store the run trains on.
    pub fn store(&self) -> &PatchStore {
        &self.store
    }

    /// The estimated memory of one training step (activations and gradients), in bytes.
    pub fn step_bytes(&self) -> u64 {
        self.step_bytes
    }

    /// The step the run continues from.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step the run stops at: the end of the last epoch, or `max_steps`.
    pub fn end_step(&self) -> u64 {
        let total = self.config.epochs as u64 * self.sampler.batches_per_epoch();
        self.config.max_steps.map_or(total, |m| m.min(total))
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.sampler.batches_per_epoch()
    }

    /// Trains on `eng` until the end step, writing metrics and checkpoints, and then the
    /// final model. When the observer asks to stop, it writes a checkpoint and returns early
    /// (then `step() < end_step()`). On a non-finite loss or gradient it stops with an error
    /// and keeps the last good checkpoint.
    pub fn train<E: Engine>(&mut self, eng: &E, observer: &mut dyn Observer) -> Result<ModelState> {
        self.train_with(eng, observer, &mut HostViews)
    }

    /// [`Run::train`] with the views where `views` asks, on engines that can render them
    /// themselves (see [`Feed`]).
    pub fn train_fed<E: Feed>(
        &mut self,
        eng: &E,
        views: &ViewSettings,
        observer: &mut dyn Observer,
    ) -> Result<ModelState> {
        let plan = FeedPlan {
            store: &self.store,
            batch: self.config.batch,
            step_bytes: self.step_bytes,
        };
        let mut source = eng.view_source(views, plan)?;
        self.train_with(eng, observer, &mut *source)
    }

    /// [`Run::train`] with the step's views from `source` (e.g. rendered on the GPU).
    pub fn train_with<E: Engine>(
        &mut self,
        eng: &E,
        observer: &mut dyn Observer,
        source: &mut dyn ViewSource<E>,
    ) -> Result<ModelState> {
        let mut trainer = Trainer::new(eng, &self.state)?;
        if let Some(momentum) = &self.momentum {
            trainer.momentum = eng.upload(momentum)?;
        }
        let step_config = self.config.step;
        let schedule = self.config.schedule();
        let views = match self.config.objective {
            Objective::Slam => Views::Slam,
            // The weak baseline renders what SimCLR does: two views of every patch.
            Objective::Simclr | Objective::Weak => Views::ContrastiveOnly,
        };
        let mut weak_head = match self.config.objective {
            Objective::Weak => Some(match self.weak_head.take() {
                Some(head) => head,
                None => WeakHead::init(self.state.config.feature_dim(), self.config.seed)?,
            }),
            _ => None,
        };
        let end = self.end_step();
        let per_epoch = self.sampler.batches_per_epoch();
        let out_dim = self.config.net()?.out_dim;
        let mut metrics = open_log(&self.dir.join(METRICS_FILE))?;
        let mut epochs = open_log(&self.dir.join(EPOCHS_FILE))?;
        let mut epoch_log = EpochLog::default();
        let mut warned_epoch = None;
        observer.started(self.step, end, per_epoch);
        while self.step < end {
            let start = Instant::now();
            let sampled = self.sampler.next_batch();
            let epoch = sampled.position.epoch;
            let input = StepInput {
                augmenter: &self.augmenter,
                store: &self.store,
                sampled: &sampled,
                step: self.step,
                views,
            };
            let batch = source.render(eng, &input)?;
            let images = 2 * (batch.n_pos + batch.n_neg);
            let lr = schedule.lr(epoch as u32);
            let report = match &mut weak_head {
                Some(head) => {
                    let abnormal = sampled.positive.len();
                    trainer.weak_step(eng, &batch, abnormal, head, &step_config, lr)?
                }
                None => trainer.step(eng, &batch, &step_config, lr, None)?,
            };
            check_finite(&report, self.step, &self.dir)?;
            // The weak baseline does not train the projector whose output this watches.
            let collapsed = weak_head.is_none()
                && report.embedding_std * (out_dim as f32).sqrt() < COLLAPSE_SPREAD;
            if collapsed && warned_epoch != Some(epoch) {
                // Once per epoch: a collapsed run stays collapsed for many steps.
                warned_epoch = Some(epoch);
                let remedy = match self.config.objective {
                    Objective::Slam => {
                        "the cohesion task pulls every embedding to one point faster than the \
                         contrastive task spreads them; the measured remedy is a smaller weight on \
                         it, e.g. --cohesion-weight 0.1 (docs/RESULTS.md)"
                    }
                    Objective::Simclr | Objective::Weak => "try a lower --lr",
                };
                let message = format!(
                    "step {}: the embeddings are collapsing (per-dimension std {:.2e} across the \
                     batch): {remedy}",
                    self.step, report.embedding_std
                );
                observer.collapsing(self.step, &message);
            }
            let log = StepLog {
                step: self.step,
                epoch,
                images_per_s: images as f64 / start.elapsed().as_secs_f64(),
                report,
            };
            writeln!(metrics, "{}", serde_json::to_string(&log)?)?;
            epoch_log.add(&log);
            observer.step(&log);
            self.step += 1;
            if self.sampler.position().batch == 0 {
                let summary = epoch_log.finish(epoch);
                writeln!(epochs, "{}", serde_json::to_string(&summary)?)?;
                observer.epoch(&summary);
            }
            let stop = observer.stop_requested();
            if self.step.is_multiple_of(self.config.checkpoint_every) || self.step == end || stop {
                metrics.flush()?;
                epochs.flush()?;
                let state = trainer.state(eng)?;
                let momentum = eng.download(eng.all(&trainer.momentum))?;
                let path = self.save_checkpoint(&state, &momentum, weak_head.as_ref())?;
                observer.checkpoint(self.step, &path);
            }
            if stop && self.step < end {
                return trainer.state(eng);
            }
        }
        let state = trainer.state(eng)?;
        checkpoint::save(&self.dir.join(MODEL_FILE), &state)?;
        if let Err(e) = write_plots(&self.dir) {
            observer.warn(&format!(
                "the run finished but its plots were not drawn: {e:#}"
            ));
        }
        Ok(state)
    }

    fn save_checkpoint(
        &self,
        state: &ModelState,
        momentum: &[f32],
        weak_head: Option<&WeakHead>,
    ) -> Result<PathBuf> {
        let dir = self.dir.join(CHECKPOINTS_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("step-{:08}", self.step));
        let staging = AtomicDir::create(&path)?;
        checkpoint::save(&staging.path().join(MODEL_FILE), state)?;
        let mut w = TensorWriter::new();
        w.f32("momentum", &[momentum.len()], momentum);
        if let Some(head) = weak_head {
            w.tensor(WEAK_HEAD, &[head.weights.len()], &head.weights);
            w.tensor(WEAK_HEAD_MOMENTUM, &[head.momentum.len()], &head.momentum);
        }
        w.info(
            "run",
            RunState {
                step: self.step,
                sampler: self.sampler.position(),
                store_fingerprint: self.store.fingerprint(),
            },
        )?;
        w.write(&staging.path().join(STATE_FILE))?;
        staging.commit()?;
        let mut all = checkpoint_dirs(&self.dir)?;
        all.sort();
        for (step, old) in all.iter().rev().skip(KEEP_CHECKPOINTS) {
            // Renamed out of sight first: a deletion cut short must not leave a checkpoint
            // folder missing files under a name that says it is complete.
            let doomed = dir.join(format!(".step-{step:08}.old.tmp"));
            std::fs::rename(old, &doomed)
                .and_then(|()| std::fs::remove_dir_all(&doomed))
                .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        }
        Ok(path)
    }
}

fn check_finite(report: &StepReport, step: u64, dir: &Path) -> Result<()> {
    let c = &report.combination;
    let values = [
        ("contrastive loss", report.loss_contrastive as f64),
        ("cohesion loss", report.loss_cohesion as f64),
        ("contrastive gradient norm", c.norm_g1),
        ("cohesion gradient norm", c.norm_g2),
    ];
    for (name, value) in values {
        if !value.is_finite() {
            let last = latest_checkpoint(dir)?.map_or_else(
                || "no checkpoint was written yet".to_owned(),
                |p| format!("the last good checkpoint is {}", p.display()),
            );
            bail!(
                "training diverged at step {step}: the {name} is {value}; {last} \
                 (try a lower --lr or a longer warm-up)"
            );
        }
    }
    Ok(())
}
