//! The learning-rate schedule: warm-up, then cosine decay. (PyTorch's SGD itself is the
//! engines' fused update, [`crate::engine::SgdUpdate`]; its hyper-parameters are the step's,
//! [`crate::model::StepConfig`].)

use serde::{Deserialize, Serialize};

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
