//! `slam dump-step`: one training step with everything another implementation needs to check
//! it, as one safetensors file.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;

use super::args::{ArchArgs, EngineArgs, Matmul, StepArgs, with_engine};
use crate::checkpoint::{TensorFile, TensorWriter};
use crate::engine::Engine;
use crate::model::{HostBatch, ModelState, StepConfig, StepReport, Trainer};

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
    pub arch: ArchArgs,
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
    pub step: StepArgs,
    /// The engine (default matmul on cuda: exact, so that the dump checks the kernels).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// One step's results, downloaded.
struct StepDump {
    engine: &'static str,
    /// The arithmetic of the layers' products (see [`Engine::precision`]).
    precision: &'static str,
    report: StepReport,
    g1: Vec<f32>,
    g2: Vec<f32>,
    combined: Vec<f32>,
    after: ModelState,
}

impl StepDump {
    fn run<E: Engine>(
        eng: &E,
        before: &ModelState,
        batch: &HostBatch,
        step_cfg: &StepConfig,
    ) -> Result<Self> {
        let mut trainer = Trainer::new(eng, before)?;
        let mut combined = eng.zeros(trainer.net.param_len())?;
        let report = trainer.step(
            eng,
            &batch.upload(eng)?,
            step_cfg,
            step_cfg.sgd.lr as f64,
            Some(&mut combined),
        )?;
        Ok(Self {
            engine: eng.name(),
            precision: eng.precision(),
            report,
            g1: eng.download(eng.all(&trainer.g1))?,
            g2: eng.download(eng.all(&trainer.g2))?,
            combined: eng.download(eng.all(&combined))?,
            after: trainer.state(eng)?,
        })
    }
}

/// Reads the four views from `path`.
fn read_inputs(path: &std::path::Path) -> Result<HostBatch> {
    let file = TensorFile::open(path)?;
    let mut views = Vec::new();
    for name in ["pos_i", "pos_j", "neg_i", "neg_j"] {
        let (data, shape) = file.f32(&format!("input.{name}"))?;
        ensure!(
            shape.len() == 4 && shape[1] == 3 && shape[2] == shape[3],
            "{}: input.{name} has shape {shape:?}, expected [n, 3, crop, crop]",
            path.display()
        );
        views.push((data, shape));
    }
    let crop = views[0].1[2];
    ensure!(
        views.iter().all(|(_, s)| s[2] == crop),
        "{}: the four inputs must share one crop size",
        path.display()
    );
    ensure!(
        views[0].1[0] == views[1].1[0] && views[2].1[0] == views[3].1[0],
        "{}: both views of a kind must hold the same number of images",
        path.display()
    );
    let (n_pos, n_neg) = (views[0].1[0], views[2].1[0]);
    let mut data = views.into_iter().map(|(d, _)| d);
    let mut next = || data.next().unwrap();
    let batch = HostBatch {
        pos_i: next(),
        pos_j: next(),
        neg_i: next(),
        neg_j: next(),
        n_pos,
        n_neg,
        crop,
    };
    batch
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(batch)
}

pub fn run(args: &DumpStepArgs) -> Result<()> {
    let step_cfg = args.step.config()?;
    let before = match &args.checkpoint {
        Some(path) => TensorFile::open(path)?.model_state(&args.prefix)?,
        None => ModelState::init(args.arch.config()?, args.seed)?,
    };
    let batch = match &args.inputs {
        Some(path) => read_inputs(path)?,
        None => HostBatch::random(args.batch_pos, args.batch_neg, args.crop, args.seed),
    };
    let step = with_engine!(args.engine, Matmul::Exact, |eng| {
        StepDump::run(eng, &before, &batch, &step_cfg)
    })?;
    let report = &step.report;

    let mut out = TensorWriter::new();
    let plane = [3, batch.crop, batch.crop];
    for (name, n, data) in batch.views() {
        out.f32(
            format!("input.{name}"),
            &[n, plane[0], plane[1], plane[2]],
            data,
        );
    }
    out.f32("loss.contrastive", &[1], &[report.loss_contrastive]);
    out.f32("loss.cohesion", &[1], &[report.loss_cohesion]);
    let len = step.g1.len();
    out.f32("grad.contrastive", &[len], &step.g1);
    out.f32("grad.cohesion", &[len], &step.g2);
    out.f32("grad.combined", &[len], &step.combined);
    out.model_state("before.", &before)?;
    out.model_state("after.", &step.after)?;
    out.info("step", step_cfg)?;
    out.info("report", report)?;
    out.info("engine", step.engine)?;
    out.info("version", env!("CARGO_PKG_VERSION"))?;
    out.info("precision", step.precision)?;
    out.write(&args.out)?;

    let c = report.combination;
    println!("wrote {}", args.out.display());
    println!(
        "loss contrastive {:.6}  cohesion {:.6}  cos(g1, g2) {:+.4}  surgery {} {}",
        report.loss_contrastive,
        report.loss_cohesion,
        c.cosine,
        step_cfg.surgery,
        if c.fired { "fired" } else { "did not fire" }
    );
    Ok(())
}
