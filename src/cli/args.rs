//! Arguments shared by several commands.

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};

use crate::model::optim::Sgd;
use crate::model::{NetConfig, StepConfig, Surgery};

/// The network's shape.
#[derive(Args, Clone, Debug)]
pub struct ArchArgs {
    /// Architecture: resnet18 (the reference), resnet10 or resnet34.
    #[arg(long, default_value = "resnet18")]
    pub arch: String,
    /// Channels of the stem and first stage (the reference: 64); overrides the preset's.
    #[arg(long)]
    pub width: Option<usize>,
    /// BasicBlocks in each of the four stages, e.g. 2,2,2,2; overrides the preset's.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<usize>>,
    /// Size of the projector's output z (the reference: 512).
    #[arg(long)]
    pub out_dim: Option<usize>,
}

impl ArchArgs {
    pub fn config(&self) -> Result<NetConfig> {
        let mut config = NetConfig::named(&self.arch)?;
        if let Some(width) = self.width {
            config.width = width;
        }
        if let Some(blocks) = &self.blocks {
            config.blocks = blocks.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("--blocks takes 4 numbers (one per stage), got {blocks:?}")
            })?;
        }
        if let Some(out_dim) = self.out_dim {
            config.out_dim = out_dim;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Hyper-parameters of a training step; the defaults are the reference's, from
/// [`StepConfig::default`].
#[derive(Args, Clone, Debug)]
pub struct StepArgs {
    /// How the two task gradients are combined.
    #[arg(long, value_enum, default_value_t = StepConfig::default().surgery)]
    pub surgery: Surgery,
    /// Learning rate of this step.
    #[arg(long, default_value_t = Sgd::default().lr)]
    pub lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = Sgd::default().momentum)]
    pub momentum: f32,
    /// Weight decay on every parameter.
    #[arg(long, default_value_t = Sgd::default().weight_decay)]
    pub weight_decay: f32,
    /// Temperature of both losses.
    #[arg(long, default_value_t = StepConfig::default().temperature)]
    pub temperature: f32,
}

impl StepArgs {
    pub fn config(&self) -> Result<StepConfig> {
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0,
            "--lr must be a finite non-negative number, got {}",
            self.lr
        );
        ensure!(
            self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
            "--momentum must be in [0, 1), got {}",
            self.momentum
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be a finite non-negative number, got {}",
            self.weight_decay
        );
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--temperature must be positive, got {}",
            self.temperature
        );
        Ok(StepConfig {
            surgery: self.surgery,
            sgd: Sgd {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            temperature: self.temperature,
        })
    }
}

/// Where the step runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The pure-Rust reference engine, on every core (or --threads).
    Cpu,
    /// The CUDA engine.
    Cuda,
}

impl Device {
    /// Fails with what to do instead when the engine is not available in this build.
    pub fn require_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda => anyhow::bail!(
                "the CUDA engine does not run training steps yet in this version of slam \
                 (its kernels are compiled, the runtime is not written yet); use --device cpu"
            ),
        }
    }
}
