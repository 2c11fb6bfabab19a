//! Max pooling and global average pooling over the planes of a `[C, N, H, W]` batch.

use anyhow::Result;

use super::check_len;
use crate::engine::Backend;

/// Max pooling of `planes = C*N` planes of `h x w`, with square window, stride and padding
/// (padding never wins the max, as in PyTorch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool {
    pub planes: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool {
    /// Max pooling of `planes` planes of `h x w` with a square `kernel`, `stride` and `pad`.
    pub fn new(
        planes: usize,
        (in_h, in_w): (usize, usize),
        (kernel, stride, pad): (usize, usize, usize),
    ) -> Self {
        Self {
            planes,
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

    fn in_len(&self) -> usize {
        self.planes * self.in_h * self.in_w
    }
    fn out_len(&self) -> usize {
        self.planes * self.out_h() * self.out_w()
    }

    pub fn check_forward(&self, x: usize, y: usize) -> Result<()> {
        check_len("max pool input", x, self.in_len())?;
        check_len("max pool output", y, self.out_len())
    }

    pub fn check_backward(&self, x: usize, dy: usize, dx: usize) -> Result<()> {
        check_len("max pool input", x, self.in_len())?;
        check_len("max pool output gradient", dy, self.out_len())?;
        check_len("max pool input gradient", dx, self.in_len())
    }
}

/// Global average pooling: each of `planes = C*N` planes of `spatial = H*W` values becomes
/// one value, so `[C, N, H, W]` becomes `[C, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool {
    pub planes: usize,
    pub spatial: usize,
}

impl AvgPool {
    pub fn check_forward(&self, x: usize, y: usize) -> Result<()> {
        check_len("average pool input", x, self.planes * self.spatial)?;
        check_len("average pool output", y, self.planes)
    }

    pub fn check_backward(&self, dy: usize, dx: usize) -> Result<()> {
        check_len(
            "average pool input gradient",
            dx,
            self.planes * self.spatial,
        )?;
        check_len("average pool output gradient", dy, self.planes)
    }
}

pub trait PoolOps: Backend {
    /// Writes `y`.
    fn maxpool_forward(&self, s: &MaxPool, x: Self::View<'_>, y: Self::ViewMut<'_>) -> Result<()>;

    /// Routes each output gradient to the first maximum of its window (PyTorch's choice on
    /// ties), recomputed from `x`. Writes `dx`.
    fn maxpool_backward(
        &self,
        s: &MaxPool,
        x: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Writes `y`.
    fn avgpool_forward(&self, s: &AvgPool, x: Self::View<'_>, y: Self::ViewMut<'_>) -> Result<()>;

    /// `dx = dy / spatial`, broadcast over each plane. Writes `dx`.
    fn avgpool_backward(
        &self,
        s: &AvgPool,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    ) -> Result<()>;
}
