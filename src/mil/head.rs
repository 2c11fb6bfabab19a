//! The two heads behind one type: which to train ([`HeadSpec`]), a trained head
//! ([`MilHead`]) and its predictions, whichever the head.

use anyhow::{Result, ensure};

use super::abmil::{AbMil, MilConfig};
use super::kmeans::kmeans;
use super::layers::ParamTensor;
use super::pamil::{Pamil, PamilConfig, PamilLosses, PamilSettings, ProtoInit};
use super::train::{BagObjective, EpochLog, MilTrainConfig, Selection, Trained, train};
use super::{Adam, BagPrediction, MilBag, Standardizer};

/// The MIL heads.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Aggregator {
    /// Gated-attention MIL (Ilse et al. 2018) on standardized features.
    Abmil,
    /// The reference's prototype-based attention MIL, on the features as they are.
    Pamil,
}

impl Aggregator {
    pub fn name(self) -> &'static str {
        match self {
            Self::Abmil => "ABMIL",
            Self::Pamil => "PAMIL",
        }
    }

    /// Each head's own training settings: ABMIL with Ilse et al.'s Adam (lr 5e-4, weight
    /// decay 1e-4) for 40 epochs, keeping the last; PAMIL as the reference trains it (Adam
    /// lr 1e-3 without weight decay, 100 epochs, the best training accuracy kept).
    pub fn train_defaults(self) -> MilTrainConfig {
        match self {
            Self::Abmil => MilTrainConfig {
                epochs: 40,
                adam: Adam::default(),
                seed: 0,
                select: Selection::Last,
                freeze_epochs: 0,
            },
            Self::Pamil => MilTrainConfig {
                epochs: 100,
                adam: Adam {
                    lr: 1e-3,
                    weight_decay: 0.0,
                    ..Adam::default()
                },
                seed: 0,
                select: Selection::Best,
                freeze_epochs: 0,
            },
        }
    }

    /// Each head's default (hidden, attention) sizes: the reference's "small" for PAMIL.
    pub fn default_sizes(self) -> (usize, usize) {
        match self {
            Self::Abmil => (128, 64),
            Self::Pamil => (512, 256),
        }
    }
}

/// A head's network, with what it needs besides its parameters.
#[derive(Clone, Debug)]
pub enum MilModel {
    /// ABMIL and the standardization of its inputs.
    Abmil {
        model: AbMil,
        standardizer: Standardizer,
    },
    Pamil(Box<Pamil>),
}

/// A trained head.
#[derive(Clone, Debug)]
pub struct MilHead {
    pub model: MilModel,
    pub params: Vec<f64>,
}

impl MilHead {
    pub fn aggregator(&self) -> Aggregator {
        match self.model {
            MilModel::Abmil { .. } => Aggregator::Abmil,
            MilModel::Pamil(_) => Aggregator::Pamil,
        }
    }

    /// The feature size the head takes.
    pub fn input_dim(&self) -> usize {
        match &self.model {
            MilModel::Abmil { model, .. } => model.config.input_dim,
            MilModel::Pamil(model) => model.config.input_dim,
        }
    }

    /// Its parameter tensors, named as saved.
    pub fn tensors(&self) -> Vec<ParamTensor> {
        match &self.model {
            MilModel::Abmil { model, .. } => model.layout.tensors(model.config),
            MilModel::Pamil(model) => model.layout.tensors.clone(),
        }
    }

    /// The bag's probability of being abnormal, and the attention of each instance (for
    /// PAMIL the abnormal class's).
    pub fn predict(&self, bag: &MilBag) -> BagPrediction {
        match &self.model {
            MilModel::Abmil {
                model,
                standardizer,
            } => {
                let forward = model.forward(&self.params, &standardizer.apply(bag).features);
                BagPrediction {
                    probability: forward.probability(),
                    attention: forward.attention,
                }
            }
            MilModel::Pamil(model) => {
                let forward = model.forward(&self.params, &bag.features);
                BagPrediction {
                    probability: forward.probabilities()[1],
                    attention: forward.abnormal_attention().to_vec(),
                }
            }
        }
    }
}

/// Where PAMIL's parameters start.
#[derive(Clone, Debug)]
pub enum PamilStart {
    /// The reference's initialization, the prototypes drawn as said.
    Fresh(ProtoInit),
    /// A head trained before (the curriculum): every tensor it shares by name with the new
    /// head is copied (as `load_state_dict(strict=False)`); the others start fresh.
    Head(Box<Pamil>, Vec<f64>),
}

/// Which head to train.
#[derive(Clone, Debug)]
pub enum HeadSpec {
    Abmil {
        hidden: usize,
        attention: usize,
    },
    Pamil {
        config: PamilConfig,
        losses: PamilLosses,
        start: PamilStart,
    },
}

/// A trained head: the kept epoch's and the last epoch's.
#[derive(Clone, Debug)]
pub struct TrainedHead {
    pub selected: MilHead,
    /// The kept epoch (0-based) and its training accuracy.
    pub selected_epoch: usize,
    pub selected_accuracy: f64,
    pub last: MilHead,
}

impl BagObjective for AbMil {
    fn param_len(&self) -> usize {
        AbMil::param_len(self)
    }

