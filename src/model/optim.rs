//! PyTorch's SGD with momentum and weight decay, and the warmup + cosine schedule.

use serde::{Deserialize, Serialize};

use crate::engine::SgdUpdate;
use crate::model::surgery::Combination;

/// SGD hyper-parameters (the reference's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Default for Sgd {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 1e-4,
        }
    }
}

impl Sgd {
    /// The fused update for one step at learning rate `lr` with the surgery's combination.
    pub fn update(&self, lr: f64, c: &Combination) -> SgdUpdate {
        SgdUpdate {
            alpha: c.alpha as f32,
            beta: c.beta as f32,
            lr: lr as f32,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        }
    }
}

/// Learning rate per epoch: linear warmup `lr (e+1)/W` for the first `W` epochs, then cosine
/// decay `lr/2 (1 + cos(pi (e-W)/(E-W)))` over the remaining `E - W`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_epochs: u32,
    pub epochs: u32,
}

impl Schedule {
    pub fn lr(&self, epoch: u32) -> f64 {
        let (e, w, total) = (epoch as f64, self.warmup_epochs as f64, self.epochs as f64);
        if epoch < self.warmup_epochs {
            self.base_lr * (e + 1.0) / w
        } else {
            let progress = (e - w) / (total - w).max(1.0);
            self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}
