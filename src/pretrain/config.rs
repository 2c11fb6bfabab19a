//! A pretraining run's settings: the reference defaults, overridable by a TOML file and then
//! by command-line flags. The resolved settings are written into the run folder and are
//! what `--resume` continues with.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::data::input::augment::AugmentConfig;
use crate::data::input::sampler::SamplerMode;
use crate::model::optim::{Schedule, Sgd};
use crate::model::{NetConfig, StepConfig, Surgery};

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
}

/// Every setting of a run. Field names are the TOML keys (and, with `-` for `_`, the flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// The patch store to pretrain on.
    pub store: PathBuf,
    /// `resnet18`, `resnet10` or `resnet34`, reshaped by `width`, `blocks`, `out_dim`.
    pub arch: String,
    pub width: Option<usize>,
    pub blocks: Option<[usize; 4]>,
    pub out_dim: Option<usize>,
    /// Patches per step, split between the pools by their sizes.
    pub batch: usize,
    pub epochs: u32,
    pub warmup_epochs: u32,
    /// Stop after this many steps in all (the schedule still spans `epochs`).
    pub max_steps: Option<u64>,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub temperature: f32,
    /// Side of the square crops fed to the network.
    pub crop: usize,
    pub surgery: Surgery,
    pub objective: Objective,
    pub sampler: SamplerMode,
    pub seed: u64,
    /// Steps between checkpoints (one is always written at the end).
    pub checkpoint_every: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        let step = StepConfig::default();
        Self {
            store: PathBuf::new(),
            arch: "resnet18".into(),
            width: None,
            blocks: None,
            out_dim: None,
            batch: 256,
            epochs: 150,
            warmup_epochs: 10,
            max_steps: None,
            lr: step.sgd.lr,
            momentum: step.sgd.momentum,
            weight_decay: step.sgd.weight_decay,
            temperature: step.temperature,
            crop: AugmentConfig::default().crop,
            surgery: step.surgery,
            objective: Objective::Slam,
            sampler: SamplerMode::Disjoint,
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
        toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    pub fn net(&self) -> Result<NetConfig> {
        let mut net = NetConfig::named(&self.arch)?;
        if let Some(width) = self.width {
            net.width = width;
        }
        if let Some(blocks) = self.blocks {
            net.blocks = blocks;
        }
        if let Some(out_dim) = self.out_dim {
            net.out_dim = out_dim;
        }
        net.validate()?;
        Ok(net)
    }

    pub fn step(&self) -> StepConfig {
        StepConfig {
            surgery: self.surgery,
            sgd: Sgd {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            temperature: self.temperature,
        }
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            base_lr: self.lr as f64,
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
        let floats = [
            ("lr", self.lr, self.lr >= 0.0),
            (
                "momentum",
                self.momentum,
                (0.0..1.0).contains(&self.momentum),
            ),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
            ("temperature", self.temperature, self.temperature > 0.0),
        ];
        for (name, value, ok) in floats {
            ensure!(value.is_finite() && ok, "{name} = {value} is out of range");
        }
        Ok(())
    }
}
