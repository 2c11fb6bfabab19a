//! Powered comparisons of encoders (`slam experiment`, and `slam demo`, which is one small
//! experiment): every variant at every witness rate and seed, on synthetic data made for the
//! pair (rate, seed), so that the variants of a seed share their data and initialization
//! and can be compared pair by pair. Each run is evaluated at the cell level on held-out
//! cells (`crate::eval`, on h and on z) and at the bag level (MIL heads on z: gated
//! attention, and with `--mil-heads` the reference's PAMIL beside it), and the runs are
//! summarized as mean, spread and paired differences against the baselines
//! (`report`).
//!
//! The runs' results are appended to `runs.jsonl` as they finish: an interrupted experiment
//! started again with the same settings skips what is done.

mod report;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, FromArgMatches};
use serde::{Deserialize, Serialize};

pub use report::{Comparison, Stat, Summary, render_markdown, summarize, write_charts};

use crate::atomic::write_atomic;
use crate::checkpoint;
use crate::data::PatchStore;
use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SynthConfig, SynthDataset, write_dataset};
use crate::embed::{self, EmbedSettings, Embeddings, FeatureKind};
use crate::eval::{self, InstanceEvalConfig, InstanceReport};
use crate::feed::{Feed, ViewSettings};
use crate::mil::{Aggregator, Evaluation, HeadSpec, MilBag, MilTrainConfig, report as mil_report};
use crate::model::{ModelState, Surgery};
use crate::pretrain::{Objective, Observer, PretrainConfig, Run, StepLog};

pub const RUNS_FILE: &str = "runs.jsonl";
pub const SETTINGS_FILE: &str = "experiment.json";
pub const RESULTS_MD: &str = "results.md";
pub const RESULTS_JSON: &str = "results.json";

/// How a variant's encoder comes about.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Training {
    /// The seeded random initialization, with batch-norm statistics recomputed on the
    /// training patches (else its eval-mode features are degenerate).
    RandomInit,
    /// Pretraining with this objective and surgery; the cohesion weight when the variant
    /// names one, else the configuration's.
    Pretrain {
        objective: Objective,
        surgery: Surgery,
        cohesion_weight: Option<f32>,
    },
}

/// A variant of the comparison, written as its name: `random-init`, `simclr`, `weak`, or
/// `slam-ags`, `slam-pcgrad`, `slam-none` with an optional cohesion weight, `slam-ags@0.1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant(pub Training);

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Training::RandomInit => f.write_str("random-init"),
            Training::Pretrain {
                objective,
                surgery,
                cohesion_weight,
            } => {
                match objective {
                    Objective::Simclr => f.write_str("simclr")?,
                    Objective::Weak => f.write_str("weak")?,
                    Objective::Slam => write!(f, "slam-{surgery}")?,
                }
                match cohesion_weight {
                    Some(w) => write!(f, "@{w}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl FromStr for Variant {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (base, weight) = match s.split_once('@') {
            Some((base, w)) => {
                let w: f32 = w
                    .parse()
                    .ok()
                    .filter(|w: &f32| w.is_finite() && *w >= 0.0)
                    .with_context(|| {
                        format!("variant {s}: the cohesion weight after @ must be a number >= 0")
                    })?;
                (base, Some(w))
            }
            None => (s, None),
        };
        let pretrain = |objective, surgery| Training::Pretrain {
            objective,
            surgery,
            cohesion_weight: weight,
        };
        let training = match base {
            "random-init" => Training::RandomInit,
            "simclr" => pretrain(Objective::Simclr, Surgery::None),
            "weak" => pretrain(Objective::Weak, Surgery::None),
            "slam-ags" => pretrain(Objective::Slam, Surgery::Ags),
            "slam-pcgrad" => pretrain(Objective::Slam, Surgery::Pcgrad),
            "slam-none" => pretrain(Objective::Slam, Surgery::None),
            other => bail!(
                "unknown variant {other}: one of random-init, simclr, weak, slam-ags, \
                 slam-pcgrad, slam-none (the slam ones may name a cohesion weight: slam-ags@0.1)"
            ),
        };
        ensure!(
            weight.is_none() || base.starts_with("slam-"),
            "variant {s}: only the slam variants have a cohesion task to weigh"
        );
        Ok(Self(training))
    }
}

