//! One SLAM-AGS training step: four forward passes, the two task losses, one backward per
//! task into its own flat gradient, gradient surgery, and the fused SGD update.

use std::time::Instant;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use super::network::Network;
use super::state::ModelState;
use super::surgery::{Combination, Surgery};
use crate::data::input::batch::HostBatch;
use crate::engine::{Engine, GradDots, LossViews, SgdBuffers, SgdUpdate, ViewPair, nchw_to_cnhw};
use crate::eval;

/// The four views of one step, each `[3, n, crop, crop]` channel-major on the engine.
pub struct StepBatch<E: Engine> {
    /// Two contrastive views of the slide-positive patches.
    pub pos_i: E::Buf,
    pub pos_j: E::Buf,
    /// Center crop and contrastive view of the slide-negative patches.
    pub neg_i: E::Buf,
    pub neg_j: E::Buf,
    pub n_pos: usize,
    pub n_neg: usize,
    pub crop: usize,
}

impl<E: Engine> StepBatch<E> {
    /// The batch on `eng`, reordered to the engines' channel-major layout.
    pub fn upload(eng: &E, host: &HostBatch) -> Result<Self> {
        host.validate()?;
        let plane = host.crop * host.crop;
        let up = |n: usize, data: &[f32]| eng.upload(&nchw_to_cnhw(data, n, 3, plane));
        Ok(Self {
            pos_i: up(host.n_pos, &host.pos_i)?,
            pos_j: up(host.n_pos, &host.pos_j)?,
            neg_i: up(host.n_neg, &host.neg_i)?,
            neg_j: up(host.n_neg, &host.neg_j)?,
            n_pos: host.n_pos,
            n_neg: host.n_neg,
            crop: host.crop,
        })
    }
}

/// Hyper-parameters of a training step, the reference's by default: the flags and config
/// keys of every command that runs steps.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepConfig {
    /// How the two task gradients are combined.
    #[arg(long, value_enum, default_value_t = StepConfig::default().surgery)]
    pub surgery: Surgery,
    /// Learning rate (the peak of the schedule in a pretraining run).
    #[arg(long, default_value_t = StepConfig::default().lr)]
    pub lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = StepConfig::default().momentum)]
    pub momentum: f32,
    /// Weight decay on every parameter.
    #[arg(long, default_value_t = StepConfig::default().weight_decay)]
    pub weight_decay: f32,
    /// Temperature of both losses.
    #[arg(long, default_value_t = StepConfig::default().temperature)]
    pub temperature: f32,
    /// Weight l1 of the contrastive task, L = l1 L_contrastive + l2 L_cohesion: scales g1
    /// before the surgery (the reference fixes it at 1).
    #[arg(long, default_value_t = StepConfig::default().contrastive_weight)]
    pub contrastive_weight: f32,
    /// Weight l2 of the cohesion task: scales g2 before the surgery (the reference fixes it
    /// at 1). Below 1 it keeps the cohesion gradient, the larger one at the start, from
    /// collapsing the embeddings (docs/RESULTS.md).
    #[arg(long, default_value_t = StepConfig::default().cohesion_weight)]
    pub cohesion_weight: f32,
}

impl Default for StepConfig {
    fn default() -> Self {
        Self {
            surgery: Surgery::Ags,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 1e-4,
            temperature: 0.07,
            contrastive_weight: 1.0,
            cohesion_weight: 1.0,
        }
    }
}

