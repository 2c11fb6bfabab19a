//! Batch normalization over channel rows, with the residual add and ReLU that follow it in a
//! ResNet fused in.

use anyhow::{Result, ensure};

use super::check_len;
use crate::engine::{Backend, ViewLen};

/// Batch normalization over `channels` rows of `per_channel = N*H*W` values each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    pub channels: usize,
    pub per_channel: usize,
    pub eps: f32,
    pub momentum: f32,
}

impl BatchNorm {
    pub fn len(&self) -> usize {
        self.channels * self.per_channel
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The input, `[gamma; beta]` and an optional buffer of the input's shape (the residual,
    /// or the output whose ReLU the backward undoes); and that the batch is not empty.
    fn check_input(&self, x: usize, affine: usize, same_shape: Option<usize>) -> Result<()> {
        check_len("batch norm input", x, self.len())?;
        check_len("batch norm weight and bias", affine, 2 * self.channels)?;
        ensure!(self.per_channel > 0, "batch norm over an empty batch");
        same_shape.map_or(Ok(()), |len| {
            check_len("batch norm residual/output", len, self.len())
        })
    }

    /// A per-channel pair of statistics (`[mean; invstd]`, `[mean; var]`) or of gradients.
    fn check_pairs(&self, what: &str, len: usize) -> Result<()> {
        check_len(what, len, 2 * self.channels)
    }

    /// A buffer of the input's shape.
    fn check_like_input(&self, what: &str, len: usize) -> Result<()> {
        check_len(what, len, self.len())
    }
}

/// The buffers of [`NormOps::batchnorm_train_forward`].
pub struct BnTrainForward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[gamma; beta]`.
    pub affine: B::View<'a>,
    /// Added after the normalization, before the ReLU.
    pub residual: Option<B::View<'a>>,
    pub relu: bool,
    /// Written.
    pub y: B::ViewMut<'a>,
    /// Written: `[mean; invstd]` of this batch, for the backward pass.
    pub saved: B::ViewMut<'a>,
    /// Updated: `[mean; var]`.
    pub running: B::ViewMut<'a>,
}

impl<B: Backend> BnTrainForward<'_, B> {
    pub fn check(&self, s: &BatchNorm) -> Result<()> {
        let residual = self.residual.as_ref().map(ViewLen::len);
        s.check_input(self.x.len(), self.affine.len(), residual)?;
        s.check_like_input("batch norm output", self.y.len())?;
        s.check_pairs("batch norm saved statistics", self.saved.len())?;
        s.check_pairs("batch norm running statistics", self.running.len())
    }
}

/// The buffers of [`NormOps::batchnorm_eval_forward`].
pub struct BnEvalForward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[gamma; beta]`.
    pub affine: B::View<'a>,
    /// `[mean; var]`.
    pub running: B::View<'a>,
    /// Added after the normalization, before the ReLU.
    pub residual: Option<B::View<'a>>,
    pub relu: bool,
    /// Written.
    pub y: B::ViewMut<'a>,
}

impl<B: Backend> BnEvalForward<'_, B> {
    pub fn check(&self, s: &BatchNorm) -> Result<()> {
        let residual = self.residual.as_ref().map(ViewLen::len);
        s.check_input(self.x.len(), self.affine.len(), residual)?;
        s.check_pairs("batch norm running statistics", self.running.len())?;
        s.check_like_input("batch norm output", self.y.len())
    }
}

/// The buffers of [`NormOps::batchnorm_train_backward`].
pub struct BnTrainBackward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[gamma; beta]`.
    pub affine: B::View<'a>,
    /// `[mean; invstd]` from the forward pass.
    pub saved: B::View<'a>,
    /// The forward output, when a ReLU followed: its gradient is undone first.
    pub relu_out: Option<B::View<'a>>,
    /// The output gradient; on return, the gradient of the pre-activation sum (which is also
    /// the residual's gradient).
    pub dy: B::ViewMut<'a>,
    /// Written.
    pub dx: B::ViewMut<'a>,
    /// Accumulated: `[dgamma; dbeta]`.
    pub daffine: B::ViewMut<'a>,
}

impl<B: Backend> BnTrainBackward<'_, B> {
    pub fn check(&self, s: &BatchNorm) -> Result<()> {
        let relu_out = self.relu_out.as_ref().map(ViewLen::len);
        s.check_input(self.x.len(), self.affine.len(), relu_out)?;
        s.check_pairs("batch norm saved statistics", self.saved.len())?;
        s.check_like_input("batch norm output gradient", self.dy.len())?;
        s.check_like_input("batch norm input gradient", self.dx.len())?;
        s.check_pairs("batch norm parameter gradient", self.daffine.len())
    }
}

pub trait NormOps: Backend {
    /// Training-mode batch norm with this batch's statistics, optionally followed by a
    /// residual add and a ReLU: `y = act(gamma (x - mean) invstd + beta [+ residual])`.
    /// Writes `y` and `saved = [mean; invstd]`; updates `running = [mean; var]` with
    /// `r = (1 - momentum) r + momentum batch_stat`, the variance unbiased (as PyTorch).
    fn batchnorm_train_forward(&self, s: &BatchNorm, a: BnTrainForward<'_, Self>) -> Result<()>;

    /// Evaluation-mode batch norm with the running statistics `[mean; var]`, optionally
    /// followed by a residual add and a ReLU. Writes `y`.
    fn batchnorm_eval_forward(&self, s: &BatchNorm, a: BnEvalForward<'_, Self>) -> Result<()>;

    /// Backward of [`NormOps::batchnorm_train_forward`]. With `relu_out = Some(y)` the ReLU
    /// is undone first, in place: `dy <- dy [y > 0]`. With `xhat = (x - mean) invstd` and `M`
    /// values per channel: `dgamma = sum dy xhat`, `dbeta = sum dy`,
    /// `dx = gamma invstd / M (M dy - dbeta - xhat dgamma)`. Writes `dx`;
    /// `daffine += [dgamma; dbeta]`.
    fn batchnorm_train_backward(&self, s: &BatchNorm, a: BnTrainBackward<'_, Self>) -> Result<()>;
}