/// The comparison `slam experiment` runs by default and `slam demo --compare` shows.
pub const COMPARISON: &str = "random-init,simclr,weak,slam-none,slam-ags";

/// An experiment's settings: the grid (variants, seeds, witness rates), the data of each
/// cell of the grid, the pretraining every variant shares and the evaluations. The defaults
/// fit a 2-core CPU: one run in about a minute.
#[derive(Args, Clone, Debug)]
#[command(
    mut_arg("arch", |a| a.default_value("resnet10")),
    mut_arg("width", |a| a.default_value("16")),
    mut_arg("out_dim", |a| a.default_value("64")),
    mut_arg("batch", |a| a.default_value("64")),
    mut_arg("epochs", |a| a.default_value("10")),
    mut_arg("warmup_epochs", |a| a.default_value("1")),
    mut_arg("lr", |a| a.default_value("0.0005")),
    mut_arg("crop", |a| a.default_value("48")),
    mut_arg("checkpoint_every", |a| a.default_value("18446744073709551615").hide(true)),
    mut_arg("max_steps", |a| a.hide(true)),
    mut_arg("objective", |a| a.hide(true)),
    mut_arg("surgery", |a| a.hide(true)),
    mut_arg("bags", |a| a.default_value("96")),
    mut_arg("bag_size", |a| a.default_value("50"))
)]
pub struct ExperimentConfig {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// The variants, comma-separated: random-init, simclr, weak, slam-ags, slam-pcgrad,
    /// slam-none; a slam variant may name its cohesion weight (slam-ags@0.1).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<Variant>,
    /// Seeds per variant: --seed, --seed + 1, ... (each seed its own data and start).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Witness rates, comma-separated (default: --witness-rate).
    #[arg(long, value_delimiter = ',', conflicts_with = "witness_rate")]
    pub witness_rates: Vec<f64>,
    /// Side of the synthetic patches.
    #[arg(long, default_value_t = 64)]
    pub patch_size: usize,
    /// Held-out cells of each class for the cell-level evaluation.
    #[arg(long, default_value_t = 2000)]
    pub eval_cells: usize,
    #[command(flatten)]
    pub plan: BagPlanConfig,
    /// The pretraining every variant shares (each variant sets the objective, surgery and,
    /// when it names one, the cohesion weight); --seed is the first seed.
    #[command(flatten)]
    pub pretrain: PretrainConfig,
    /// The MIL heads trained on z, comma-separated: abmil (gated attention; metrics bag.*,
    /// reports in mil/) and pamil (the reference's head at its defaults; metrics pamil.*,
    /// reports in mil-pamil/).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "abmil")]
    pub mil_heads: Vec<Aggregator>,
    /// ABMIL's training epochs.
    #[arg(long, default_value_t = 40)]
    pub mil_epochs: usize,
    /// PAMIL's training epochs (the reference trains 100), the epoch of best training
    /// accuracy kept.
    #[arg(long, default_value_t = 100)]
    pub pamil_epochs: usize,
    #[command(flatten)]
    pub eval: InstanceEvalConfig,
    /// Keep every run's embeddings (train, test and evaluation cells, h and z).
    #[arg(long)]
    pub keep_embeddings: bool,
    /// Start over in a folder that holds another experiment's results.
    #[arg(long)]
    pub force: bool,
}

impl ExperimentConfig {
    /// The settings with no flags but `--out` and `--variants`.
    pub fn with_defaults(out: &Path, variants: &str) -> Self {
        let command = Self::augment_args(clap::Command::new("experiment"));
        let matches = command.get_matches_from([
            "experiment",
            "--out",
            &out.to_string_lossy(),
            "--variants",
            variants,
        ]);
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }

    pub fn rates(&self) -> Vec<f64> {
        if self.witness_rates.is_empty() {
            vec![self.plan.witness_rate]
        } else {
            self.witness_rates.clone()
        }
    }

    pub fn seed_list(&self) -> Vec<u64> {
        (0..self.seeds).map(|i| self.pretrain.seed + i).collect()
    }

