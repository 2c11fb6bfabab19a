//! The weakly supervised baseline: every patch takes its slide's label (1 for a patch of an
//! abnormal bag), and a linear classifier on the encoder features h is trained together with
//! the encoder by binary cross-entropy. It sees the same patches and views as SimCLR (two
//! augmented views of every patch of the batch, each view one forward pass); the projector
//! is not used.
//!
//! Per view `v` of `n` patches, with `f_i = w . h_i + b` and `p_i = sigmoid(f_i)`:
//! `L = (1/2) sum_v (1/n) sum_i BCE(f_i, y_i)`, so `dL/df_i = (p_i - y_i) / (2n)`,
//! `dL/dh_i = dL/df_i w`, `dL/dw = sum_i dL/df_i h_i`, `dL/db = sum_i dL/df_i`. The head
//! is small and lives on the host in f64; its update is the same SGD (momentum, weight
//! decay) as the network's.

use std::time::Instant;

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::distr::{Distribution, Uniform};
use rand_chacha::ChaCha8Rng;

use super::step::{StepBatch, StepConfig, StepReport, Trainer, embedding_std};
use super::surgery::Surgery;
use crate::engine::Engine;

/// The linear classifier on h: `weights[..dim]` is w, `weights[dim]` the bias b.
#[derive(Clone, Debug, PartialEq)]
pub struct WeakHead {
    pub weights: Vec<f64>,
    /// SGD's momentum buffer, as the network's.
    pub momentum: Vec<f64>,
    /// The gradient of the last step's loss (after the step, the gradient it descended).
    pub grad: Vec<f64>,
}

impl WeakHead {
    /// PyTorch's `nn.Linear(dim, 1)` initialization: w and b uniform in `+-1/sqrt(dim)`.
    pub fn init(dim: usize, seed: u64) -> Result<Self> {
        ensure!(dim > 0, "the weak head needs features");
        let bound = 1.0 / (dim as f64).sqrt();
        let uniform = Uniform::new_inclusive(-bound, bound)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7765_616b);
        Ok(Self {
            weights: (0..=dim).map(|_| uniform.sample(&mut rng)).collect(),
            momentum: vec![0.0; dim + 1],
            grad: vec![0.0; dim + 1],
        })
    }

    pub fn dim(&self) -> usize {
        self.weights.len() - 1
    }

    /// `f = w . h + b` of column `i` of `h` (`[dim, n]`, as the engines hold features).
    pub fn logit(&self, h: &[f32], n: usize, i: usize) -> f64 {
        let dim = self.dim();
        (0..dim)
            .map(|d| self.weights[d] * h[d * n + i] as f64)
            .sum::<f64>()
            + self.weights[dim]
    }

    /// PyTorch's SGD on the head: `d = grad + wd w; m = momentum m + d; w -= lr m`.
    fn sgd(&mut self, cfg: &StepConfig, lr: f64) {
        let (momentum, decay) = (cfg.momentum as f64, cfg.weight_decay as f64);
        for ((w, m), g) in self
            .weights
            .iter_mut()
            .zip(&mut self.momentum)
            .zip(&self.grad)
        {
            *m = momentum * *m + g + decay * *w;
            *w -= lr * *m;
        }
    }
}

/// Binary cross-entropy of logit `f` against label `y`, stable for large `|f|`.
pub fn bce(f: f64, y: bool) -> f64 {
    let m = if y { -f } else { f };
    m.max(0.0) + (-m.abs()).exp().ln_1p()
}

fn sigmoid(f: f64) -> f64 {
    1.0 / (1.0 + (-f).exp())
}

impl<E: Engine> Trainer<E> {
    /// One step of the weak baseline on `batch`, whose positive views hold every patch (the
    /// SimCLR sampling), the first `abnormal` of them from abnormal bags. The encoder's
    /// gradient goes to `g1` (`g2` is zero: no surgery), the head's to `head.grad`; both are
    /// then updated with `cfg`'s SGD at `lr`.
    pub fn weak_step(
        &mut self,
        eng: &E,
        batch: &StepBatch<E>,
        abnormal: usize,
        head: &mut WeakHead,
        cfg: &StepConfig,
        lr: f64,
    ) -> Result<StepReport> {
        cfg.validate()?;
        let n = batch.n_pos;
        ensure!(
            batch.n_neg == 0 && abnormal <= n,
            "the weak baseline takes every patch as a positive view ({abnormal} abnormal of {n}, \
             {} negatives)",
            batch.n_neg
        );
        let dim = self.net.config.feature_dim();
        ensure!(
            head.dim() == dim,
            "the weak head takes {} features, the network gives {dim}",
            head.dim()
        );
        let start = Instant::now();
        eng.fill_zero(eng.all_mut(&mut self.g1))?;
        eng.fill_zero(eng.all_mut(&mut self.g2))?;
        head.grad.iter_mut().for_each(|g| *g = 0.0);
        let (mut loss, mut spread) = (0.0f64, 0.0f32);
        for view in [&batch.pos_i, &batch.pos_j] {
            let acts = self.net.forward_train(
                eng,
                &self.params,
                &mut self.running,
                view,
                n,
                batch.crop,
            )?;
            for count in &mut self.batches_tracked {
                *count += 1;
            }
            let h = eng.download(eng.all(&acts.features))?;
            let mut dh = vec![0.0f32; dim * n];
            for i in 0..n {
                let y = i < abnormal;
                let f = head.logit(&h, n, i);
                loss += bce(f, y) / (2 * n) as f64;
                let r = (sigmoid(f) - y as u8 as f64) / (2 * n) as f64;
                for d in 0..dim {
                    dh[d * n + i] = (r * head.weights[d]) as f32;
                    head.grad[d] += r * h[d * n + i] as f64;
                }
                head.grad[dim] += r;
            }
            let dh = eng.upload(&dh)?;
            self.net
                .backward_features(eng, &self.params, &acts, dh, &mut self.g1)?;
            if spread == 0.0 {
                let z = eng.download(eng.all(&acts.z))?;
                spread = embedding_std(&z, self.net.config.out_dim, n);
            }
        }
        if self.timed {
            eng.synchronize()?;
        }
        let seconds_tasks = start.elapsed().as_secs_f64();
        let start = Instant::now();
        // g2 = 0: the plain sum is g1 itself.
        let combination = self.update(eng, cfg, lr, |dots| Surgery::None.combine(dots), None)?;
        head.sgd(cfg, lr);
        Ok(StepReport {
            loss_contrastive: 0.0,
            loss_cohesion: 0.0,
            loss: loss as f32,
            lr,
            combination,
            embedding_std: spread,
            seconds_tasks,
            seconds_update: start.elapsed().as_secs_f64(),
        })
    }
}
