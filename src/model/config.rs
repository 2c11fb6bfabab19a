//! The network's shape: a torchvision ResNet of BasicBlocks at a chosen width and depth,
//! followed by the SLAM-AGS projector.

use anyhow::{Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};

/// ResNet stages; each doubles the channels and (after the first) halves the resolution.
pub const STAGES: usize = 4;

/// Network shape. The reference is ResNet-18 (`width 64`, blocks `2,2,2,2`) with the
/// projector `Linear(512, 512) - ReLU - Linear(512, out_dim = 512)`; the projector's hidden
/// width is always the encoder's feature width `8 * width`, as in the reference model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Channels of the stem and of stage 0; stage `i` has `width * 2^i`.
    pub width: usize,
    /// BasicBlocks per stage.
    pub blocks: [usize; STAGES],
    /// Embedding size `z` of the projector.
    pub out_dim: usize,
}

impl NetConfig {
    pub const RESNET18: Self = Self {
        width: 64,
        blocks: [2, 2, 2, 2],
        out_dim: 512,
    };

    /// A named architecture: `resnet18`, `resnet34` (torchvision's BasicBlock ResNets) or
    /// `resnet10` (one block per stage), all at width 64 and out_dim 512.
    pub fn named(name: &str) -> Result<Self> {
        let blocks = match name {
            "resnet10" => [1, 1, 1, 1],
            "resnet18" => [2, 2, 2, 2],
            "resnet34" => [3, 4, 6, 3],
            other => bail!(
                "unknown architecture {other:?}: expected resnet10, resnet18 or resnet34 \
                 (use --width, --blocks and --out-dim for other shapes)"
            ),
        };
        Ok(Self {
            blocks,
            ..Self::RESNET18
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.width > 0, "width must be at least 1");
        ensure!(self.out_dim > 0, "out_dim must be at least 1");
        ensure!(
            self.blocks.iter().all(|&b| b > 0),
            "every stage needs at least one block, got {:?}",
            self.blocks
        );
        ensure!(
            self.width <= 4096 && self.out_dim <= 1 << 16 && self.blocks.iter().all(|&b| b <= 64),
            "network shape {self} is unreasonably large"
        );
        Ok(())
    }

    pub fn stage_channels(&self, stage: usize) -> usize {
        self.width << stage
    }

    /// Width of the encoder output `h` (and of the projector's hidden layer).
    pub fn feature_dim(&self) -> usize {
        self.stage_channels(STAGES - 1)
    }
}

/// The network shape as a command or a config file gives it: a named architecture, reshaped
/// by any of the overrides. The flags and the config keys of every command that builds a
/// network.
#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetSpec {
    /// Architecture: resnet18 (the reference), resnet10 or resnet34.
    #[arg(long, default_value_t = NetSpec::default().arch)]
    pub arch: String,
    /// Channels of the stem and first stage (the reference: 64); overrides the preset's.
    #[arg(long)]
    pub width: Option<usize>,
    /// BasicBlocks in each of the four stages, e.g. 2,2,2,2; overrides the preset's.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<usize>>,
    /// Size of the projector's output z (the reference: 512); overrides the preset's.
    #[arg(long)]
    pub out_dim: Option<usize>,
}

impl Default for NetSpec {
    fn default() -> Self {
        Self {
            arch: "resnet18".into(),
            width: None,
            blocks: None,
            out_dim: None,
        }
    }
}

impl NetSpec {
    /// The shape these settings name, checked.
    pub fn resolve(&self) -> Result<NetConfig> {
        let mut net = NetConfig::named(&self.arch)?;
        if let Some(width) = self.width {
            net.width = width;
        }
        if let Some(blocks) = &self.blocks {
            net.blocks = blocks.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("blocks takes 4 numbers (one per stage), got {blocks:?}")
            })?;
        }
        if let Some(out_dim) = self.out_dim {
            net.out_dim = out_dim;
        }
        net.validate()?;
        Ok(net)
    }
}

impl std::fmt::Display for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.blocks;
        write!(
            f,
            "width {} blocks {},{},{},{} out_dim {}",
            self.width, b[0], b[1], b[2], b[3], self.out_dim
        )
    }
}
