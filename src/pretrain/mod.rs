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

pub mod config;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

pub use config::{Objective, PretrainConfig};

use crate::atomic::{AtomicDir, AtomicFile, write_atomic};
use crate::checkpoint::{self, TensorFile, TensorWriter};
use crate::data::input::batch::{Augmenter, Views};
use crate::data::input::sampler::{BalancedSampler, SampledBatch, SamplerPosition};
use crate::data::{BagLabel, PatchStore};
use crate::engine::Engine;
use crate::memory;
use crate::model::{ModelState, Network, StepBatch, StepReport, Trainer};
use crate::plots;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const EPOCHS_FILE: &str = "epochs.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const PLOTS_DIR: &str = "plots";
const STATE_FILE: &str = "state.safetensors";
const KEEP_CHECKPOINTS: usize = 2;
/// Embeddings whose spread `embedding_std * sqrt(dim)` falls below this have collapsed
/// (spread-out unit vectors give about 1).
const COLLAPSE_SPREAD: f32 = 0.05;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    /// Images through the network per second (two views of every patch), including the
    /// augmentation.
    pub images_per_s: f64,
    #[serde(flatten)]
    pub report: StepReport,
}

/// One line of `epochs.jsonl`: means over the epoch's steps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochLog {
    pub epoch: u64,
    pub steps: u64,
    pub loss_contrastive: f64,
    pub loss_cohesion: f64,
    pub cosine: f64,
    /// Share of steps where the gradients conflicted and surgery projected them.
    pub fired: f64,
    pub images_per_s: f64,
}

/// What a run reports while it trains (the command line shows it).
pub trait Observer {
    fn started(&mut self, _first_step: u64, _end_step: u64, _steps_per_epoch: u64) {}
    fn step(&mut self, _log: &StepLog) {}
    fn epoch(&mut self, _log: &EpochLog) {}
    fn checkpoint(&mut self, _step: u64, _path: &Path) {}
    fn warn(&mut self, _message: &str) {}
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
    step: u64,
    /// The estimated memory of one training step (activations and gradients).
    step_bytes: u64,
}