    /// Checks every setting before anything runs.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.variants.is_empty(), "no variants to run (--variants)");
        ensure!(self.seeds >= 1, "--seeds must be at least 1");
        ensure!(
            !self.mil_heads.is_empty(),
            "no MIL heads to train (--mil-heads)"
        );
        let heads = &self.mil_heads;
        if let Some(twice) = (1..heads.len()).find(|&i| heads[..i].contains(&heads[i])) {
            bail!("--mil-heads names {} twice", heads[twice].name());
        }
        ensure!(self.mil_epochs >= 1, "--mil-epochs must be at least 1");
        ensure!(self.pamil_epochs >= 1, "--pamil-epochs must be at least 1");
        ensure!(
            self.eval_cells >= 1,
            "--eval-cells must be at least 1: the cell-level evaluation needs held-out cells"
        );
        let mut names: Vec<String> = self.variants.iter().map(Variant::to_string).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("variant {} is listed twice", w[0]);
        }
        for rate in self.rates() {
            self.plan_for(rate, self.pretrain.seed).validate()?;
        }
        SynthConfig {
            patch_size: self.patch_size,
            seed: 0,
            eval_cells: self.eval_cells,
        }
        .validate()?;
        self.pretrain_for(self.variants[0], Path::new("store"), 0)
            .validate()
    }

    fn plan_for(&self, witness_rate: f64, seed: u64) -> BagPlanConfig {
        BagPlanConfig {
            witness_rate,
            seed,
            ..self.plan.clone()
        }
    }

    /// The pretraining of `variant` at `seed` on `store`.
    fn pretrain_for(&self, variant: Variant, store: &Path, seed: u64) -> PretrainConfig {
        let mut config = PretrainConfig {
            store: store.to_path_buf(),
            seed,
            ..self.pretrain.clone()
        };
        if let Training::Pretrain {
            objective,
            surgery,
            cohesion_weight,
        } = variant.0
        {
            config.objective = objective;
            config.step.surgery = surgery;
            if let Some(w) = cohesion_weight {
                config.step.cohesion_weight = w;
            }
        }
        config
    }

    /// What must match for an interrupted experiment's results to be reused.
    fn fingerprint(&self) -> serde_json::Value {
        let mut fingerprint = serde_json::json!({
            "patch_size": self.patch_size,
            "eval_cells": self.eval_cells,
            "plan": self.plan_for(0.0, 0),
            "pretrain": PretrainConfig { seed: 0, ..self.pretrain.clone() },
            "mil_epochs": self.mil_epochs,
            "eval": self.eval,
        });
        // The heads are recorded only when not ABMIL alone, so that experiments begun
        // before PAMIL was added still resume.
        if self.mil_heads != [Aggregator::Abmil] {
            fingerprint["mil_heads"] = serde_json::json!(self.mil_heads);
        }
        if self.mil_heads.contains(&Aggregator::Pamil) {
            fingerprint["pamil_epochs"] = serde_json::json!(self.pamil_epochs);
        }
        fingerprint
    }

    /// How the experiment trains `head` on `dim` features: the head and its epochs.
    fn bag_head(&self, head: Aggregator, dim: usize) -> (HeadSpec, usize) {
        match head {
            Aggregator::Abmil => (
                HeadSpec::Abmil {
                    hidden: 64,
                    attention: 32,
                },
                self.mil_epochs,
            ),
            Aggregator::Pamil => (HeadSpec::pamil_defaults(dim), self.pamil_epochs),
        }
    }
}

/// Where a MIL head's reports go in a run's folder, and the prefix of its metrics (`bag.f1`,
/// `pamil.f1`, ...). ABMIL's keep the names they had before PAMIL was added, so that the
/// `runs.jsonl` of an experiment begun then means the same.
pub fn bag_head_names(head: Aggregator) -> (&'static str, &'static str) {
    match head {
        Aggregator::Abmil => ("mil", "bag"),
        Aggregator::Pamil => ("mil-pamil", "pamil"),
    }
}

