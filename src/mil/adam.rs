//! Adam as PyTorch's `torch.optim.Adam` computes it (L2 weight decay added to the gradient):
//!   g += wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//!   p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for Adam {
    /// The settings of Ilse et al.'s gated-attention MIL experiments.
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// Adam's moment buffers and step count, mirroring the flat parameter vector.
#[derive(Clone, Debug)]
pub struct AdamState {
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub steps: u64,
}

impl AdamState {
    pub fn new(len: usize) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
            steps: 0,
        }
    }
}

impl Adam {
    /// One update of `params` with gradient `grads`.
    pub fn step(&self, params: &mut [f64], grads: &[f64], state: &mut AdamState) {
        state.steps += 1;
        let t = state.steps as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut state.m)
            .zip(&mut state.v)
        {
            let g = g + self.weight_decay * *p;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + self.eps);
        }
    }
}