impl StepConfig {
    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let floats = [
            (
                "lr",
                self.lr,
                self.lr >= 0.0,
                "a finite non-negative number",
            ),
            (
                "momentum",
                self.momentum,
                (0.0..1.0).contains(&self.momentum),
                "in [0, 1)",
            ),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "a finite non-negative number",
            ),
            (
                "temperature",
                self.temperature,
                self.temperature > 0.0,
                "positive",
            ),
            (
                "contrastive_weight",
                self.contrastive_weight,
                self.contrastive_weight >= 0.0,
                "a finite non-negative number",
            ),
            (
                "cohesion_weight",
                self.cohesion_weight,
                self.cohesion_weight >= 0.0,
                "a finite non-negative number",
            ),
        ];
        for (name, value, ok, want) in floats {
            ensure!(
                value.is_finite() && ok,
                "{name} must be {want}, got {value}"
            );
        }
        Ok(())
    }

    /// The combination `g = alpha g1 + beta g2` of the raw task gradients: the surgery acts
    /// on the weighted gradients `l1 g1` and `l2 g2` (their inner products are the raw ones
    /// times `l1^2`, `l1 l2`, `l2^2`), and its coefficients are carried back to the raw
    /// gradients, `alpha = l1 alpha'`, `beta = l2 beta'`. No pass over the gradients; with
    /// both weights 1 every number is unchanged. The combination's norms are the weighted
    /// gradients'.
    pub fn combine(&self, dots: GradDots) -> Combination {
        let (l1, l2) = (self.contrastive_weight as f64, self.cohesion_weight as f64);
        let weighted = GradDots {
            g1g2: dots.g1g2 * l1 * l2,
            g1g1: dots.g1g1 * l1 * l1,
            g2g2: dots.g2g2 * l2 * l2,
        };
        let c = self.surgery.combine(weighted);
        Combination {
            alpha: c.alpha * l1,
            beta: c.beta * l2,
            ..c
        }
    }

    /// The weighted objective `l1 L_contrastive + l2 L_cohesion`.
    pub fn weighted_loss(&self, contrastive: f32, cohesion: f32) -> f32 {
        self.contrastive_weight * contrastive + self.cohesion_weight * cohesion
    }

    /// The fused SGD update (PyTorch's, with momentum and weight decay) for one step at
    /// learning rate `lr` with the surgery's combination.
    pub fn update(&self, lr: f64, c: &Combination) -> SgdUpdate {
        SgdUpdate {
            alpha: c.alpha as f32,
            beta: c.beta as f32,
            lr: lr as f32,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        }
    }
}

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepReport {
    pub loss_contrastive: f32,
    pub loss_cohesion: f32,
    /// The objective the step descends: `l1 L_contrastive + l2 L_cohesion` (the task
    /// weights of [`StepConfig`]), or the weak baseline's cross-entropy (whose step reports
    /// both task losses as 0).
    pub loss: f32,
    pub lr: f64,
    pub combination: Combination,
    /// Mean over the dimensions of z of the standard deviation across the batch of the
    /// L2-normalized embeddings of the first positive view: about 1/sqrt(dim) for spread-out
    /// embeddings, near zero when they collapse to one point.
    pub embedding_std: f32,
    /// Wall time of the four passes with both losses and backward passes (device time when
    /// the trainer is [`Trainer::timed`], else up to their queueing on a device engine).
    #[serde(skip)]
    pub seconds_tasks: f64,
    /// Wall time of the surgery reduction and the fused update (likewise).
    #[serde(skip)]
    pub seconds_update: f64,
}

/// The training state on an engine: parameters, running statistics, momentum and the two
/// task gradients as flat buffers of the network's layout.
pub struct Trainer<E: Engine> {
    pub net: Network,
    pub params: E::Buf,
    pub running: E::Buf,
    pub momentum: E::Buf,
    /// `dL_contrastive/dtheta`, from the positive passes.
    pub g1: E::Buf,
    /// `dL_cohesion/dtheta`, from the negative passes.
    pub g2: E::Buf,
    pub batches_tracked: Vec<i64>,
    /// Waits for the engine at the end of the task passes and of the update, so that the
    /// step's two timings are the device's work (for benchmarks; a small stall per step).
    pub timed: bool,
}

/// Which loss a pair of passes feeds.
#[derive(Clone, Copy)]
enum Task {
    Contrastive,
    Cohesion,
}

impl<E: Engine> Trainer<E> {
    /// Uploads `state` with zero momentum (the first step then sets it to the update, as
    /// PyTorch's SGD does).
    pub fn new(eng: &E, state: &ModelState) -> Result<Self> {
        let net = state.validate()?;
        let len = net.param_len();
        Ok(Self {
            params: eng.upload(&state.params)?,
            running: eng.upload(&state.running)?,
            momentum: eng.zeros(len)?,
            g1: eng.zeros(len)?,
            g2: eng.zeros(len)?,
            batches_tracked: state.batches_tracked.clone(),
            timed: false,
            net,
        })
    }

    /// The model state, downloaded.
    pub fn state(&self, eng: &E) -> Result<ModelState> {
        Ok(ModelState {
            config: self.net.config,
            params: eng.download(eng.all(&self.params))?,
            running: eng.download(eng.all(&self.running))?,
            batches_tracked: self.batches_tracked.clone(),
        })
    }