/// One run of the grid: a variant at a witness rate and seed, and what it measured. Metrics
/// are named `h.<m>` and `z.<m>` (the cell-level evaluation of the encoder's and the
/// projector's features), `bag.<m>` (ABMIL on z) and `pamil.<m>` (PAMIL on z); one that
/// could not be measured, or whose head did not run, is absent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub witness_rate: f64,
    pub seed: u64,
    pub variant: String,
    pub pretrain_seconds: f64,
    /// Steps at which the run warned that its embeddings were collapsing.
    pub collapse_warnings: usize,
    pub metrics: BTreeMap<String, f64>,
}

impl RunResult {
    fn key(&self) -> (String, u64, String) {
        (
            self.witness_rate.to_string(),
            self.seed,
            self.variant.clone(),
        )
    }
}

/// What the experiment tells its caller while it runs.
pub trait ExperimentObserver {
    /// The grid has this many runs, `done` of them finished before (resumed).
    fn started(&mut self, _runs: usize, _done: usize) {}
    /// A line for the user.
    fn stage(&mut self, _message: &str) {}
    /// The observer of one run's pretraining.
    fn pretraining(&mut self, _label: &str) -> Box<dyn Observer> {
        Box::new(crate::pretrain::Quiet)
    }
    /// A run finished (its files are in `dir`).
    fn finished(&mut self, _result: &RunResult, _dir: &Path, _instance: &[InstanceReport]) {}
}

/// What an experiment produced.
pub struct ExperimentResults {
    pub runs: Vec<RunResult>,
    pub summary: Summary,
    /// `results.md`.
    pub markdown: String,
    /// The dataset of the last (rate, seed) run, for its contact sheet.
    pub last_data: Option<SynthDataset>,
    pub seconds: f64,
}

/// Runs `config`'s grid on `eng` (views rendered as `views` says).
pub fn run<E: Feed>(
    config: &ExperimentConfig,
    eng: &E,
    views: &ViewSettings,
    observer: &mut dyn ExperimentObserver,
) -> Result<ExperimentResults> {
    config.validate()?;
    let started = Instant::now();
    let out = &config.out;
    let mut done = open_results(config)?;
    let rates = config.rates();
    let seeds = config.seed_list();
    let total = rates.len() * seeds.len() * config.variants.len();
    let finished_before = done.len();
    observer.started(total, finished_before);
    let mut runs_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(RUNS_FILE))
        .with_context(|| format!("cannot open {}", out.join(RUNS_FILE).display()))?;
    let mut last_data = None;
    for &rate in &rates {
        for &seed in &seeds {
            let pending: Vec<Variant> = config
                .variants
                .iter()
                .copied()
                .filter(|v| !done.contains_key(&(rate.to_string(), seed, v.to_string())))
                .collect();
            if pending.is_empty() {
                continue;
            }
            let plan = config.plan_for(rate, seed);
            observer.stage(&format!(
                "witness rate {rate}, seed {seed}: synthesizing {} bags of {} cells ({} abnormal \
                 per abnormal bag) and {} held-out cells of each class ...",
                plan.bags,
                plan.bag_size,
                plan.witnesses_per_bag(),
                config.eval_cells
            ));
            let synth = SynthConfig {
                patch_size: config.patch_size,
                seed,
                eval_cells: config.eval_cells,
            };
            let data = write_dataset(&synth, &plan, &out.join("data"), false, &mut |_| {})?;
            for variant in pending {
                let dir = out
                    .join("runs")
                    .join(format!("w{rate}"))
                    .join(format!("seed{seed}"))
                    .join(variant.to_string());
                let (result, instance) = run_one(
                    config,
                    eng,
                    views,
                    variant,
                    (rate, seed),
                    &data,
                    &dir,
                    observer,
                )?;
                writeln!(runs_log, "{}", serde_json::to_string(&result)?)?;
                runs_log.flush()?;
                observer.finished(&result, &dir, &instance);
                done.insert(result.key(), result);
            }
            last_data = Some(data);
        }
    }
    let runs: Vec<RunResult> = done.into_values().collect();
    let summary = summarize(&runs, &config.variants, &rates);
    let markdown = render_markdown(config, &summary);
    write_atomic(&out.join(RESULTS_MD), markdown.as_bytes())?;
    write_atomic(
        &out.join(RESULTS_JSON),
        serde_json::to_string_pretty(&serde_json::json!({
            "settings": config.fingerprint(),
            "summary": summary,
            "runs": runs,
        }))?
        .as_bytes(),
    )?;
    write_charts(out, &summary)?;
    Ok(ExperimentResults {
        runs,
        summary,
        markdown,
        last_data,
        seconds: started.elapsed().as_secs_f64(),
    })
}

