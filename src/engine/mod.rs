//! Engines: where tensors live and how ops run on them.
//!
//! The network in [`crate::model`] is written once against the [`Engine`] trait; `cpu` is the
//! pure-Rust numerical reference, `cuda` runs the handwritten kernels. Engines know flat f32
//! buffers, shapes and ops, and nothing of the network, the method or the command line.
//!
//! An engine is a [`Backend`] (buffers and views on its device) that implements every op
//! family of [`ops`]: [`ConvOps`], [`NormOps`], [`PoolOps`], [`LinearOps`], [`LossOps`] and
//! [`UpdateOps`]. Each family is one trait in `ops/<family>.rs` (its shapes, argument
//! structs and buffer checks beside it), implemented by each engine in the file where the
//! work is done (`cpu/<family>.rs`, `cuda/<family>.rs`). A new op is one trait method and one
//! implementation per engine; [`Engine`] needs no change.
//!
//! Conventions every engine follows:
//! - Activations are channel-major, `[C, N, H, W]`: one channel of the whole batch is
//!   contiguous, so batch norm reads contiguous rows and a convolution over the whole batch
//!   is one matrix product `Y[Cout, N*Ho*Wo] = W[Cout, Cin*k*k] * cols`. Feature matrices
//!   (pooled features, projector activations, embeddings) are `[D, N]` for the same reason.
//! - Parameters are views into one flat buffer, in PyTorch's layouts (conv weight
//!   `[Cout, Cin, k, k]`, linear weight `[out, in]`); a batch norm's weight and bias are one
//!   view `[gamma; beta]`, a linear layer's weight and bias one view `[W; b]`, running
//!   statistics one view `[mean; var]`, matching the reference model's order.
//! - Parameter gradients always accumulate (`+=`), because two forward passes feed one
//!   task gradient. Input gradients of convolutions and linear layers accumulate too (the
//!   residual shortcut's gradient is summed into them for free); batch norm and pooling
//!   input gradients are written (`=`). Each method says which.
//! - Every op checks its buffers' lengths against its shape first (the `check` methods of
//!   [`ops`], shared by all engines, so that all report the same errors).

pub mod cpu;
pub mod cuda;
pub mod ops;

use std::ops::Range;

pub use anyhow::Result;

pub use ops::check_len;
pub use ops::conv::{Conv2d, ConvBackward, ConvOps};
pub use ops::linear::{Linear, LinearBackward, LinearForward, LinearOps};
pub use ops::loss::{LossOps, LossViews, ViewPair};
pub use ops::norm::{BatchNorm, BnBackward, BnForward, BnStats, NormOps};
pub use ops::pool::{AvgPool, MaxPool, PoolOps};
pub use ops::update::{GradDots, SgdBuffers, SgdUpdate, UpdateOps};

/// Every engine trait, for calling ops on a concrete engine (`use slam_ags::engine::prelude::*`);
/// code generic over `E: Engine` needs only [`Engine`].
pub mod prelude {
    pub use super::{
        Backend, ConvOps, Engine, LinearOps, LossOps, NormOps, PoolOps, UpdateOps, ViewLen,
    };
}

/// The number of values a view covers, whatever device it is on (the buffer checks need it).
pub trait ViewLen {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ViewLen for &[f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
}

impl ViewLen for &mut [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
}

/// Where an engine's buffers live, for the memory check before a run (the policy, e.g. the
/// `SLAM_MEMORY_LIMIT` cap, is [`crate::memory`]'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// In host memory, shared with everything else the process holds.
    Host,
    /// In device memory, of which `free` bytes are free now.
    Device { free: u64 },
}

/// Tensor storage on one device: flat f32 buffers and views of them.
pub trait Backend: Sized + Sync {
    /// A flat f32 buffer on the engine's device.
    type Buf: Send + Sync;
    /// A read-only view of part of a buffer.
    type View<'a>: Copy + ViewLen
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type ViewMut<'a>: ViewLen
    where
        Self: 'a;

    /// A short name for reports ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Where the buffers live (and, on a device, how much of it is free).
    fn memory(&self) -> Result<Memory> {
        Ok(Memory::Host)
    }

    /// Waits until every op queued so far has finished (a no-op where ops run as they are
    /// called), so that host clocks measure the device's work rather than its queueing.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Restarts the count of [`Backend::peak_memory_bytes`].
    fn reset_peak_memory(&self) -> Result<()> {
        Ok(())
    }

    /// The most device memory the engine's buffers have taken since it started or since
    /// [`Backend::reset_peak_memory`], where the engine keeps count (None on the host).
    fn peak_memory_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The arithmetic of the convolutions' and linear layers' products: "f32", or the
    /// tensor-core input rounding ("tf32", "bf16") an engine was asked for.
    fn precision(&self) -> &'static str {
        "f32"
    }

    /// A zero-filled buffer of `len` values: for what ops accumulate into (`+=`).
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` values whose contents are unspecified: for an op's output that the
    /// op writes whole (`=`), so that nothing is written twice. The CPU engine fills it with
    /// NaN, so that a read before the write shows in its results (and in every test).
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, src: Self::View<'_>) -> Result<Vec<f32>>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>
    where
        Self: 'a;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>
    where
        Self: 'a;
    /// The whole buffer as a view.
    fn all<'a>(&self, buf: &'a Self::Buf) -> Self::View<'a>
    where
        Self: 'a,
    {
        self.view(buf, 0..self.buf_len(buf))
    }
    /// The whole buffer as a writable view.
    fn all_mut<'a>(&self, buf: &'a mut Self::Buf) -> Self::ViewMut<'a>
    where
        Self: 'a,
    {
        let len = self.buf_len(buf);
        self.view_mut(buf, 0..len)
    }
    fn fill_zero(&self, dst: Self::ViewMut<'_>) -> Result<()>;
}

/// Tensor storage and every op the network is built from.
pub trait Engine: Backend + ConvOps + NormOps + PoolOps + LinearOps + LossOps + UpdateOps {}

impl<E> Engine for E where E: Backend + ConvOps + NormOps + PoolOps + LinearOps + LossOps + UpdateOps
{}

/// Reorders a batch from PyTorch's `[N, C, H, W]` to the engines' `[C, N, H, W]`.
pub fn nchw_to_cnhw(data: &[f32], n: usize, c: usize, plane: usize) -> Vec<f32> {
    assert_eq!(
        data.len(),
        n * c * plane,
        "batch size does not match its shape"
    );
    let mut out = vec![0.0; data.len()];
    for (i, src) in data.chunks_exact(plane).enumerate() {
        let (img, ch) = (i / c, i % c);
        out[(ch * n + img) * plane..][..plane].copy_from_slice(src);
    }
    out
}
