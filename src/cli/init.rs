//! `slam init`: a freshly initialized model as a checkpoint.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;

use crate::checkpoint;
use crate::model::{ModelState, NetSpec, Network};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam init --out resnet18.safetensors
  slam init --out tiny.safetensors --width 8 --blocks 1,1,1,1 --out-dim 16 --seed 7

The file holds the reference model's state_dict (names and shapes), so PyTorch loads it with
  model.load_state_dict(safetensors.torch.load_file(\"resnet18.safetensors\"), strict=True)")]
pub struct InitArgs {
    /// Checkpoint to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub net: NetSpec,
    /// Seed of the initialization; the same seed gives the same parameters.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace the file if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &InitArgs) -> Result<()> {
    ensure!(
        args.force || !args.out.exists(),
        "{} exists; pass --force to replace it",
        args.out.display()
    );
    let config = args.net.resolve()?;
    let state = ModelState::init(config, args.seed)?;
    checkpoint::save(&args.out, &state)?;
    let net = Network::new(config);
    println!(
        "wrote {} ({config}): {} trainable parameters in {} tensors, {} state_dict entries",
        args.out.display(),
        net.param_len(),
        net.params.len(),
        net.params.len() + net.running.len() + net.batch_norms.len()
    );
    Ok(())
}
