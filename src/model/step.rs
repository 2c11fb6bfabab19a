//! One SLAM-AGS training step: four forward passes, the two task losses, one backward per
//! task into its own flat gradient, gradient surgery, and the fused SGD update.

use std::time::Instant;

use anyhow::{Result, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;

use super::network::Network;
use super::optim::Sgd;
use super::state::ModelState;
use super::surgery::{Combination, Surgery};
use crate::engine::{Engine, GradDots, LossViews, SgdBuffers, ViewPair, nchw_to_cnhw};

/// The four views of one step on the host, each `[n, 3, crop, crop]` as PyTorch holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub pos_i: Vec<f32>,
    pub pos_j: Vec<f32>,
    pub neg_i: Vec<f32>,
    pub neg_j: Vec<f32>,
    pub n_pos: usize,
    pub n_neg: usize,
    pub crop: usize,
}

impl HostBatch {
    /// The views as `(name, images, data)`, in the order of the step's forward passes.
    pub fn views(&self) -> [(&'static str, usize, &[f32]); 4] {
        [
            ("pos_i", self.n_pos, &self.pos_i),
            ("pos_j", self.n_pos, &self.pos_j),
            ("neg_i", self.n_neg, &self.neg_i),
            ("neg_j", self.n_neg, &self.neg_j),
        ]
    }

    /// Standard-normal views (what normalized images look like), the same for the same seed.
    pub fn random(n_pos: usize, n_neg: usize, crop: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n * 3 * crop * crop)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        };
        Self {
            pos_i: draw(n_pos),
            pos_j: draw(n_pos),
            neg_i: draw(n_neg),
            neg_j: draw(n_neg),
            n_pos,
            n_neg,
            crop,
        }
    }

    /// Checks sizes: every pass needs two images or more for batch norm. A batch without
    /// negatives (`n_neg == 0`) trains the contrastive task alone (the SimCLR ablation).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.crop > 0, "crop must be at least 1 pixel");
        for (name, n, data) in self.views() {
            ensure!(
                n >= 2 || (n == 0 && name.starts_with("neg")),
                "{name}: batch norm in training mode needs at least 2 images, got {n}"
            );
            ensure!(
                data.len() == n * 3 * self.crop * self.crop,
                "{name}: {} values do not make {n} images of 3 x {c} x {c}",
                data.len(),
                c = self.crop
            );
        }
        Ok(())
    }

    /// The batch on `eng`, reordered to the engines' channel-major layout.
    pub fn upload<E: Engine>(&self, eng: &E) -> Result<StepBatch<E>> {
        self.validate()?;
        let plane = self.crop * self.crop;
        let up = |n: usize, data: &[f32]| eng.upload(&nchw_to_cnhw(data, n, 3, plane));
        Ok(StepBatch {
            pos_i: up(self.n_pos, &self.pos_i)?,
            pos_j: up(self.n_pos, &self.pos_j)?,
            neg_i: up(self.n_neg, &self.neg_i)?,
            neg_j: up(self.n_neg, &self.neg_j)?,
            n_pos: self.n_pos,
            n_neg: self.n_neg,
            crop: self.crop,
        })
    }
}

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

/// Hyper-parameters of a step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepConfig {
    pub surgery: Surgery,
    pub sgd: Sgd,
    pub temperature: f32,
}

impl Default for StepConfig {
    fn default() -> Self {
        Self {
            surgery: Surgery::Ags,
            sgd: Sgd::default(),
            temperature: 0.07,
        }
    }
}

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepReport {
    pub loss_contrastive: f32,
    pub loss_cohesion: f32,
    pub lr: f64,
    pub combination: Combination,
    /// Mean over the dimensions of z of the standard deviation across the batch of the
    /// L2-normalized embeddings of the first positive view: about 1/sqrt(dim) for spread-out
    /// embeddings, near zero when they collapse to one point.
    pub embedding_std: f32,
    /// Host wall time of the four passes with both losses and backward passes.
    #[serde(skip)]
    pub seconds_tasks: f64,
    /// Host wall time of the surgery reduction and the fused update.
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
        let mut dz_i = eng.zeros(pair.dim * pair.n)?;
        let mut dz_j = eng.zeros(pair.dim * pair.n)?;
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
        ensure!(
            cfg.temperature.is_finite() && cfg.temperature > 0.0,
            "temperature must be positive, got {}",
            cfg.temperature
        );
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
        let seconds_tasks = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let dots: GradDots = eng.grad_dots(eng.all(&self.g1), eng.all(&self.g2))?;
        let combination = cfg.surgery.combine(dots);
        let update = cfg.sgd.update(lr, &combination);
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
        Ok(StepReport {
            loss_contrastive,
            loss_cohesion,
            lr,
            combination,
            embedding_std,
            seconds_tasks,
            seconds_update: start.elapsed().as_secs_f64(),
        })
    }
}

/// Mean over dimensions of the standard deviation across the batch of the L2-normalized
/// embeddings; `z` is `[dim, n]` (feature-major, as the engines hold it).
pub fn embedding_std(z: &[f32], dim: usize, n: usize) -> f32 {
    let inv_norms: Vec<f64> = (0..n)
        .map(|i| {
            let sq: f64 = (0..dim).map(|d| (z[d * n + i] as f64).powi(2)).sum();
            1.0 / sq.sqrt().max(1e-12)
        })
        .collect();
    let total: f64 = z
        .chunks_exact(n)
        .map(|row| {
            let f: Vec<f64> = row
                .iter()
                .zip(&inv_norms)
                .map(|(&v, s)| v as f64 * s)
                .collect();
            let mean = f.iter().sum::<f64>() / n as f64;
            (f.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt()
        })
        .sum();
    (total / dim as f64) as f32
}
