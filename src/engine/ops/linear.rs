//! Linear layers on feature-major `[features, N]` matrices: `Y = W X + b`.

use anyhow::Result;

use super::check_len;
use crate::engine::{Backend, ViewLen};

/// A linear layer on feature-major `[in, N]` inputs: `y = W x + b`, `W` is `[out, in]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Length of the `[W; b]` parameter view.
    pub fn param_len(&self) -> usize {
        self.out_features * (self.in_features + 1)
    }
    fn in_len(&self) -> usize {
        self.in_features * self.batch
    }
    fn out_len(&self) -> usize {
        self.out_features * self.batch
    }
}

/// The buffers of [`LinearOps::linear_forward`].
pub struct LinearForward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[W; b]`.
    pub wb: B::View<'a>,
    pub relu: bool,
    /// Written.
    pub y: B::ViewMut<'a>,
}

impl<B: Backend> LinearForward<'_, B> {
    pub fn check(&self, s: &Linear) -> Result<()> {
        check_len("linear input", self.x.len(), s.in_len())?;
        check_len("linear parameters", self.wb.len(), s.param_len())?;
        check_len("linear output", self.y.len(), s.out_len())
    }
}

/// The buffers of [`LinearOps::linear_backward`].
pub struct LinearBackward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    /// `[W; b]`.
    pub wb: B::View<'a>,
    /// The forward output, when a ReLU followed: its gradient is undone first.
    pub relu_out: Option<B::View<'a>>,
    /// The output gradient, masked in place by the ReLU when `relu_out` is given.
    pub dy: B::ViewMut<'a>,
    /// Accumulated: `[dW; db]`.
    pub dwb: B::ViewMut<'a>,
    /// Accumulated when given.
    pub dx: Option<B::ViewMut<'a>>,
}

impl<B: Backend> LinearBackward<'_, B> {
    pub fn check(&self, s: &Linear) -> Result<()> {
        check_len("linear input", self.x.len(), s.in_len())?;
        check_len("linear parameters", self.wb.len(), s.param_len())?;
        check_len("linear output gradient", self.dy.len(), s.out_len())?;
        check_len("linear parameter gradient", self.dwb.len(), s.param_len())?;
        if let Some(y) = &self.relu_out {
            check_len("linear output", y.len(), s.out_len())?;
        }
        self.dx.as_ref().map_or(Ok(()), |dx| {
            check_len("linear input gradient", dx.len(), s.in_len())
        })
    }
}

pub trait LinearOps: Backend {
    /// `y = act(W x + b)` with `wb = [W; b]`. Writes `y`.
    fn linear_forward(&self, s: &Linear, a: LinearForward<'_, Self>) -> Result<()>;

    /// Backward of [`LinearOps::linear_forward`]. With `relu_out = Some(y)`, first
    /// `dy <- dy [y > 0]` in place. Then `dW += dy x^T`, `db += sum_n dy`, and
    /// `dx += W^T dy` when `dx` is given.
    fn linear_backward(&self, s: &Linear, a: LinearBackward<'_, Self>) -> Result<()>;
}
