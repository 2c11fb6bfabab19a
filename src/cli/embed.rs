//! `slam embed`: every patch of a store through a trained model, features to a file.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{EngineArgs, with_engine};
use crate::data::PatchStore;
use crate::embed::{self, EmbedSettings, FeatureKind, load_model};
use crate::engine::cuda::MatmulMode;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam embed runs/slam data/test.patches --out test.embed.safetensors
  slam embed model.safetensors data/test.patches --out test.embed.safetensors --crop 224 --features encoder

MODEL is a run folder of `slam pretrain` (its model.safetensors, at the run's crop) or a
checkpoint file (then --crop, default 224 or the patch size if smaller). Each patch's center
crop goes through the network in eval mode (running batch-norm statistics). The output is
safetensors: features [patches, dim], bag_offsets, bag_labels, instance_labels, and the bag
and patch names in its metadata; in Python: safetensors.numpy.load_file(path).")]
pub struct EmbedArgs {
    /// A `slam pretrain` run folder or a model checkpoint (safetensors).
    pub model: PathBuf,
    /// The patch store to embed.
    pub store: PathBuf,
    /// The embeddings file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Projector output z (the reference) or encoder output h.
    #[arg(long, value_enum, default_value_t = FeatureKind::Projector)]
    pub features: FeatureKind,
    /// Side of the center crop (default: the run's crop, else 224 or the patch size).
    #[arg(long)]
    pub crop: Option<usize>,
    /// Patches per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Replace the output if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &EmbedArgs) -> Result<()> {
    ensure!(
        args.force || !args.out.exists(),
        "{} exists; pass --force to replace it",
        args.out.display()
    );
    let (state, trained_crop) = load_model(&args.model)?;
    let store = PatchStore::open(&args.store)?;
    let size = store.patch_size();
    let crop = args
        .crop
        .or(trained_crop)
        .unwrap_or_else(|| 224.min(size.height).min(size.width));
    let bar = ProgressBar::new(store.len() as u64).with_style(
        ProgressStyle::with_template("embed [{bar:30}] {pos}/{len} patches {per_sec} (eta {eta})")?
            .progress_chars("=> "),
    );
    let embeddings = with_engine!(args.engine, MatmulMode::Tf32, |eng| embed::embed(
        eng,
        &state,
        &store,
        EmbedSettings {
            kind: args.features,
            crop,
            batch: args.batch
        },
        |done, _| bar.set_position(done as u64),
    ))?;
    bar.finish_and_clear();
    embeddings.save(&args.out)?;
    println!(
        "embedded {} patches in {} bags ({:?} features, dim {}, crop {crop}) in {:.1} s: {}",
        embeddings.len(),
        embeddings.bags.len(),
        args.features,
        embeddings.dim,
        bar.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
