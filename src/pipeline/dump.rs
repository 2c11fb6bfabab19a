//! One training step with everything another implementation needs to check it, as one
//! safetensors file (`slam dump-step`; `pytorch/check_dump.py` reads it).
//!
//! Tensors: `input.{pos_i,pos_j,neg_i,neg_j}` (f32 `[n, 3, crop, crop]`), `loss.contrastive`
//! and `loss.cohesion` (`[1]`), `grad.contrastive` (g1), `grad.cohesion` (g2), `grad.combined`
//! (after surgery, before weight decay; flat, in `parameters()` order), and the full
//! `state_dict` before and after the SGD update as `before.<name>` and `after.<name>`. The
//! metadata key `slam_ags` holds the network shape (`config`), the hyper-parameters (`step`),
//! the results (`report`), the engine, its precision and the crate version.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::checkpoint::{TensorFile, TensorWriter};
use crate::data::input::batch::HostBatch;
use crate::engine::Engine;
use crate::model::{ModelState, StepBatch, StepConfig, StepReport, Surgery, Trainer};

/// One step's results, downloaded.
pub struct StepDump {
    pub engine: &'static str,
    /// The arithmetic of the layers' products (see [`crate::engine::Backend::precision`]).
    pub precision: &'static str,
    pub report: StepReport,
    pub g1: Vec<f32>,
    pub g2: Vec<f32>,
    pub combined: Vec<f32>,
    pub after: ModelState,
}

/// The hyper-parameters as the dump format records them: SGD's nested under `sgd`.
#[derive(Serialize)]
struct StepRecord {
    surgery: Surgery,
    sgd: SgdRecord,
    temperature: f32,
    /// `[l1, l2]`: the weights of the contrastive and the cohesion task.
    task_weights: [f32; 2],
}

#[derive(Serialize)]
struct SgdRecord {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
}

impl From<&StepConfig> for StepRecord {
    fn from(c: &StepConfig) -> Self {
        Self {
            surgery: c.surgery,
            sgd: SgdRecord {
                lr: c.lr,
                momentum: c.momentum,
                weight_decay: c.weight_decay,
            },
            temperature: c.temperature,
            task_weights: [c.contrastive_weight, c.cohesion_weight],
        }
    }
}

impl StepDump {
    /// One step from `before` on `batch` at the configuration's learning rate.
    pub fn run<E: Engine>(
        eng: &E,
        before: &ModelState,
        batch: &HostBatch,
        cfg: &StepConfig,
    ) -> Result<Self> {
        let mut trainer = Trainer::new(eng, before)?;
        let mut combined = eng.alloc(trainer.net.param_len())?;
        let report = trainer.step(
            eng,
            &StepBatch::upload(eng, batch)?,
            cfg,
            cfg.lr as f64,
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

    /// Writes the dump of this step, taken from `before` on `batch` with `cfg` (atomically).
    pub fn write(
        &self,
        path: &Path,
        before: &ModelState,
        batch: &HostBatch,
        cfg: &StepConfig,
    ) -> Result<()> {
        let mut out = TensorWriter::new();
        let plane = [3, batch.crop, batch.crop];
        for (name, n, data) in batch.views() {
            out.f32(
                format!("input.{name}"),
                &[n, plane[0], plane[1], plane[2]],
                data,
            );
        }
        out.f32("loss.contrastive", &[1], &[self.report.loss_contrastive]);
        out.f32("loss.cohesion", &[1], &[self.report.loss_cohesion]);
        let len = self.g1.len();
        out.f32("grad.contrastive", &[len], &self.g1);
        out.f32("grad.cohesion", &[len], &self.g2);
        out.f32("grad.combined", &[len], &self.combined);
        out.model_state("before.", before)?;
        out.model_state("after.", &self.after)?;
        out.info("step", StepRecord::from(cfg))?;
        out.info("report", self.report)?;
        out.info("engine", self.engine)?;
        out.info("version", env!("CARGO_PKG_VERSION"))?;
        out.info("precision", self.precision)?;
        out.write(path)
    }
}

/// The four views of a step from a safetensors file (`input.pos_i`, `input.pos_j`,
/// `input.neg_i`, `input.neg_j`, f32 `[n, 3, crop, crop]`), as a dump or a golden file holds
/// them.
pub fn read_inputs(path: &Path) -> Result<HostBatch> {
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
    let mut next = || data.next().expect("four views");
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