/// Where a step's four views come from: rendered from the sampled patches with the run's
/// augmentation, on the engine, in its channel-major layout. Every source must render the
/// same views for the same (seed, step, patches): the CPU augmentation is the reference.
pub trait ViewSource<E: Engine> {
    fn render(
        &mut self,
        eng: &E,
        augmenter: &Augmenter,
        store: &PatchStore,
        sampled: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<StepBatch<E>>;
}

/// Views rendered on the host by the CPU augmentation, then uploaded.
pub struct HostViews;

impl<E: Engine> ViewSource<E> for HostViews {
    fn render(
        &mut self,
        eng: &E,
        augmenter: &Augmenter,
        store: &PatchStore,
        sampled: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<StepBatch<E>> {
        augmenter.render(store, sampled, step, views)?.upload(eng)
    }
}

impl Run {
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
        let state = ModelState::init(config.net()?, config.seed)?;
        // Everything is checked before the folder is made: a refused run leaves nothing.
        let run = Self::assemble(eng, dir, config, state, None, 0, SamplerPosition::default())?;
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
            // Stopped before its first checkpoint: the seeded start is the same as before.
            let state = ModelState::init(config.net()?, config.seed)?;
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
        let run = Self::assemble(
            eng,
            dir,
            config,
            state,
            Some(momentum),
            run_state.step,
            run_state.sampler,
        )?;
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
            Objective::Simclr => split.positive + split.negative,
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
        let step_config = self.config.step();
        let schedule = self.config.schedule();
        let views = match self.config.objective {
            Objective::Slam => Views::Slam,
            Objective::Simclr => Views::ContrastiveOnly,
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
            let batch = source.render(
                eng,
                &self.augmenter,
                &self.store,
                &sampled,
                self.step,
                views,
            )?;
            let images = 2 * (batch.n_pos + batch.n_neg);
            let lr = schedule.lr(epoch as u32);
            let report = trainer.step(eng, &batch, &step_config, lr, None)?;
            check_finite(&report, self.step, &self.dir)?;
            let collapsed = report.embedding_std * (out_dim as f32).sqrt() < COLLAPSE_SPREAD;
            if collapsed && warned_epoch != Some(epoch) {
                // Once per epoch: a collapsed run stays collapsed for many steps.
                warned_epoch = Some(epoch);
                observer.warn(&format!(
                    "step {}: the embeddings are collapsing (per-dimension std {:.2e} across the batch; \
                     try a lower --lr)",
                    self.step, report.embedding_std
                ));
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
            if self.step % self.config.checkpoint_every == 0 || self.step == end || stop {
                metrics.flush()?;
                epochs.flush()?;
                let state = trainer.state(eng)?;
                let momentum = eng.download(eng.all(&trainer.momentum))?;
                let path = self.save_checkpoint(&state, &momentum)?;
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

    fn save_checkpoint(&self, state: &ModelState, momentum: &[f32]) -> Result<PathBuf> {
        let dir = self.dir.join(CHECKPOINTS_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("step-{:08}", self.step));
        let staging = AtomicDir::create(&path)?;
        checkpoint::save(&staging.path().join(MODEL_FILE), state)?;
        let mut w = TensorWriter::new();
        w.f32("momentum", &[momentum.len()], momentum);
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

impl EpochLog {
    fn add(&mut self, log: &StepLog) {
        let r = &log.report;
        self.steps += 1;
        self.loss_contrastive += r.loss_contrastive as f64;
        self.loss_cohesion += r.loss_cohesion as f64;
        self.cosine += r.combination.cosine;
        self.fired += r.combination.fired as u8 as f64;
        self.images_per_s += log.images_per_s;
    }

    /// The means of the epoch so far; resets for the next.
    fn finish(&mut self, epoch: u64) -> EpochLog {
        let n = self.steps.max(1) as f64;
        let done = std::mem::take(self);
        EpochLog {
            epoch,
            steps: done.steps,
            loss_contrastive: done.loss_contrastive / n,
            loss_cohesion: done.loss_cohesion / n,
            cosine: done.cosine / n,
            fired: done.fired / n,
            images_per_s: done.images_per_s / n,
        }
    }
}

/// Draws `plots/losses.png` (both losses per step) and `plots/conflict.png` (the cosine of
/// the two task gradients per step) from the run's `metrics.jsonl`.
pub fn write_plots(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join(METRICS_FILE))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |name, get: &dyn Fn(&serde_json::Value) -> Option<f64>| plots::Series {
        name,
        points: lines
            .iter()
            .filter_map(|l| Some((l["step"].as_f64()?, get(l)?)))
            .collect(),
    };
    let plots_dir = dir.join(PLOTS_DIR);
    std::fs::create_dir_all(&plots_dir)?;
    let contrastive = series("contrastive (NT-Xent, positives)", &|l| {
        l["loss_contrastive"].as_f64()
    });
    let cohesion = series("cohesion (negatives)", &|l| l["loss_cohesion"].as_f64());
    plots::line_chart(
        &plots_dir.join("losses.png"),
        "Task losses",
        "step",
        "loss",
        &[contrastive, cohesion],
    )?;
    let cosine = series("cos(g1, g2)", &|l| l["combination"]["cosine"].as_f64());
    plots::line_chart(
        &plots_dir.join("conflict.png"),
        "Gradient conflict: cosine of the two task gradients (surgery fires below 0)",
        "step",
        "cosine",
        &[cosine],
    )
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

/// Complete checkpoint folders of a run, with their steps.
fn checkpoint_dirs(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = dir.join(CHECKPOINTS_DIR);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(&root).with_context(|| format!("cannot read {}", root.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        // Staging folders start with a dot and never match.
        if let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse().ok())
        {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

/// Removes the hidden `.*.tmp` folders an interrupted checkpoint write or removal left.
fn remove_staging_leftovers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoint_dirs(dir)?
        .into_iter()
        .max()
        .map(|(_, path)| path))
}

fn open_log(path: &Path) -> Result<std::io::BufWriter<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(std::io::BufWriter::new(file))
}

/// Keeps the lines of a JSON-lines log for which `keep` holds (and that parse), atomically.
fn truncate_log(path: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut file = AtomicFile::create(path)?;
    for line in text.lines().filter(|l| keep(l)) {
        writeln!(file, "{line}")?;
    }
    file.commit()
}

fn line_field(line: &str, key: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get(key)?
        .as_u64()
}
