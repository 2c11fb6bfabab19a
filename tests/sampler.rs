//! The balanced sampler: batch split, coverage per epoch, determinism and resume.

use std::collections::HashMap;

use slam_ags::data::input::sampler::{
    BalancedSampler, BatchSplit, SamplerMode, SamplerPosition, split_batch,
};

fn pools(positives: u32, negatives: u32) -> (Vec<u32>, Vec<u32>) {
    // Store indices as a store lays them out: the pools interleave, bag by bag.
    let positive = (0..positives).map(|i| 2 * i).collect();
    let negative = (0..negatives).map(|i| 2 * i + 1).collect();
    (positive, negative)
}

fn sampler(positives: u32, negatives: u32, batch: usize, mode: SamplerMode) -> BalancedSampler {
    let (p, n) = pools(positives, negatives);
    BalancedSampler::new(p, n, batch, mode, 42).unwrap()
}

#[test]
fn batch_splits_by_pool_ratio_with_pythons_rounding() {
    let split = |b, p, n| split_batch(b, p, n).unwrap();
    let s = |positive, negative| BatchSplit { positive, negative };
    assert_eq!(split(256, 1000, 3000), s(64, 192));
    assert_eq!(split(256, 5000, 5000), s(128, 128));
    assert_eq!(split(256, 700, 300), s(179, 77)); // 179.2 and 76.8
    // 2.5 and 2.5 both round to 2, as Python's round does: the reference's batch is then 4.
    assert_eq!(split(5, 100, 100), s(2, 2));
    assert_eq!(split(7, 100, 100), s(4, 4));
}

#[test]
fn impossible_splits_are_refused_with_the_numbers() {
    let err = split_batch(8, 10, 1000).unwrap_err().to_string();
    assert!(err.contains("0 positive and 8 negative"), "{err}");
    let err = split_batch(64, 0, 100).unwrap_err().to_string();
    assert!(err.contains("0 patches in abnormal bags"), "{err}");
    let err = split_batch(64, 10, 10).unwrap_err().to_string();
    assert!(err.contains("more than the pools hold"), "{err}");
}

#[test]
fn disjoint_epoch_covers_every_patch_and_keeps_pools_apart() {
    let mut s = sampler(70, 230, 32, SamplerMode::Disjoint);
    let split = s.split();
    assert_eq!((split.positive, split.negative), (7, 25));
    assert_eq!(s.batches_per_epoch(), 10); // max(ceil(70/7), ceil(230/25))
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for i in 0..s.batches_per_epoch() {
        let batch = s.next_batch();
        assert_eq!(batch.position, SamplerPosition { epoch: 0, batch: i });
        assert!(batch.positive.iter().all(|i| i % 2 == 0), "a negative in P");
        assert!(batch.negative.iter().all(|i| i % 2 == 1), "a positive in N");
        let mut distinct = batch.positive.clone();
        distinct.extend(&batch.negative);
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 32, "a patch twice in one batch");
        for index in batch.positive.into_iter().chain(batch.negative) {
            *seen.entry(index).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 300, "every patch once per epoch");
    // 7 x 10 = 70 positives exactly; 25 x 10 = 250 negatives: 20 of them twice.
    assert_eq!(seen.values().filter(|&&c| c == 2).count(), 20);
    assert!(seen.values().all(|&c| c <= 2));
    assert_eq!(s.position(), SamplerPosition { epoch: 1, batch: 0 });
}

#[test]
fn sliding_windows_overlap_like_the_reference() {
    let mut s = sampler(100, 100, 20, SamplerMode::Sliding);
    assert_eq!(s.batches_per_epoch(), 10); // round(200 / 20)
    let first = s.next_batch();
    let second = s.next_batch();
    assert_eq!(first.positive[1..], second.positive[..9]);
    assert_eq!(first.negative[1..], second.negative[..9]);
}

#[test]
fn seeded_and_different_every_epoch() {
    let take = |seed, batches| {
        let (p, n) = pools(50, 50);
        let mut s = BalancedSampler::new(p, n, 10, SamplerMode::Disjoint, seed).unwrap();
        (0..batches).map(|_| s.next_batch()).collect::<Vec<_>>()
    };
    assert_eq!(take(1, 12), take(1, 12));
    assert_ne!(take(1, 12), take(2, 12));
    let run = take(1, 20);
    assert_ne!(run[0].positive, run[10].positive, "epoch 1 reshuffles");
}

#[test]
fn resuming_from_a_saved_position_continues_exactly() {
    let mut straight = sampler(90, 60, 16, SamplerMode::Disjoint);
    let expected: Vec<_> = (0..40).map(|_| straight.next_batch()).collect();

    let mut first = sampler(90, 60, 16, SamplerMode::Disjoint);
    let mut got: Vec<_> = (0..17).map(|_| first.next_batch()).collect();
    let saved = first.position();
    let mut resumed = sampler(90, 60, 16, SamplerMode::Disjoint);
    resumed.seek(saved).unwrap();
    got.extend((17..40).map(|_| resumed.next_batch()));
    assert_eq!(got, expected);
}

#[test]
fn seeking_past_an_epoch_is_refused() {
    let mut s = sampler(90, 60, 16, SamplerMode::Disjoint);
    let err = s
        .seek(SamplerPosition {
            epoch: 0,
            batch: 99,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the 10 batches"), "{err}");
}
