//! Gated-attention MIL: the hand-derived backward against finite differences, Adam against
//! its formula, the metrics against hand-computed cases, and learning a toy task.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use slam_ags::mil::{
    self, AbMil, Adam, AdamState, Aggregator, HeadSpec, MilBag, MilConfig, MilForward,
    MilTrainConfig, bag_metrics, bce_with_logit, metrics::auc, retrieval,
};

fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn loss(model: &AbMil, params: &[f64], x: &[f64], label: bool) -> f64 {
    bce_with_logit(model.forward(params, x).logit, label)
}

/// A head of `(d, l, a)` initialized with `init`, a random bag of `n` instances drawn with
/// `seed`, and the head's forward pass over it.
fn head_on_a_bag(
    (d, l, a): (usize, usize, usize),
    init: u64,
    (n, seed): (usize, u64),
) -> (AbMil, Vec<f64>, Vec<f64>, MilForward) {
    let model = head(d, l, a);
    let params = model.init(init);
    let x = random(n * d, seed);
    let forward = model.forward(&params, &x);
    (model, params, x, forward)
}

/// An untrained head of `d` inputs, `l` hidden units and `a` attention units.
fn head(d: usize, l: usize, a: usize) -> AbMil {
    AbMil::new(MilConfig {
        input_dim: d,
        hidden: l,
        attention: a,
    })
}

#[test]
fn backward_matches_finite_differences() {
    let model = head(5, 6, 3);
    for (seed, label) in [(1, true), (2, false), (3, true)] {
        // Larger-than-init parameters so the attention is far from uniform.
        let params: Vec<f64> = random(model.param_len(), seed)
            .iter()
            .map(|v| 1.5 * v)
            .collect();
        let x = random(7 * 5, seed + 100);
        let forward = model.forward(&params, &x);
        let mut grads = vec![0.0; params.len()];
        let l = model.backward(&params, &x, &forward, label, &mut grads);
        assert!((l - loss(&model, &params, &x, label)).abs() < 1e-12);
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        for i in 0..params.len() {
            let mut p = params.clone();
            p[i] += h;
            let up = loss(&model, &p, &x, label);
            p[i] -= 2.0 * h;
            let down = loss(&model, &p, &x, label);
            let numeric = (up - down) / (2.0 * h);
            let err = (numeric - grads[i]).abs() / (1e-4 + numeric.abs().max(grads[i].abs()));
            worst = worst.max(err);
        }
        println!("seed {seed}: max relative gradient error {worst:.2e}");
        assert!(worst < 1e-5, "seed {seed}: {worst}");
    }
}

#[test]
fn backward_accumulates() {
    let (model, params, x, forward) = head_on_a_bag((3, 4, 2), 0, (4, 5));
    let mut once = vec![0.0; params.len()];
    model.backward(&params, &x, &forward, true, &mut once);
    let mut twice = once.clone();
    model.backward(&params, &x, &forward, true, &mut twice);
    for (a, b) in once.iter().zip(&twice) {
        assert!((2.0 * a - b).abs() <= 1e-15 * a.abs().max(1.0));
    }
}