type Done = BTreeMap<(String, u64, String), RunResult>;

/// The finished runs of an earlier start of the same experiment in `config.out` (none for a
/// new folder); refuses a folder that holds another experiment unless `force`.
fn open_results(config: &ExperimentConfig) -> Result<Done> {
    let out = &config.out;
    let settings = out.join(SETTINGS_FILE);
    let fingerprint = config.fingerprint();
    if settings.exists() {
        let text = std::fs::read_to_string(&settings)
            .with_context(|| format!("cannot read {}", settings.display()))?;
        let same =
            serde_json::from_str::<serde_json::Value>(&text).ok() == Some(fingerprint.clone());
        if !same || config.force {
            ensure!(
                config.force,
                "{} holds an experiment with other settings; pass --force to start over there, \
                 or choose another --out",
                out.display()
            );
            for name in [RUNS_FILE, RESULTS_MD, RESULTS_JSON, "runs"] {
                let path = out.join(name);
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else if path.exists() {
                    std::fs::remove_file(&path)
                } else {
                    Ok(())
                }
                .with_context(|| format!("cannot clear {}", path.display()))?;
            }
        }
    } else if out.join(RESULTS_MD).exists() && !config.force {
        bail!(
            "{} holds results of an earlier version; pass --force to start over there",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(
        &settings,
        serde_json::to_string_pretty(&fingerprint)?.as_bytes(),
    )?;
    let mut done = Done::new();
    let path = out.join(RUNS_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // A line cut short by a crash is the run that did not finish: it runs again, and the
        // file keeps the complete lines in their order.
        let mut kept = String::new();
        for line in text.lines() {
            if let Ok(result) = serde_json::from_str::<RunResult>(line)
                && done.insert(result.key(), result).is_none()
            {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept != text {
            write_atomic(&path, kept.as_bytes())?;
        }
    }
    Ok(done)
}

/// Counts the collapse warnings of a run while passing everything else on but the
/// checkpoints (one per run, in the run's folder: not news).
struct Watch {
    inner: Box<dyn Observer>,
    collapse_warnings: usize,
}

impl Observer for Watch {
    fn started(&mut self, first: u64, end: u64, per_epoch: u64) {
        self.inner.started(first, end, per_epoch);
    }
    fn step(&mut self, log: &StepLog) {
        self.inner.step(log);
    }
    fn epoch(&mut self, log: &crate::pretrain::EpochLog) {
        self.inner.epoch(log);
    }
    fn warn(&mut self, message: &str) {
        self.inner.warn(message);
    }
    fn collapsing(&mut self, step: u64, message: &str) {
        self.collapse_warnings += 1;
        self.inner.collapsing(step, message);
    }
    fn stop_requested(&self) -> bool {
        self.inner.stop_requested()
    }
}

/// One run: the encoder, its embeddings, the cell-level and bag-level evaluations.
#[allow(clippy::too_many_arguments)]
fn run_one<E: Feed>(
    config: &ExperimentConfig,
    eng: &E,
    views: &ViewSettings,
    variant: Variant,
    (rate, seed): (f64, u64),
    data: &SynthDataset,
    dir: &Path,
    observer: &mut dyn ExperimentObserver,
) -> Result<(RunResult, Vec<InstanceReport>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let label = format!("{variant} (witness rate {rate}, seed {seed})");
    observer.stage(&format!("== {label}"));
    let pretrain = config.pretrain_for(variant, &data.paths.train, seed);
    let settings = EmbedSettings {
        kind: FeatureKind::Encoder,
        crop: pretrain.crop,
        batch: 128,
    };
    let train_store = PatchStore::open(&data.paths.train)?;
    let start = Instant::now();
    let mut collapse_warnings = 0;
    let state = match variant.0 {
        Training::RandomInit => {
            let state = ModelState::init(pretrain.net()?, seed)?;
            embed::recalibrate_batch_norm(eng, &state, &train_store, settings)?
        }
        Training::Pretrain { .. } => {
            let mut watch = Watch {
                inner: observer.pretraining(&label),
                collapse_warnings: 0,
            };
            let mut run = Run::create(eng, &dir.join("run"), pretrain.clone())?;
            let state = run.train_fed(eng, views, &mut watch)?;
            collapse_warnings = watch.collapse_warnings;
            state
        }
    };
    let pretrain_seconds = start.elapsed().as_secs_f64();
    checkpoint::save(&dir.join("model.safetensors"), &state)?;

    let kinds = [FeatureKind::Encoder, FeatureKind::Projector];
    let embed_store = |path: &Path, name: &str| -> Result<Vec<Embeddings>> {
        let store = PatchStore::open(path)?;
        let embedded = embed::embed_kinds(eng, &state, &store, &kinds, settings, |_, _| {})?;
        if config.keep_embeddings {
            for (e, tag) in embedded.iter().zip(["h", "z"]) {
                e.save(&dir.join(format!("{name}.{tag}.safetensors")))?;
            }
        }
        Ok(embedded)
    };
    let train = embed_store(&data.paths.train, "train")?;
    let test = embed_store(&data.paths.test, "test")?;
    let cells = embed_store(&data.paths.cells, "cells")?;

    let mut metrics = BTreeMap::new();
    let mut instance = Vec::new();
    for ((train, cells), tag) in train.iter().zip(&cells).zip(["h", "z"]) {
        let report = eval::evaluate(train, cells, &config.eval)?;
        record_instance(&mut metrics, tag, &report);
        instance.push(report);
    }
    write_atomic(
        &dir.join("instance.json"),
        serde_json::to_string_pretty(&instance)?.as_bytes(),
    )?;

    // The bag level, as the reference evaluates: MIL heads on the projector's z.
    let (train_z, test_z) = (&train[1], &test[1]);
    let bags = MilBag::from_embeddings(train_z);
    for &head in &config.mil_heads {
        let (spec, epochs) = config.bag_head(head, train_z.dim);
        let (folder, prefix) = bag_head_names(head);
        let mil_config = MilTrainConfig {
            epochs,
            seed,
            ..head.train_defaults()
        };
        let trained = spec.train(&bags, train_z.dim, &mil_config, |_| {})?;
        let mil_dir = dir.join(folder);
        std::fs::create_dir_all(&mil_dir)?;
        mil_report::save_model(&mil_dir.join(mil_report::MODEL_FILE), &trained.selected)?;
        let evaluation =
            mil_report::evaluate(&mil_dir, &trained.selected, test_z, data.witnesses_per_bag)?;
        record_bags(&mut metrics, prefix, &evaluation);
    }
    let result = RunResult {
        witness_rate: rate,
        seed,
        variant: variant.to_string(),
        pretrain_seconds,
        collapse_warnings,
        metrics,
    };
    Ok((result, instance))
}

/// A MIL head's figures on the test bags as `<prefix>.f1`, `.accuracy`, `.auc` and
/// `.retrieval`.
fn record_bags(metrics: &mut BTreeMap<String, f64>, prefix: &str, evaluation: &Evaluation) {
    let m = evaluation.metrics;
    let mut put = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            metrics.insert(format!("{prefix}.{name}"), v);
        }
    };
    put("f1", Some(m.f1));
    put("accuracy", Some(m.accuracy));
    put("auc", m.auc);
    put("retrieval", evaluation.mean_fraction());
}

fn record_instance(metrics: &mut BTreeMap<String, f64>, tag: &str, r: &InstanceReport) {
    let mut put = |name: &str, v: f64| {
        metrics.insert(format!("{tag}.{name}"), v);
    };
    if let Some(auc) = r.probe_auroc {
        put("probe_auroc", auc);
    }
    put("centroid_auroc", r.centroid_auroc);
    put("knn_auroc", r.knn_auroc);
    put("top_k_precision", r.retrieval.precision);
    put("mean_cosine", r.spread.mean_pairwise_cosine);
    put("per_dim_std", r.spread.per_dim_std);
}
