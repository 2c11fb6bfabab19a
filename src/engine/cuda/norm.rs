//! Batch normalization on the GPU (kernels/norm.cu): each channel row is split into chunks of
//! `NORM_CHUNK` values, so that even a few channels of millions of values fill the GPU; the
//! chunks' f64 partial sums are combined per channel by a finalize kernel, and an elementwise
//! pass over the same chunks applies the result. The CPU twin is src/engine/cpu/norm.rs.

use std::sync::{Mutex, MutexGuard};

use anyhow::{Result, ensure};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, kernel_set};
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::{BatchNorm, BnBackward, BnForward, BnStats, NormOps};

/// `NORM_BLOCK` of kernels/norm.cu.
pub const NORM_BLOCK: u32 = 256;
/// `NORM_CHUNK` of kernels/norm.cu: values of a channel row per block.
pub const NORM_CHUNK: usize = 4096;
/// `NORM_WARPS` of kernels/norm.cu: channels per block of the finalize kernels.
const NORM_WARPS: u32 = NORM_BLOCK / 32;
/// The most channels one launch takes (the grid's y dimension).
const MAX_CHANNELS: usize = 65_535;

kernel_set! {
    /// The functions of kernels/norm.cu, and the f64 scratch of their partial sums (grown on
    /// demand, reused across calls; every op runs on the one stream, in order).
    NormKernels from "norm" {
        stats_partial = "bn_stats_partial",
        stats_finalize = "bn_stats_finalize",
        apply = "bn_apply",
        grad_partial = "bn_grad_partial",
        grad_finalize = "bn_grad_finalize",
        grad_apply = "bn_grad_apply",
    }
    state |_m| {
        partials: Mutex<Option<CudaSlice<f64>>> = Mutex::new(None),
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

/// Checks that the shape fits the kernels' launch shape (the buffers are checked by the op's
/// arguments). None when there is nothing to do (no channels).
fn launch_shape(s: &BatchNorm) -> Result<Option<Shape>> {
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

impl NormOps for CudaEngine {
    fn batchnorm_forward(&self, s: &BatchNorm, mut a: BnForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let Some(shape) = launch_shape(s)? else {
            return Ok(());
        };
        // bn_apply normalizes with the batch's [mean; invstd] or the running [mean; var].
        let (stats, eval) = match &mut a.stats {
            BnStats::Batch { saved, running } => {
                self.launch_bn_stats(&shape, s, a.x, saved.reborrow(), running.reborrow())?;
                (saved.as_view(), 0i32)
            }
            BnStats::Running(running) => (*running, 1),
        };
        let relu = a.relu as i32;
        let res = ptr_or_null(a.residual);
        // SAFETY: lengths checked above; launch shape as kernels/norm.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.norm.apply)
                .arg(a.x.ptr())
                .arg(&res)
                .arg(&shape.m)
                .arg(a.affine.ptr())
                .arg(stats.ptr())
                .arg(&s.eps)
                .arg(&eval)
                .arg(&relu)
                .arg(a.y.ptr())
                .launch(shape.rows())?;
        }
        Ok(())
    }

    fn batchnorm_backward(&self, s: &BatchNorm, a: BnBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let Some(shape) = launch_shape(s)? else {
            return Ok(());
        };
        let mut slot = self.norm_scratch(shape.scratch_len())?;
        let scratch = slot.as_mut().expect("just allocated").dev_mut();
        let n_partials = 2 * shape.channels as usize * shape.chunks as usize;
        let coef_len = 2 * shape.channels as usize;
        let (partials, coef) = (
            scratch.as_view().slice(0..n_partials),
            scratch.as_view().slice(n_partials..n_partials + coef_len),
        );
        let mask = ptr_or_null(a.relu_out);
        // SAFETY: lengths checked above; the scratch holds the partials and 2 C coefficients;
        // launch shapes as kernels/norm.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.norm.grad_partial)
                .arg(a.x.ptr())
                .arg(&mask)
                .arg(a.dy.ptr())
                .arg(&shape.m)
                .arg(a.saved.ptr())
                .arg(partials.ptr())
                .launch(shape.rows())?;
            self.stream
                .launch_builder(&self.norm.grad_finalize)
                .arg(&shape.m)
                .arg(&shape.channels)
                .arg(&shape.chunks)
                .arg(partials.ptr())
                .arg(a.saved.ptr())
                .arg(a.daffine.ptr())
                .arg(coef.ptr())
                .launch(shape.finalize())?;
            self.stream
                .launch_builder(&self.norm.grad_apply)
                .arg(a.x.ptr())
                .arg(a.dy.ptr())
                .arg(&shape.m)
                .arg(a.affine.ptr())
                .arg(a.saved.ptr())
                .arg(coef.ptr())
                .arg(a.dx.ptr())
                .launch(shape.rows())?;
        }
        Ok(())
    }
}

impl CudaEngine {
    /// The partial-sum scratch, at least `len` doubles.
    fn norm_scratch(&self, len: usize) -> Result<MutexGuard<'_, Option<CudaSlice<f64>>>> {
        // A panic while holding it leaves only a device buffer, which stays valid.
        let mut slot = self.norm.partials.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|p| p.len() < len) {
            *slot = None;
            // SAFETY: every value is written by a kernel before it is read (kernels/norm.cu).
            *slot = Some(unsafe { self.stream.alloc::<f64>(len.max(1024)) }?);
        }
        Ok(slot)
    }

    /// The batch's statistics into `saved = [mean; invstd]`, and the running `[mean; var]`
    /// updated (buffers checked by the caller).
    fn launch_bn_stats(
        &self,
        shape: &Shape,
        s: &BatchNorm,
        x: DevView<'_>,
        saved: DevViewMut<'_>,
        running: DevViewMut<'_>,
    ) -> Result<()> {
        let mut slot = self.norm_scratch(shape.scratch_len())?;
        let partials = slot.as_mut().expect("just allocated").dev_mut();
        // SAFETY: the scratch holds 2 C chunks doubles; launch shapes as kernels/norm.cu's
        // contract asks.
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
        Ok(())
    }
}
