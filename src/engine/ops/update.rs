//! Gradient surgery and the optimizer over the flat parameter buffer.

use anyhow::Result;

use super::check_len;
use crate::engine::{Backend, ViewLen};

/// The three inner products adaptive gradient surgery needs, from one pass over g1 and g2.
/// Accumulated in f64 so that the result does not depend on the summation order beyond
/// f64 rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GradDots {
    /// g1 . g2
    pub g1g2: f64,
    /// |g1|^2
    pub g1g1: f64,
    /// |g2|^2
    pub g2g2: f64,
}

/// One fused surgery + SGD update: `g = alpha g1 + beta g2; d = g + weight_decay p;
/// m = momentum m + d; p -= lr m` (PyTorch's SGD; `m` starts at zero, which makes the first
/// step `m = d` exactly as PyTorch does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdUpdate {
    pub alpha: f32,
    pub beta: f32,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// The flat buffers of [`UpdateOps::sgd_step`].
pub struct SgdBuffers<'a, B: Backend + 'a> {
    /// The contrastive task's gradient.
    pub g1: B::View<'a>,
    /// The cohesion task's gradient.
    pub g2: B::View<'a>,
    /// Updated in place.
    pub params: B::ViewMut<'a>,
    /// Updated in place.
    pub momentum: B::ViewMut<'a>,
}

impl<B: Backend> SgdBuffers<'_, B> {
    pub fn check(&self) -> Result<()> {
        let n = self.params.len();
        check_len("first gradient", self.g1.len(), n)?;
        check_len("second gradient", self.g2.len(), n)?;
        check_len("momentum", self.momentum.len(), n)
    }
}

pub trait UpdateOps: Backend {
    /// `g1 . g2`, `|g1|^2`, `|g2|^2` in one pass, accumulated in f64, deterministic.
    fn grad_dots(&self, g1: Self::View<'_>, g2: Self::View<'_>) -> Result<GradDots>;

    /// `out = alpha g1 + beta g2` with `(alpha, beta)` (the combined gradient, for step
    /// dumps).
    fn combine_grads(
        &self,
        coefficients: (f32, f32),
        g1: Self::View<'_>,
        g2: Self::View<'_>,
        out: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// The fused surgery + SGD pass of [`SgdUpdate`] over the flat parameter and momentum
    /// buffers.
    fn sgd_step(&self, u: &SgdUpdate, a: SgdBuffers<'_, Self>) -> Result<()>;
}
