//! Training a MIL head, whichever it is: one Adam step per bag, bags in a seeded shuffle each
//! epoch, the epoch kept by the chosen rule, and optionally the head's leading tensors frozen
//! for the first epochs (the reference's curriculum).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{Adam, AdamState, MilBag};

/// A head as the trainer sees it: the loss of one bag and its gradient.
pub trait BagObjective {
    fn param_len(&self) -> usize;

    /// Adds the gradient of `bag`'s training loss to `grads`; returns the loss and whether
    /// the head predicts the bag abnormal.
    fn bag_step(&self, params: &[f64], bag: &MilBag, grads: &mut [f64]) -> (f64, bool);

    /// How many leading parameters a curriculum freezes.
    fn freezable(&self) -> usize;
}

/// Which epoch's parameters training keeps.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The last epoch whose training accuracy equals or beats every earlier one's (the
    /// reference's model selection).
    Best,
    /// The last epoch.
    Last,
}

/// How to train a MIL head.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MilTrainConfig {
    pub epochs: usize,
    pub adam: Adam,
    pub seed: u64,
    pub select: Selection,
    /// Epochs during which the head's freezable tensors stay as they start (they get no Adam
    /// steps, so their Adam step count starts when they thaw, as PyTorch's does).
    pub freeze_epochs: usize,
}

/// Mean loss and training accuracy of one epoch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
}

/// What training returns: the kept parameters and the last epoch's.
#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    pub selected: Vec<f64>,
    /// The kept epoch (0-based) and its training accuracy.
    pub selected_epoch: usize,
    pub selected_accuracy: f64,
    pub last: Vec<f64>,
}

/// Trains from `params`, calling `on_epoch` after each epoch.
pub fn train(
    objective: &impl BagObjective,
    mut params: Vec<f64>,
    bags: &[MilBag],
    config: &MilTrainConfig,
    mut on_epoch: impl FnMut(&EpochLog),
) -> Trained {
    assert_eq!(params.len(), objective.param_len());
    assert!(config.epochs >= 1 && !bags.is_empty());
    let split = if config.freeze_epochs > 0 {
        objective.freezable()
    } else {
        0
    };
    let mut frozen_state = AdamState::new(split);
    let mut state = AdamState::new(params.len() - split);
    let mut grads = vec![0.0; params.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..bags.len()).collect();
    let mut best: Option<(usize, usize)> = None;
    let mut selected = params.clone();
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        let (mut loss, mut correct) = (0.0, 0);
        for &i in &order {
            let bag = &bags[i];
            grads.fill(0.0);
            let (bag_loss, abnormal) = objective.bag_step(&params, bag, &mut grads);
            loss += bag_loss;
            correct += (abnormal == bag.label) as usize;
            let (head, tail) = params.split_at_mut(split);
            if epoch >= config.freeze_epochs {
                config.adam.step(head, &grads[..split], &mut frozen_state);
            }
            config.adam.step(tail, &grads[split..], &mut state);
        }
        let keep = match config.select {
            Selection::Best => best.is_none_or(|(_, c)| correct >= c),
            Selection::Last => true,
        };
        if keep {
            best = Some((epoch, correct));
            selected.copy_from_slice(&params);
        }
        on_epoch(&EpochLog {
            epoch,
            loss: loss / bags.len() as f64,
            accuracy: correct as f64 / bags.len() as f64,
        });
    }
    let (selected_epoch, correct) = best.expect("at least one epoch");
    Trained {
        selected,
        selected_epoch,
        selected_accuracy: correct as f64 / bags.len() as f64,
        last: params,
    }
}
