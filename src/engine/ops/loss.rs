//! The two task losses over a pair of views of the same samples.

use anyhow::{Result, ensure};

use super::check_len;
use crate::engine::{Backend, ViewLen};

/// Two views of `n` samples embedded in `dim` dimensions, each feature-major `[dim, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewPair {
    pub dim: usize,
    pub n: usize,
}

/// The buffers of a pair loss: both views' embeddings in, their gradients out (written).
pub struct LossViews<'a, B: Backend + 'a> {
    pub z_i: B::View<'a>,
    pub z_j: B::View<'a>,
    pub dz_i: B::ViewMut<'a>,
    pub dz_j: B::ViewMut<'a>,
}

impl<B: Backend> LossViews<'_, B> {
    /// Every buffer against the pair's shape, that the batch is not empty, and that the
    /// temperature is positive.
    pub fn check(&self, s: &ViewPair, temperature: f32) -> Result<()> {
        ensure!(s.n > 0 && s.dim > 0, "loss over an empty batch");
        ensure!(
            temperature.is_finite() && temperature > 0.0,
            "temperature must be positive, got {temperature}"
        );
        let lens = [
            self.z_i.len(),
            self.z_j.len(),
            self.dz_i.len(),
            self.dz_j.len(),
        ];
        for (what, len) in ["z_i", "z_j", "dz_i", "dz_j"].into_iter().zip(lens) {
            check_len(what, len, s.dim * s.n)?;
        }
        Ok(())
    }
}

pub trait LossOps: Backend {
    /// NT-Xent contrastive loss over the `2n` rows `[z_i; z_j]`, each row paired with its
    /// other view. With `f = z / max(|z|, 1e-12)` and `S = f f^T / T`:
    /// `loss = -mean_a [S[a, p(a)] - log sum_{b != a} exp S[a, b]]`; its gradient is
    /// `dS[a, b] = (softmax_{b != a} S[a, .] - [b == p(a)]) / 2n`, `dF = (dS + dS^T) F / T`,
    /// then back through the normalization: `dz = (df - f (f . df)) / |z|`.
    /// Returns the loss and writes `dz_i`, `dz_j`.
    fn ntxent(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32>;

    /// Cohesion loss over the `m = 2n` normalized rows `[z_i; z_j]`: with `s = sum_a f_a`,
    /// `loss = (1 - mean_{a != b} f_a . f_b) / T = (1 - (|s|^2 - sum_a |f_a|^2) / (m (m-1))) / T`
    /// and `df_a = -2 (s - f_a) / (m (m-1) T)`. Returns the loss and writes `dz_i`, `dz_j`;
    /// linear in `m` (the `m x m` matrix is never formed).
    fn cohesion(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32>;
}
