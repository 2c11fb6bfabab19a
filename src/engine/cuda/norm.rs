//! Batch normalization on the GPU (kernels/norm.cu): each channel row is split into chunks of
//! `NORM_CHUNK` values, so that even a few channels of millions of values fill the GPU; the
//! chunks' f64 partial sums are combined per channel by a finalize kernel, and an elementwise
//! pass over the same chunks applies the result. Same meaning as the
//! [`crate::engine::Engine`] methods of the same names.

use std::sync::{Arc, Mutex};

use anyhow::{Result, ensure};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};

use super::gpu::Gpu;
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::BatchNorm;

/// `NORM_BLOCK` of kernels/norm.cu.
pub const NORM_BLOCK: u32 = 256;
/// `NORM_CHUNK` of kernels/norm.cu: values of a channel row per block.
pub const NORM_CHUNK: usize = 4096;
/// `NORM_WARPS` of kernels/norm.cu: channels per block of the finalize kernels.
const NORM_WARPS: u32 = NORM_BLOCK / 32;
/// The most channels one launch takes (the grid's y dimension).
const MAX_CHANNELS: usize = 65_535;

/// The functions of kernels/norm.cu, and the f64 scratch of their partial sums (grown on
/// demand, reused across calls; every op runs on the one stream, in order).
pub(super) struct NormKernels {
    pub stats_partial: CudaFunction,
    pub stats_finalize: CudaFunction,
    pub apply: CudaFunction,
    pub grad_partial: CudaFunction,
    pub grad_finalize: CudaFunction,
    pub grad_apply: CudaFunction,
    pub partials: Mutex<Option<CudaSlice<f64>>>,
}

impl NormKernels {
    pub(super) fn load(m: &Arc<CudaModule>) -> Result<Self, super::GpuError> {
        let function = |name| super::gpu::load_function(m, name);
        Ok(NormKernels {
            stats_partial: function("bn_stats_partial")?,
            stats_finalize: function("bn_stats_finalize")?,
            apply: function("bn_apply")?,
            grad_partial: function("bn_grad_partial")?,
            grad_finalize: function("bn_grad_finalize")?,
            grad_apply: function("bn_grad_apply")?,
            partials: Mutex::new(None),
        })
    }
}

/// The launch shape of one batch norm: `chunks` blocks per channel row.
#[derive(Clone, Copy)]
struct Shape {
    channels: u32,
    chunks: u32,
    m: u64,
}

impl Shape {
    /// `(chunks, C)` blocks: the partial and elementwise kernels.
    fn rows(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.chunks, self.channels, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per channel: the finalize kernels.
    fn finalize(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.channels.div_ceil(NORM_WARPS), 1, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Doubles of partial sums (`[c][chunk][2]`), then `2 C` coefficients of the backward.
    fn scratch_len(&self) -> usize {
        2 * self.channels as usize * (self.chunks as usize + 1)
    }
}

/// Checks the shapes as the CPU engine does, and that they fit the kernels' launch shape.
/// None when there is nothing to do (no channels).
fn check_bn(
    s: &BatchNorm,
    x: DevView<'_>,
    affine: DevView<'_>,
    same_shape: Option<DevView<'_>>,
) -> Result<Option<Shape>> {
    s.check(x.len(), affine.len(), same_shape.map(|v| v.len()))?;
    ensure!(
        s.channels <= MAX_CHANNELS,
        "batch norm over {} channels: the CUDA kernels take at most {MAX_CHANNELS}",
        s.channels
    );
    let chunks = s.per_channel.div_ceil(NORM_CHUNK);
    ensure!(
        chunks <= u32::MAX as usize,
        "batch norm rows of {} values are too long for the CUDA kernels",
        s.per_channel
    );
    Ok((s.channels > 0).then_some(Shape {
        channels: s.channels as u32,
        chunks: chunks as u32,
        m: s.per_channel as u64,
    }))
}

fn ptr_or_null(v: Option<DevView<'_>>) -> CUdeviceptr {
    v.map_or(0, |v| *v.ptr())
}

impl Gpu {
    /// The partial-sum scratch, at least `len` doubles.
    fn norm_scratch(
        &self,
        len: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<f64>>>> {
        // A panic while holding it leaves only a device buffer, which stays valid.
        let mut slot = self.norm.partials.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|p| p.len() < len) {
            *slot = None;
            // SAFETY: every value is written by a kernel before it is read (kernels/norm.cu).
            *slot = Some(unsafe { self.stream.alloc::<f64>(len.max(1024)) }?);
        }
        Ok(slot)
    }

    /// Training-mode batch norm with this batch's statistics, optionally followed by a
    /// residual add and a ReLU. Writes `y` and `saved = [mean; invstd]`; updates
    /// `running = [mean; var]` (momentum rule, unbiased variance, as PyTorch).
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm_train_forward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        residual: Option<DevView<'_>>,
        relu: bool,
        y: DevViewMut<'_>,
        saved: DevViewMut<'_>,
        running: DevViewMut<'_>,
    ) -> Result<()> {
        let shape = check_bn(s, x, affine, residual)?;
        s.check_like_input("batch norm output", y.len())?;
        s.check_pairs("batch norm saved statistics", saved.len())?;
        s.check_pairs("batch norm running statistics", running.len())?;
        let Some(shape) = shape else { return Ok(()) };
        let mut slot = self.norm_scratch(shape.scratch_len())?;
        let partials = slot.as_mut().expect("just allocated").dev_mut();
        // SAFETY: lengths checked above; the scratch holds 2 C chunks doubles; launch shapes
        // as kernels/norm.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.norm.stats_partial)
                .arg(x.ptr())
                .arg(&shape.m)
                .arg(partials.ptr())
                .launch(shape.rows())?;
            self.stream
                .launch_builder(&self.norm.stats_finalize)
                .arg(x.ptr())
                .arg(&shape.m)
                .arg(&shape.channels)
                .arg(&shape.chunks)
                .arg(partials.ptr())
                .arg(&s.eps)
                .arg(&s.momentum)
                .arg(saved.ptr())
                .arg(running.ptr())
                .launch(shape.finalize())?;
        }
        self.launch_bn_apply(
            &shape,
            s,
            x,
            affine,
            saved.as_view(),
            residual,
            false,
            relu,
            y,
        )
    }

