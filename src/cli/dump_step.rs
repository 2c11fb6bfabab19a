//! `slam dump-step`: one training step with everything another implementation needs to check
//! it, as one safetensors file (`pipeline::dump`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{EngineArgs, with_engine};
use crate::checkpoint::TensorFile;
use crate::data::input::batch::HostBatch;
use crate::engine::cuda::MatmulMode;
use crate::model::{ModelState, NetSpec, StepConfig};
use crate::pipeline::dump::{StepDump, read_inputs};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam dump-step --out step.safetensors
  slam dump-step --out step.safetensors --checkpoint model.safetensors --inputs batch.safetensors
  slam dump-step --out step.safetensors --width 8 --blocks 1,1,1,1 --out-dim 16 --crop 32 \\
      --batch-pos 4 --batch-neg 4 --surgery pcgrad --lr 0.05

The file holds input.pos_i, input.pos_j, input.neg_i, input.neg_j (f32 [n, 3, crop, crop]),
loss.contrastive and loss.cohesion ([1]), grad.contrastive (g1), grad.cohesion (g2) and
grad.combined (after surgery, before weight decay; flat, in parameters() order), and the
full state_dict before and after the SGD update as before.<name> and after.<name>.
Its metadata key \"slam_ags\" holds a JSON object with the network shape (config), the
hyper-parameters (step) and the results (report).")]
pub struct DumpStepArgs {
    /// File to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Model to start from (a checkpoint); without it, a fresh model from --arch and --seed.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Prefix of the state_dict names inside --checkpoint (e.g. "before." for a step dump).
    #[arg(long, default_value = "", requires = "checkpoint")]
    pub prefix: String,
    /// The four input batches (input.pos_i, input.pos_j, input.neg_i, input.neg_j, f32
    /// [n, 3, crop, crop]); without it, standard-normal inputs from --seed.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetSpec,
    /// Seed of the fresh model and of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the random input crops.
    #[arg(long, default_value_t = 64, conflicts_with = "inputs")]
    pub crop: usize,
    /// Slide-positive patches in the random batch.
    #[arg(long, default_value_t = 8, conflicts_with = "inputs")]
    pub batch_pos: usize,
    /// Slide-negative patches in the random batch.
    #[arg(long, default_value_t = 8, conflicts_with = "inputs")]
    pub batch_neg: usize,
    #[command(flatten)]
    pub step: StepConfig,
    /// The engine (default matmul on cuda: exact, so that the dump checks the kernels).
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: &DumpStepArgs) -> Result<()> {
    args.step.validate()?;
    let before = match &args.checkpoint {
        Some(path) => TensorFile::open(path)?.model_state(&args.prefix)?,
        None => ModelState::init(args.net.resolve()?, args.seed)?,
    };
    let batch = match &args.inputs {
        Some(path) => read_inputs(path)?,
        None => HostBatch::random(args.batch_pos, args.batch_neg, args.crop, args.seed),
    };
    let dump = with_engine!(args.engine, MatmulMode::Exact, |eng| {
        StepDump::run(eng, &before, &batch, &args.step)
    })?;
    dump.write(&args.out, &before, &batch, &args.step)?;
    let c = dump.report.combination;
    println!("wrote {}", args.out.display());
    println!(
        "loss contrastive {:.6}  cohesion {:.6}  cos(g1, g2) {:+.4}  surgery {} {}",
        dump.report.loss_contrastive,
        dump.report.loss_cohesion,
        c.cosine,
        args.step.surgery,
        if c.fired { "fired" } else { "did not fire" }
    );
    Ok(())
}
