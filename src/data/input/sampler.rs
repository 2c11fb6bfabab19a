//! The balanced sampler: every batch holds slide-positive patches (from abnormal bags, pool P)
//! and slide-negative patches (from normal bags, pool N) in the ratio of the pools.
//!
//! With r = |P|/|N| a batch of B splits into b_pos = round(B r/(r+1)) and b_neg =
//! round(B/(r+1)) (Python's round, half to even, as the reference computes it). Each pool is
//! shuffled once per epoch by a generator seeded with (seed, epoch, pool), so any batch can
//! be regenerated from its position alone: resuming is seeking.
//!
//! - [`SamplerMode::Disjoint`] (default): batch i of an epoch takes items i b .. (i+1) b of
//!   the pool's shuffle; an epoch has max(ceil(|P|/b_pos), ceil(|N|/b_neg)) batches so every
//!   patch is seen at least once, and the last batches of the smaller side wrap around to the
//!   start of its shuffle.
//! - [`SamplerMode::Sliding`]: the reference's overlapping windows, batch i takes items
//!   i .. i+b-1 of the shuffle; an epoch has round((|P|+|N|)/B) batches.

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SamplerMode {
    /// Consecutive batches do not overlap; every patch once (or, to fill, twice) per epoch.
    #[default]
    Disjoint,
    /// Batch i is the window i..i+b of the epoch's shuffle (the reference implementation).
    Sliding,
}

/// How a batch divides between the pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchSplit {
    pub positive: usize,
    pub negative: usize,
}

/// Where the sampler stands: the next batch it gives is batch `batch` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamplerPosition {
    pub epoch: u64,
    pub batch: u64,
}

/// One batch: store indices of its positive and negative patches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampledBatch {
    pub position: SamplerPosition,
    pub positive: Vec<u32>,
    pub negative: Vec<u32>,
}

/// Python's `round` on a non-negative float: ties go to the even integer.
fn round_half_even(x: f64) -> usize {
    let floor = x.floor();
    let rounded = match x - floor {
        d if d > 0.5 => floor + 1.0,
        d if d < 0.5 => floor,
        _ if floor % 2.0 == 0.0 => floor,
        _ => floor + 1.0,
    };
    rounded as usize
}

/// Splits a batch of `batch` patches by the pool sizes, as the reference does. Each side needs
/// at least two patches: batch norm in training mode needs two samples per pass.
pub fn split_batch(batch: usize, positives: usize, negatives: usize) -> Result<BatchSplit> {
    ensure!(
        positives > 0 && negatives > 0,
        "pretraining needs patches from both abnormal and normal bags; the store has {positives} \
         patches in abnormal bags and {negatives} in normal bags"
    );
    let r = positives as f64 / negatives as f64;
    let split = BatchSplit {
        positive: round_half_even(batch as f64 * r / (r + 1.0)),
        negative: round_half_even(batch as f64 / (r + 1.0)),
    };
    ensure!(
        split.positive >= 2 && split.negative >= 2,
        "a batch of {batch} splits into {} positive and {} negative patches (pools of {positives} \
         and {negatives}); each side needs at least 2: use a larger batch",
        split.positive,
        split.negative
    );
    ensure!(
        split.positive <= positives && split.negative <= negatives,
        "a batch of {batch} needs {} positive and {} negative patches, more than the pools hold \
         ({positives} and {negatives}): use a smaller batch",
        split.positive,
        split.negative
    );
    Ok(split)
}

/// The sampler; see the module documentation.
pub struct BalancedSampler {
    pools: [Vec<u32>; 2],
    split: BatchSplit,
    mode: SamplerMode,
    seed: u64,
    batches_per_epoch: u64,
    position: SamplerPosition,
    /// The current epoch's shuffles of both pools.
    shuffled: Option<(u64, [Vec<u32>; 2])>,
}

impl BalancedSampler {
    /// A sampler over the pools `positive` (P) and `negative` (N) of store indices, starting at
    /// epoch 0, batch 0.
    pub fn new(
        positive: Vec<u32>,
        negative: Vec<u32>,
        batch: usize,
        mode: SamplerMode,
        seed: u64,
    ) -> Result<Self> {
        let split = split_batch(batch, positive.len(), negative.len())?;
        let batches_per_epoch = match mode {
            SamplerMode::Disjoint => positive
                .len()
                .div_ceil(split.positive)
                .max(negative.len().div_ceil(split.negative)),
            SamplerMode::Sliding => {
                round_half_even((positive.len() + negative.len()) as f64 / batch as f64).max(1)
            }
        } as u64;
        Ok(Self {
            pools: [positive, negative],
            split,
            mode,
            seed,
            batches_per_epoch,
            position: SamplerPosition::default(),
            shuffled: None,
        })
    }

    pub fn split(&self) -> BatchSplit {
        self.split
    }

    pub fn mode(&self) -> SamplerMode {
        self.mode
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// The position of the next batch.
    pub fn position(&self) -> SamplerPosition {
        self.position
    }

    /// Continues from `position` (a position saved from [`BalancedSampler::position`]).
    pub fn seek(&mut self, position: SamplerPosition) -> Result<()> {
        ensure!(
            position.batch < self.batches_per_epoch,
            "sampler position batch {} is past the {} batches of an epoch: the data or batch size \
             differs from the run being resumed",
            position.batch,
            self.batches_per_epoch
        );
        self.position = position;
        Ok(())
    }

    /// The batch at the current position; advances to the next.
    pub fn next_batch(&mut self) -> SampledBatch {
        let (position, mode, split) = (self.position, self.mode, self.split);
        let [positive, negative] = self.shuffled(position.epoch);
        let window = |shuffle: &[u32], size: usize| -> Vec<u32> {
            let start = match mode {
                SamplerMode::Disjoint => position.batch as usize * size,
                SamplerMode::Sliding => position.batch as usize,
            };
            (start..start + size)
                .map(|i| shuffle[i % shuffle.len()])
                .collect()
        };
        let batch = SampledBatch {
            position,
            positive: window(positive, split.positive),
            negative: window(negative, split.negative),
        };
        self.position.batch += 1;
        if self.position.batch == self.batches_per_epoch {
            self.position = SamplerPosition {
                epoch: position.epoch + 1,
                batch: 0,
            };
        }
        batch
    }

    fn shuffled(&mut self, epoch: u64) -> &[Vec<u32>; 2] {
        if self.shuffled.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let pools = std::array::from_fn(|pool| {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(epoch * 2 + pool as u64);
                let mut shuffle = self.pools[pool].clone();
                shuffle.shuffle(&mut rng);
                shuffle
            });
            self.shuffled = Some((epoch, pools));
        }
        &self.shuffled.as_ref().expect("just filled").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even_like_python() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (2.4999, 2),
            (2.5001, 3),
            (3.0, 3),
        ];
        for (x, want) in cases {
            assert_eq!(round_half_even(x), want, "round({x})");
        }
    }
}
