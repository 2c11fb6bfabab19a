//! A pretraining run's settings: the reference defaults, overridable by a TOML file and then
//! by command-line flags. One struct is the flags, the config file and the resolved settings
//! written into the run folder (what `--resume` continues with); validation lives here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{InitReport, load_init};
use crate::data::input::augment::AugmentConfig;
use crate::data::input::sampler::SamplerMode;
use crate::model::optim::Schedule;
use crate::model::{ModelState, NetConfig, NetSpec, StepConfig};

/// What the network learns from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Contrastive loss on slide-positive patches, cohesion on slide-negative ones, combined
    /// by gradient surgery (the method).
    #[default]
    Slam,
    /// Contrastive loss alone on every patch, slide labels unused (the SimCLR ablation).
    Simclr,
    /// Every patch takes its slide's label; a linear classifier on the encoder features is
    /// trained with the encoder by cross-entropy (the weakly supervised baseline).
    Weak,
}

/// Every setting of a run. Field names are the TOML keys and, with `-` for `_`, the flags.
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PretrainConfig {
    /// The patch store to pretrain on (a positional argument of `slam pretrain`).
    #[arg(skip)]
    pub store: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub net: NetSpec,
    /// Patches per step, split between abnormal-bag and normal-bag patches by pool size.
    #[arg(long, default_value_t = PretrainConfig::default().batch)]
    pub batch: usize,
    /// Epochs the learning-rate schedule spans (the run's length without --max-steps).
    #[arg(long, default_value_t = PretrainConfig::default().epochs)]
    pub epochs: u32,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    #[arg(long, default_value_t = PretrainConfig::default().warmup_epochs)]
    pub warmup_epochs: u32,
    /// Stop after this many steps in all (the schedule still spans --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub step: StepConfig,
    /// Side of the random (and center) crops fed to the network.
    #[arg(long, default_value_t = PretrainConfig::default().crop)]
    pub crop: usize,
    /// slam (both tasks, slide labels) or simclr (contrastive only, no labels).
    #[arg(long, value_enum, default_value_t = PretrainConfig::default().objective)]
    pub objective: Objective,
    /// disjoint (every patch once per epoch) or sliding (the reference's overlapping batches).
    #[arg(long, value_enum, default_value_t = PretrainConfig::default().sampler)]
    pub sampler: SamplerMode,
    /// Start from these weights instead of the seeded random initialization: a checkpoint
    /// with the reference's names, or torchvision's ResNet names (conv1, bn1, layer1, ...;
    /// its classifier fc is left out), e.g. ImageNet weights converted to safetensors. The
    /// encoder must match the network's shape; a missing projector keeps its random start.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Seed of the initialization, the sampler and the augmentation.
    #[arg(long, default_value_t = PretrainConfig::default().seed)]
    pub seed: u64,
    /// Steps between checkpoints (one is always written at the end).
    #[arg(long, default_value_t = PretrainConfig::default().checkpoint_every)]
    pub checkpoint_every: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            store: PathBuf::new(),
            net: NetSpec::default(),
            batch: 256,
            epochs: 150,
            warmup_epochs: 10,
            max_steps: None,
            step: StepConfig::default(),
            crop: AugmentConfig::default().crop,
            objective: Objective::Slam,
            sampler: SamplerMode::Disjoint,
            init: None,
            seed: 0,
            checkpoint_every: 500,
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file of settings; unknown keys are errors (a typo must not be ignored).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    /// Settings from TOML text; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_table(toml::from_str(text)?)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Every key a config file may hold: the flag names (with `_`) and `store`.
    pub fn keys() -> Vec<String> {
        let flags = Self::augment_args(clap::Command::new("pretrain"));
        let mut keys: Vec<String> = flags
            .get_arguments()
            .map(|arg| arg.get_id().as_str().to_owned())
            .collect();
        keys.insert(0, "store".into());
        keys
    }

    /// Settings from a table of keys, refusing unknown ones (the sub-settings are flattened,
    /// which serde cannot check by itself).
    fn from_table(table: toml::Table) -> Result<Self> {
        let keys = Self::keys();
        if let Some(unknown) = table.keys().find(|k| !keys.contains(k)) {
            bail!(
                "unknown field `{unknown}`, expected one of {}",
                keys.iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(table.try_into()?)
    }

    /// These settings with the values of `keys` taken from `other` (the flags a user gave,
    /// over a config file's values).
    pub fn overridden_by(&self, other: &Self, keys: &[&str]) -> Result<Self> {
        let mut table = toml::Table::try_from(self)?;
        let given = toml::Table::try_from(other)?;
        for key in keys {
            match given.get(*key) {
                Some(value) => table.insert((*key).to_owned(), value.clone()),
                None => table.remove(*key),
            };
        }
        Self::from_table(table)
    }

    pub fn net(&self) -> Result<NetConfig> {
        self.net.resolve()
    }

    /// The model a new run starts from: `init`'s weights, or the seeded initialization.
    pub fn initial_state(&self) -> Result<(ModelState, Option<InitReport>)> {
        let net = self.net()?;
        Ok(match &self.init {
            Some(path) => {
                let (state, report) = load_init(path, net, self.seed)
                    .with_context(|| format!("cannot start from --init {}", path.display()))?;
                (state, Some(report))
            }
            None => (ModelState::init(net, self.seed)?, None),
        })
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            base_lr: self.step.lr as f64,
            warmup_epochs: self.warmup_epochs,
            epochs: self.epochs,
        }
    }

    pub fn augment(&self) -> AugmentConfig {
        AugmentConfig {
            crop: self.crop,
            ..AugmentConfig::default()
        }
    }

    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.store.as_os_str().is_empty(),
            "no patch store given: pass one (`slam pretrain data/train.patches`) or set `store` in the config"
        );
        self.net()?;
        self.step.validate()?;
        ensure!(
            self.batch >= 4,
            "batch must be at least 4, got {}",
            self.batch
        );
        ensure!(self.epochs >= 1, "epochs must be at least 1");
        ensure!(
            self.warmup_epochs <= self.epochs,
            "warmup_epochs ({}) exceeds epochs ({}): lower it (--warmup-epochs)",
            self.warmup_epochs,
            self.epochs
        );
        ensure!(self.max_steps != Some(0), "max_steps must be at least 1");
        ensure!(
            self.checkpoint_every >= 1,
            "checkpoint_every must be at least 1"
        );
        ensure!(self.crop >= 1, "crop must be at least 1 pixel");
        Ok(())
    }
}
