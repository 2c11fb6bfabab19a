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

/// What a batch norm forward normalizes with, and what it records.
pub enum BnStats<'a, B: Backend + 'a> {
    /// Training mode: this batch's statistics, written to `saved = [mean; invstd]` for the
    /// backward pass, and the running `[mean; var]` updated.
    Batch {
        saved: B::ViewMut<'a>,
        running: B::ViewMut<'a>,
    },
    /// Evaluation mode: the running statistics `[mean; var]`, unchanged.
    Running(B::View<'a>),
}

/// The buffers of [`NormOps::batchnorm_forward`].
pub struct BnForward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[gamma; beta]`.
    pub affine: B::View<'a>,
    /// Added after the normalization, before the ReLU.
    pub residual: Option<B::View<'a>>,
    pub relu: bool,
    /// Written.
    pub y: B::ViewMut<'a>,
    pub stats: BnStats<'a, B>,
}

impl<B: Backend> BnForward<'_, B> {
    pub fn check(&self, s: &BatchNorm) -> Result<()> {
        let residual = self.residual.as_ref().map(ViewLen::len);
        s.check_input(self.x.len(), self.affine.len(), residual)?;
        s.check_like_input("batch norm output", self.y.len())?;
        match &self.stats {
            BnStats::Batch { saved, running } => {
                s.check_pairs("batch norm saved statistics", saved.len())?;
                s.check_pairs("batch norm running statistics", running.len())
            }
            BnStats::Running(running) => {
                s.check_pairs("batch norm running statistics", running.len())
            }
        }
    }
}

/// The buffers of [`NormOps::batchnorm_backward`].
pub struct BnBackward<'a, B: Backend + 'a> {
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

impl<B: Backend> BnBackward<'_, B> {
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
    /// Batch norm, optionally followed by a residual add and a ReLU:
    /// `y = act(gamma (x - mean) invstd + beta [+ residual])`. In training mode
    /// ([`BnStats::Batch`]) with this batch's statistics: writes `saved = [mean; invstd]` and
    /// updates `running = [mean; var]` with `r = (1 - momentum) r + momentum batch_stat`, the
    /// variance unbiased (as PyTorch). In evaluation mode ([`BnStats::Running`]) with the
    /// running statistics. Writes `y`.
    fn batchnorm_forward(&self, s: &BatchNorm, a: BnForward<'_, Self>) -> Result<()>;

    /// Backward of a training-mode [`NormOps::batchnorm_forward`]. With `relu_out = Some(y)`
    /// the ReLU is undone first, in place: `dy <- dy [y > 0]`. With `xhat = (x - mean) invstd`
    /// and `M` values per channel: `dgamma = sum dy xhat`, `dbeta = sum dy`,
    /// `dx = gamma invstd / M (M dy - dbeta - xhat dgamma)`. Writes `dx`;
    /// `daffine += [dgamma; dbeta]`.
    fn batchnorm_backward(&self, s: &BatchNorm, a: BnBackward<'_, Self>) -> Result<()>;
}
