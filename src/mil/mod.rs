//! Downstream evaluation: multiple-instance learning heads on embedded bags (gated
//! attention, ABMIL, and the reference's prototype-based PAMIL), their training with Adam,
//! and the bag and retrieval metrics the paper reports. Pure CPU, f64.

pub mod abmil;
pub mod adam;
pub mod head;
pub mod kmeans;
pub mod layers;
pub mod metrics;
pub mod pamil;
pub mod report;
pub mod train;

use crate::embed::Embeddings;

pub use abmil::{AbMil, MilConfig, MilForward, bce_with_logit};
pub use adam::{Adam, AdamState};
pub use head::{Aggregator, HeadSpec, MilHead, MilModel, PamilStart, TrainedHead};
pub use metrics::{BagMetrics, Retrieval, bag_metrics, retrieval};
pub use pamil::{Pamil, PamilConfig, PamilLosses, PamilSettings, ProtoInit};
pub use train::{BagObjective, EpochLog, MilTrainConfig, Selection, Trained, train};

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

    /// The bags of an embeddings file (f64 features; instance truth when known for every
    /// patch).
    pub fn from_embeddings(e: &Embeddings) -> Vec<MilBag> {
        e.bags
            .iter()
            .map(|bag| MilBag {
                name: bag.name.clone(),
                label: bag.label.is_abnormal(),
                features: e.features[bag.patches.start * e.dim..bag.patches.end * e.dim]
                    .iter()
                    .map(|&v| v as f64)
                    .collect(),
                truth: e.instances[bag.patches.clone()].iter().copied().collect(),
            })
            .collect()
    }
}

/// Per-dimension standardization of the instance features, fitted on the training
/// instances: embeddings from different pretraining runs differ in offset and scale by
/// orders of magnitude, which the head's fixed initialization and learning rate do not.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Standardizer {
    /// Mean and standard deviation of every feature over all instances of `bags`
    /// (a constant feature gets std 1).
    pub fn fit(bags: &[MilBag], dim: usize) -> Self {
        Self::fit_rows(bags.iter().flat_map(|b| b.features.chunks_exact(dim)), dim)
    }

    /// Mean and standard deviation of every feature over `rows` of `dim` values.
    pub fn fit_rows<'a>(rows: impl Iterator<Item = &'a [f64]> + Clone, dim: usize) -> Self {
        let rows = || rows.clone();
        let n = rows().count().max(1) as f64;
        let mut mean = vec![0.0; dim];
        for row in rows() {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / n);
        }
        let mut var = vec![0.0; dim];
        for row in rows() {
            for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (v - m) * (v - m) / n;
            }
        }
        let std = var
            .into_iter()
            .map(|v: f64| if v.sqrt() > 1e-12 { v.sqrt() } else { 1.0 })
            .collect();
        Self { mean, std }
    }

    pub fn apply(&self, bag: &MilBag) -> MilBag {
        let dim = self.mean.len();
        let mut features = bag.features.clone();
        for row in features.chunks_exact_mut(dim) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *v = (*v - m) / s;
            }
        }
        MilBag {
            features,
            ..bag.clone()
        }
    }
}

/// A bag's prediction and where its attention went.
#[derive(Clone, Debug)]
pub struct BagPrediction {
    pub probability: f64,
    /// Softmax attention per instance (sums to one).
    pub attention: Vec<f64>,
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