#[test]
fn prediction_ignores_instance_order_and_attention_is_a_distribution() {
    let (model, params, x, forward) = head_on_a_bag((4, 8, 4), 3, (6, 9));
    assert!((forward.attention.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let mut reversed = Vec::new();
    for row in x.chunks(4).rev() {
        reversed.extend_from_slice(row);
    }
    let back = model.forward(&params, &reversed);
    assert!((back.logit - forward.logit).abs() < 1e-12);
    let flipped: Vec<f64> = back.attention.iter().rev().copied().collect();
    for (a, b) in flipped.iter().zip(&forward.attention) {
        assert!((a - b).abs() < 1e-14);
    }
}

#[test]
fn bce_is_stable_and_correct() {
    let naive = |l: f64, y: f64| {
        -(y * (1.0 / (1.0 + (-l).exp())).ln() + (1.0 - y) * (1.0 / (1.0 + l.exp())).ln())
    };
    for l in [-5.0, -0.3, 0.0, 2.0, 7.0] {
        assert!((bce_with_logit(l, true) - naive(l, 1.0)).abs() < 1e-12);
        assert!((bce_with_logit(l, false) - naive(l, 0.0)).abs() < 1e-12);
    }
    assert!(
        (bce_with_logit(-800.0, true) - 800.0).abs() < 1e-9,
        "overflow"
    );
    assert_eq!(bce_with_logit(800.0, true), 0.0);
}

#[test]
fn adam_follows_pytorchs_formula() {
    let adam = Adam {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let mut p = vec![1.0];
    let mut state = AdamState::new(1);
    adam.step(&mut p, &[2.0], &mut state);
    // g = 2 + 0.5 = 2.5; m = 0.25, v = 0.0625; bias-corrected 2.5 and 6.25: step lr * 1.
    assert!((p[0] - 0.9).abs() < 1e-9, "{}", p[0]);
    let p1 = p[0];
    adam.step(&mut p, &[-1.0], &mut state);
    let g: f64 = -1.0 + 0.5 * p1;
    let m = 0.9 * 0.25 + 0.1 * g;
    let v = 0.99 * 0.0625 + 0.01 * g * g;
    let want = p1 - 0.1 * (m / (1.0 - 0.81)) / ((v / (1.0 - 0.9801)).sqrt() + 1e-8);
    assert!((p[0] - want).abs() < 1e-12, "{} vs {want}", p[0]);
}

#[test]
fn metrics_match_hand_computed_cases() {
    let probs = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2];
    let labels = [true, true, true, false, false, false];
    let m = bag_metrics(&probs, &labels);
    // Predicted abnormal: 0.9, 0.8, 0.6 -> tp 2, fp 1, fn 1, tn 2.
    assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
    assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
    assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
    assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
    // Pairs (pos, neg) ordered right: 0.9 and 0.8 beat all 3; 0.3 beats 0.1 and 0.2: 8 of 9.
    assert!((m.auc.unwrap() - 8.0 / 9.0).abs() < 1e-12);
    // Ties count one half.
    assert_eq!(auc(&[0.5, 0.5], &[true, false]), Some(0.5));
    assert_eq!(auc(&[0.1, 0.5, 0.5], &[false, true, false]), Some(0.75));
    assert_eq!(auc(&[0.1, 0.9], &[true, true]), None);
    let none = bag_metrics(&[0.1, 0.2], &[false, false]);
    assert_eq!((none.f1, none.accuracy), (0.0, 1.0));
}

#[test]
fn retrieval_counts_true_cells_in_the_top_k() {
    let scores = [0.1, 0.4, 0.05, 0.3, 0.15];
    let truth = [false, true, true, false, true];
    let r = retrieval(&scores, &truth, 2);
    assert_eq!((r.k, r.hits, r.positives), (2, 1, 3)); // top 2: 0.4 (cell), 0.3 (not)
    assert!((r.fraction() - 1.0 / 3.0).abs() < 1e-12);
    let all = retrieval(&scores, &truth, 400);
    assert_eq!((all.k, all.hits), (5, 3), "K is capped by the bag size");
    let tie = retrieval(&[0.2, 0.2], &[false, true], 1);
    assert_eq!(tie.hits, 0, "ties keep the earlier instance first");
}

#[test]
fn learns_a_toy_task_and_finds_the_witnesses() {
    let config = MilTrainConfig {
        adam: Adam {
            lr: 5e-3,
            ..Adam::default()
        },
        seed: 1,
        ..Aggregator::Abmil.train_defaults()
    };
    let spec = HeadSpec::Abmil {
        hidden: 16,
        attention: 8,
    };
    common::assert_learns_toy_task(&spec, &config, 0.2);
}

#[test]
fn standardizer_centers_and_scales_each_feature() {
    let bag = |features: Vec<f64>| MilBag {
        name: "b".into(),
        label: false,
        features,
        truth: None,
    };
    // Two features over four instances: (1, 5), (3, 5), (5, 5), (7, 5).
    let bags = [bag(vec![1.0, 5.0, 3.0, 5.0]), bag(vec![5.0, 5.0, 7.0, 5.0])];
    let s = mil::Standardizer::fit(&bags, 2);
    assert_eq!(s.mean, [4.0, 5.0]);
    assert!((s.std[0] - 5f64.sqrt()).abs() < 1e-12);
    assert_eq!(s.std[1], 1.0, "a constant feature keeps its scale");
    let out = s.apply(&bags[1]);
    assert!((out.features[0] - 1.0 / 5f64.sqrt()).abs() < 1e-12);
    assert_eq!(out.features[1], 0.0);
}