    /// Evaluation-mode batch norm with the running statistics `[mean; var]`, optionally
    /// followed by a residual add and a ReLU. Writes `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm_eval_forward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        running: DevView<'_>,
        residual: Option<DevView<'_>>,
        relu: bool,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        let shape = check_bn(s, x, affine, residual)?;
        s.check_pairs("batch norm running statistics", running.len())?;
        s.check_like_input("batch norm output", y.len())?;
        let Some(shape) = shape else { return Ok(()) };
        self.launch_bn_apply(&shape, s, x, affine, running, residual, true, relu, y)
    }

    /// `bn_apply` with the batch's `[mean; invstd]` (`eval == false`) or the running
    /// `[mean; var]` (`eval == true`), whose lengths the caller checked.
    #[allow(clippy::too_many_arguments)]
    fn launch_bn_apply(
        &self,
        shape: &Shape,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        stats: DevView<'_>,
        residual: Option<DevView<'_>>,
        eval: bool,
        relu: bool,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        let (eval, relu) = (eval as i32, relu as i32);
        let res = ptr_or_null(residual);
        // SAFETY: lengths checked by the callers; launch shape as kernels/norm.cu's contract
        // asks.
        unsafe {
            self.stream
                .launch_builder(&self.norm.apply)
                .arg(x.ptr())
                .arg(&res)
                .arg(&shape.m)
                .arg(affine.ptr())
                .arg(stats.ptr())
                .arg(&s.eps)
                .arg(&eval)
                .arg(&relu)
                .arg(y.ptr())
                .launch(shape.rows())?;
        }
        Ok(())
    }

    /// Backward of [`Gpu::batchnorm_train_forward`]: with `relu_out = Some(y)`, first
    /// `dy <- dy [y > 0]` in place; then writes `dx` and accumulates
    /// `daffine += [dgamma; dbeta]`.
    #[allow(clippy::too_many_arguments)]
    pub fn batchnorm_train_backward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        saved: DevView<'_>,
        relu_out: Option<DevView<'_>>,
        dy: DevViewMut<'_>,
        dx: DevViewMut<'_>,
        daffine: DevViewMut<'_>,
    ) -> Result<()> {
        let shape = check_bn(s, x, affine, relu_out)?;
        s.check_pairs("batch norm saved statistics", saved.len())?;
        s.check_like_input("batch norm output gradient", dy.len())?;
        s.check_like_input("batch norm input gradient", dx.len())?;
        s.check_pairs("batch norm parameter gradient", daffine.len())?;
        let Some(shape) = shape else { return Ok(()) };
        let mut slot = self.norm_scratch(shape.scratch_len())?;
        let scratch = slot.as_mut().expect("just allocated").dev_mut();
        let n_partials = 2 * shape.channels as usize * shape.chunks as usize;
        let coef_len = 2 * shape.channels as usize;
        let (partials, coef) = (
            scratch.as_view().slice(0..n_partials),
            scratch.as_view().slice(n_partials..n_partials + coef_len),
        );
        let mask = ptr_or_null(relu_out);
        // SAFETY: lengths checked above; the scratch holds the partials and 2 C coefficients;
        // launch shapes as kernels/norm.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.norm.grad_partial)
                .arg(x.ptr())
                .arg(&mask)
                .arg(dy.ptr())
                .arg(&shape.m)
                .arg(saved.ptr())
                .arg(partials.ptr())
                .launch(shape.rows())?;
            self.stream
                .launch_builder(&self.norm.grad_finalize)
                .arg(&shape.m)
                .arg(&shape.channels)
                .arg(&shape.chunks)
                .arg(partials.ptr())
                .arg(saved.ptr())
                .arg(daffine.ptr())
                .arg(coef.ptr())
                .launch(shape.finalize())?;
            self.stream
                .launch_builder(&self.norm.grad_apply)
                .arg(x.ptr())
                .arg(dy.ptr())
                .arg(&shape.m)
                .arg(affine.ptr())
                .arg(saved.ptr())
                .arg(coef.ptr())
                .arg(dx.ptr())
                .launch(shape.rows())?;
        }
        Ok(())
    }
}
