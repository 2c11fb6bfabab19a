//! From sampled patch indices to the four float views of a training step.
//!
//! Every random choice of a view comes from the counter-based generator keyed by
//! (seed, step, slot, view), so a step's batch depends only on its sampler position and
//! step number: a resumed run sees exactly the images an uninterrupted one would, and a
//! GPU kernel drawing from the same key renders the same views.

use anyhow::{Result, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
use super::rng::ViewKey;
use super::sampler::SampledBatch;
use crate::data::store::PatchStore;

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
}

/// Renders batches from one store with one augmentation setting.
pub struct Augmenter {
    pub config: AugmentConfig,
    pub seed: u64,
}

/// Which views a step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Views {
    /// Two contrastive views of the positives; a center crop and a contrastive view of the
    /// negatives (SLAM).
    Slam,
    /// Two contrastive views of every patch, all treated as positives (SimCLR).
    ContrastiveOnly,
}

impl Augmenter {
    pub fn new(config: AugmentConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    /// The render jobs of the four views (pos_i, pos_j, neg_i, neg_j) of `batch` at `step`.
    /// Slots number the patches of the batch, positives first.
    pub fn jobs(
        &self,
        store: &PatchStore,
        batch: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<[Vec<ViewJob>; 4]> {
        let size = store.patch_size();
        let contrastive = |patch: u32, slot: usize, view: u32| -> Result<ViewJob> {
            let key = ViewKey {
                seed: self.seed,
                step,
                slot: slot as u32,
                view,
            };
            Ok(ViewJob {
                patch,
                params: ViewParams::contrastive(&self.config, size, key)?,
            })
        };
        let (positives, negatives): (Vec<u32>, &[u32]) = match views {
            Views::Slam => (batch.positive.clone(), &batch.negative),
            Views::ContrastiveOnly => ([batch.positive.as_slice(), &batch.negative].concat(), &[]),
        };
        let n_pos = positives.len();
        let pair = |view: u32| -> Result<Vec<ViewJob>> {
            positives
                .iter()
                .enumerate()
                .map(|(slot, &p)| contrastive(p, slot, view))
                .collect()
        };
        let center = ViewParams::center(&self.config, size)?;
        let center = negatives
            .iter()
            .map(|&patch| ViewJob {
                patch,
                params: center,
            })
            .collect();
        let negative_view = negatives
            .iter()
            .enumerate()
            .map(|(i, &p)| contrastive(p, n_pos + i, 1))
            .collect::<Result<_>>()?;
        Ok([pair(0)?, pair(1)?, center, negative_view])
    }

    /// Renders the step's four views (NCHW, normalized) from the store.
    pub fn render(
        &self,
        store: &PatchStore,
        batch: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<HostBatch> {
        self.config.validate(store.patch_size())?;
        let jobs = self.jobs(store, batch, step, views)?;
        let crop = self.config.crop;
        let image = 3 * crop * crop;
        let [pos_i, pos_j, neg_i, neg_j] = jobs.map(|jobs| -> Result<Vec<f32>> {
            let mut out = vec![0.0; jobs.len() * image];
            render_batch(
                store.pixels(),
                store.patch_size(),
                &jobs,
                &self.config,
                &mut out,
            )?;
            Ok(out)
        });
        let (pos_i, pos_j, neg_i, neg_j) = (pos_i?, pos_j?, neg_i?, neg_j?);
        Ok(HostBatch {
            n_pos: pos_i.len() / image,
            n_neg: neg_i.len() / image,
            pos_i,
            pos_j,
            neg_i,
            neg_j,
            crop,
        })
    }
}
