//! 2-D convolution without bias over a channel-major `[C, N, H, W]` batch.

use anyhow::Result;

use super::check_len;
use crate::engine::{Backend, ViewLen};

/// A 2-D convolution without bias over a `[C, N, H, W]` batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// A convolution of `batch` images of `h x w`, `cin` to `cout` channels, with a square
    /// `kernel`, `stride` and zero padding `pad`.
    pub fn new(
        batch: usize,
        (in_channels, out_channels): (usize, usize),
        (in_h, in_w): (usize, usize),
        (kernel, stride, pad): (usize, usize, usize),
    ) -> Self {
        Self {
            batch,
            in_channels,
            out_channels,
            in_h,
            in_w,
            kernel,
            stride,
            pad,
        }
    }

    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn in_len(&self) -> usize {
        self.in_channels * self.batch * self.in_h * self.in_w
    }
    pub fn out_len(&self) -> usize {
        self.out_channels * self.batch * self.out_h() * self.out_w()
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    /// Multiply-adds of the forward pass (the backward pass costs twice this).
    pub fn macs(&self) -> usize {
        self.out_len() * self.in_channels * self.kernel * self.kernel
    }

    /// The buffers of a forward pass.
    pub fn check_forward(&self, x: usize, w: usize, y: usize) -> Result<()> {
        check_len("conv2d input", x, self.in_len())?;
        check_len("conv2d weight", w, self.weight_len())?;
        check_len("conv2d output", y, self.out_len())
    }
}

/// The buffers of [`ConvOps::conv2d_backward`].
pub struct ConvBackward<'a, B: Backend + 'a> {
    pub x: B::View<'a>,
    pub w: B::View<'a>,
    pub dy: B::View<'a>,
    /// Accumulated: `dw += dL/dw`.
    pub dw: B::ViewMut<'a>,
    /// Accumulated when given: `dx += dL/dx`.
    pub dx: Option<B::ViewMut<'a>>,
}

impl<B: Backend> ConvBackward<'_, B> {
    pub fn check(&self, s: &Conv2d) -> Result<()> {
        check_len("conv2d input", self.x.len(), s.in_len())?;
        check_len("conv2d weight", self.w.len(), s.weight_len())?;
        check_len("conv2d output gradient", self.dy.len(), s.out_len())?;
        check_len("conv2d weight gradient", self.dw.len(), s.weight_len())?;
        self.dx.as_ref().map_or(Ok(()), |dx| {
            check_len("conv2d input gradient", dx.len(), s.in_len())
        })
    }
}

pub trait ConvOps: Backend {
    /// `y = conv(x, w)`; `y` is written.
    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        w: Self::View<'_>,
        y: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// With `cols` the unfolded input: `dw += dy cols^T`, and `dx += fold(w^T dy)` when `dx`
    /// is given.
    fn conv2d_backward(&self, s: &Conv2d, a: ConvBackward<'_, Self>) -> Result<()>;
}
