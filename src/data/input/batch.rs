//! From sampled patch indices to the four float views of a training step.
//!
//! Every random choice of a view comes from the counter-based generator keyed by
//! (seed, step, slot, view), so a step's batch depends only on its sampler position and
//! step number: a resumed run sees exactly the images an uninterrupted one would, and a
//! GPU kernel drawing from the same key renders the same views.

use anyhow::Result;

use super::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
use super::rng::ViewKey;
use super::sampler::SampledBatch;
use crate::data::store::PatchStore;
use crate::model::HostBatch;

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