    fn bag_step(&self, params: &[f64], bag: &MilBag, grads: &mut [f64]) -> (f64, bool) {
        let forward = self.forward(params, &bag.features);
        let loss = self.backward(params, &bag.features, &forward, bag.label, grads);
        (loss, forward.probability() >= 0.5)
    }

    fn freezable(&self) -> usize {
        0
    }
}

/// PAMIL with its training losses.
struct PamilObjective<'a> {
    model: &'a Pamil,
    losses: &'a PamilLosses,
}

impl BagObjective for PamilObjective<'_> {
    fn param_len(&self) -> usize {
        self.model.param_len()
    }

    fn bag_step(&self, params: &[f64], bag: &MilBag, grads: &mut [f64]) -> (f64, bool) {
        let forward = self.model.forward(params, &bag.features);
        let losses = self.model.backward(
            params,
            &bag.features,
            &forward,
            bag.label,
            self.losses,
            grads,
        );
        (losses.total, forward.predicts_abnormal())
    }

    fn freezable(&self) -> usize {
        self.model.layout.frozen
    }
}

impl HeadSpec {
    /// PAMIL over `dim` features as the reference builds it by default: the "small" size,
    /// `PamilSettings`' defaults, prototypes drawn from N(0, 1).
    pub fn pamil_defaults(dim: usize) -> Self {
        let (hidden, attention) = Aggregator::Pamil.default_sizes();
        let settings = PamilSettings::default();
        Self::Pamil {
            config: settings.config(dim, hidden, attention),
            losses: settings.losses,
            start: PamilStart::Fresh(settings.proto_init),
        }
    }

    /// Checks that a curriculum's starting head fits a head over `dim` features.
    pub fn check(&self, dim: usize) -> Result<()> {
        if let Self::Pamil {
            config,
            start: PamilStart::Head(from, _),
            ..
        } = self
        {
            let sizes = |c: &PamilConfig, dim| (dim, c.hidden, c.attention, c.prototypes);
            let (have, want) = (
                sizes(&from.config, from.config.input_dim),
                sizes(config, dim),
            );
            ensure!(
                have == want,
                "the starting head has {} features, hidden {}, attention {} and {} prototypes; \
                 this head has {}, {}, {} and {}",
                have.0,
                have.1,
                have.2,
                have.3,
                want.0,
                want.1,
                want.2,
                want.3
            );
        }
        Ok(())
    }

    /// Trains this head on `bags` of `dim` features.
    pub fn train(
        &self,
        bags: &[MilBag],
        dim: usize,
        config: &MilTrainConfig,
        on_epoch: impl FnMut(&EpochLog),
    ) -> Result<TrainedHead> {
        self.check(dim)?;
        ensure!(!bags.is_empty(), "no bags to train on");
        ensure!(
            bags.iter()
                .all(|b| !b.features.is_empty() && b.features.len() % dim == 0),
            "every bag needs at least one instance of {dim} features"
        );
        match self {
            Self::Abmil { hidden, attention } => {
                let standardizer = Standardizer::fit(bags, dim);
                let standardized: Vec<MilBag> =
                    bags.iter().map(|b| standardizer.apply(b)).collect();
                let model = AbMil::new(MilConfig {
                    input_dim: dim,
                    hidden: *hidden,
                    attention: *attention,
                });
                let init = model.init(config.seed);
                let trained = train(&model, init, &standardized, config, on_epoch);
                Ok(TrainedHead::new(trained, |params| MilHead {
                    model: MilModel::Abmil {
                        model: model.clone(),
                        standardizer: standardizer.clone(),
                    },
                    params,
                }))
            }
            Self::Pamil {
                config: pamil,
                losses,
                start,
            } => {
                let model = Pamil::new(PamilConfig {
                    input_dim: dim,
                    ..*pamil
                });
                let mut init = model.init(config.seed);
                match start {
                    PamilStart::Fresh(ProtoInit::Normal) => {}
                    PamilStart::Fresh(ProtoInit::Kmeans) => {
                        let points: Vec<f64> = bags
                            .iter()
                            .flat_map(|b| b.features.iter().copied())
                            .collect();
                        let centres = kmeans(&points, dim, pamil.prototypes, config.seed);
                        init[model.layout.proto.clone()].copy_from_slice(&centres);
                    }
                    PamilStart::Head(from, params) => {
                        for t in &model.layout.tensors {
                            if let Some(f) = from.layout.tensors.iter().find(|f| f.name == t.name) {
                                init[t.range.clone()].copy_from_slice(&params[f.range.clone()]);
                            }
                        }
                    }
                }
                let objective = PamilObjective {
                    model: &model,
                    losses,
                };
                let trained = train(&objective, init, bags, config, on_epoch);
                Ok(TrainedHead::new(trained, |params| MilHead {
                    model: MilModel::Pamil(Box::new(model.clone())),
                    params,
                }))
            }
        }
    }
}

impl TrainedHead {
    fn new(trained: Trained, head: impl Fn(Vec<f64>) -> MilHead) -> Self {
        Self {
            selected: head(trained.selected),
            selected_epoch: trained.selected_epoch,
            selected_accuracy: trained.selected_accuracy,
            last: head(trained.last),
        }
    }
}