    /// Forward both views of one task, take its loss and backpropagate both into `grad`
    /// (zeroed first). Returns the loss and the [`StepReport::embedding_std`] of view i.
    fn task_gradient(
        &mut self,
        eng: &E,
        task: Task,
        (view_i, view_j): (&E::Buf, &E::Buf),
        batch: usize,
        crop: usize,
        temperature: f32,
    ) -> Result<(f32, f32)> {
        let net = &self.net;
        let acts_i =
            net.forward_train(eng, &self.params, &mut self.running, view_i, batch, crop)?;
        let acts_j =
            net.forward_train(eng, &self.params, &mut self.running, view_j, batch, crop)?;
        for count in &mut self.batches_tracked {
            *count += 2;
        }
        let pair = ViewPair {
            dim: net.config.out_dim,
            n: batch,
        };
        let mut dz_i = eng.alloc(pair.dim * pair.n)?;
        let mut dz_j = eng.alloc(pair.dim * pair.n)?;
        let views = LossViews {
            z_i: eng.all(&acts_i.z),
            z_j: eng.all(&acts_j.z),
            dz_i: eng.all_mut(&mut dz_i),
            dz_j: eng.all_mut(&mut dz_j),
        };
        let loss = match task {
            Task::Contrastive => eng.ntxent(&pair, temperature, views)?,
            Task::Cohesion => eng.cohesion(&pair, temperature, views)?,
        };
        let grad = match task {
            Task::Contrastive => &mut self.g1,
            Task::Cohesion => &mut self.g2,
        };
        eng.fill_zero(eng.all_mut(grad))?;
        net.backward(eng, &self.params, &acts_i, dz_i, grad)?;
        net.backward(eng, &self.params, &acts_j, dz_j, grad)?;
        let spread = embedding_std(&eng.download(eng.all(&acts_i.z))?, pair.dim, batch);
        Ok((loss, spread))
    }

    /// One training step at learning rate `lr`. When `combined` is given it receives the
    /// combined gradient `alpha g1 + beta g2` (before weight decay), for step dumps.
    pub fn step(
        &mut self,
        eng: &E,
        batch: &StepBatch<E>,
        cfg: &StepConfig,
        lr: f64,
        combined: Option<&mut E::Buf>,
    ) -> Result<StepReport> {
        cfg.validate()?;
        let t = cfg.temperature;
        let start = Instant::now();
        let pos = (&batch.pos_i, &batch.pos_j);
        let neg = (&batch.neg_i, &batch.neg_j);
        let (loss_contrastive, embedding_std) =
            self.task_gradient(eng, Task::Contrastive, pos, batch.n_pos, batch.crop, t)?;
        let loss_cohesion = if batch.n_neg > 0 {
            self.task_gradient(eng, Task::Cohesion, neg, batch.n_neg, batch.crop, t)?
                .0
        } else {
            // Contrastive only: g2 = 0, so every surgery mode reduces to g = g1.
            eng.fill_zero(eng.all_mut(&mut self.g2))?;
            0.0
        };
        if self.timed {
            eng.synchronize()?;
        }
        let seconds_tasks = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let combination = self.update(eng, cfg, lr, |dots| cfg.combine(dots), combined)?;
        Ok(StepReport {
            loss_contrastive,
            loss_cohesion,
            loss: cfg.weighted_loss(loss_contrastive, loss_cohesion),
            lr,
            combination,
            embedding_std,
            seconds_tasks,
            seconds_update: start.elapsed().as_secs_f64(),
        })
    }

    /// The surgery reduction and the fused SGD update of the parameters from `g1` and `g2`,
    /// combined as `combine` says from their inner products. When `combined` is given it
    /// receives the combined gradient (before weight decay).
    pub(super) fn update(
        &mut self,
        eng: &E,
        cfg: &StepConfig,
        lr: f64,
        combine: impl FnOnce(GradDots) -> Combination,
        combined: Option<&mut E::Buf>,
    ) -> Result<Combination> {
        let dots: GradDots = eng.grad_dots(eng.all(&self.g1), eng.all(&self.g2))?;
        let combination = combine(dots);
        let update = cfg.update(lr, &combination);
        if let Some(out) = combined {
            let (g1, g2) = (eng.all(&self.g1), eng.all(&self.g2));
            let coefficients = (update.alpha, update.beta);
            eng.combine_grads(coefficients, g1, g2, eng.all_mut(out))?;
        }
        let buffers = SgdBuffers {
            g1: eng.all(&self.g1),
            g2: eng.all(&self.g2),
            params: eng.all_mut(&mut self.params),
            momentum: eng.all_mut(&mut self.momentum),
        };
        eng.sgd_step(&update, buffers)?;
        if self.timed {
            eng.synchronize()?;
        }
        Ok(combination)
    }
}

/// Mean over dimensions of the standard deviation across the batch of the L2-normalized
/// embeddings; `z` is `[dim, n]` (feature-major, as the engines hold it).
pub fn embedding_std(z: &[f32], dim: usize, n: usize) -> f32 {
    let rows: Vec<f32> = (0..n)
        .flat_map(|i| (0..dim).map(move |d| z[d * n + i]))
        .collect();
    (eval::spread(&rows, dim).per_dim_std / (dim as f64).sqrt()) as f32
}
