//! Downstream evaluation: gated-attention multiple-instance learning on embedded bags, its
//! training with Adam, and the bag and retrieval metrics the paper reports. Pure CPU, f64.

pub mod adam;
pub mod metrics;
pub mod model;
pub mod report;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub use adam::{Adam, AdamState};
pub use metrics::{BagMetrics, Retrieval, bag_metrics, retrieval};
pub use model::{AbMil, MilConfig, MilForward, bce_with_logit};

/// One embedded bag.
#[derive(Clone, Debug)]
pub struct MilBag {
    pub name: String,
    /// True for an abnormal bag.
    pub label: bool,
    /// n x D instance features, row-major.
    pub features: Vec<f64>,
    /// Per-instance truth (true: abnormal cell) when known.
    pub truth: Option<Vec<bool>>,
}

impl MilBag {
    pub fn len(&self, dim: usize) -> usize {
        self.features.len() / dim
    }
}

/// How to train the MIL head.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MilTrainConfig {
    pub epochs: usize,
    pub adam: Adam,
    pub seed: u64,
}

/// Mean loss and training accuracy of one epoch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
}

/// Trains from a seeded initialization, one Adam step per bag, bags in a seeded shuffle each
/// epoch; calls `on_epoch` after each epoch. Returns the parameters.
pub fn train(
    model: &AbMil,
    bags: &[MilBag],
    config: &MilTrainConfig,
    mut on_epoch: impl FnMut(&EpochLog),
) -> Vec<f64> {
    let mut params = model.init(config.seed);
    let mut state = AdamState::new(params.len());
    let mut grads = vec![0.0; params.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..bags.len()).collect();
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        let (mut loss, mut correct) = (0.0, 0);
        for &i in &order {
            let bag = &bags[i];
            let forward = model.forward(&params, &bag.features);
            correct += ((forward.probability() >= 0.5) == bag.label) as usize;
            grads.fill(0.0);
            loss += model.backward(&params, &bag.features, &forward, bag.label, &mut grads);
            config.adam.step(&mut params, &grads, &mut state);
        }
        on_epoch(&EpochLog {
            epoch,
            loss: loss / bags.len() as f64,
            accuracy: correct as f64 / bags.len() as f64,
        });
    }
    params
}

/// A bag's prediction and where its attention went.
#[derive(Clone, Debug)]
pub struct BagPrediction {
    pub probability: f64,
    /// Softmax attention per instance (sums to one).
    pub attention: Vec<f64>,
}

pub fn predict(model: &AbMil, params: &[f64], bag: &MilBag) -> BagPrediction {
    let forward = model.forward(params, &bag.features);
    BagPrediction {
        probability: forward.probability(),
        attention: forward.attention,
    }
}

/// Bag metrics and, where instance truth is known, retrieval over the abnormal bags.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Evaluation {
    pub metrics: BagMetrics,
    /// The requested K.
    pub k: usize,
    /// Per abnormal bag with instance truth: (bag name, retrieval).
    pub retrieval: Vec<(String, Retrieval)>,
}

impl Evaluation {
    /// Mean hits in the top K over the abnormal bags with truth.
    pub fn mean_hits(&self) -> Option<f64> {
        self.mean(|r| r.hits as f64)
    }

    /// Mean share of each bag's abnormal cells found in its top K.
    pub fn mean_fraction(&self) -> Option<f64> {
        self.mean(Retrieval::fraction)
    }

    fn mean(&self, f: impl Fn(&Retrieval) -> f64) -> Option<f64> {
        let n = self.retrieval.len();
        (n > 0).then(|| self.retrieval.iter().map(|(_, r)| f(r)).sum::<f64>() / n as f64)
    }
}

pub fn evaluate(bags: &[MilBag], predictions: &[BagPrediction], k: usize) -> Evaluation {
    let probabilities: Vec<f64> = predictions.iter().map(|p| p.probability).collect();
    let labels: Vec<bool> = bags.iter().map(|b| b.label).collect();
    let retrieval = bags
        .iter()
        .zip(predictions)
        .filter(|(bag, _)| bag.label)
        .filter_map(|(bag, p)| {
            let truth = bag.truth.as_ref()?;
            Some((bag.name.clone(), metrics::retrieval(&p.attention, truth, k)))
        })
        .collect();
    Evaluation {
        metrics: bag_metrics(&probabilities, &labels),
        k,
        retrieval,
    }
}
