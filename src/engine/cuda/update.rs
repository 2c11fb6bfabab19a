//! Adaptive gradient surgery and SGD on the GPU (kernels/ags.cu): one f64 reduction pass for
//! the three inner products, one fused elementwise pass for `alpha g1 + beta g2` and the
//! optimizer. The CPU twin is src/engine/cpu/update.rs; both passes are bit-identical to it.

use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, GpuError, LoadedModule, driver, kernel_set};
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::{GradDots, SgdBuffers, SgdUpdate, UpdateOps, ViewLen, check_len};

/// Grid of `ags_dots_partial`: a constant, so that the reduction's order, and therefore its
/// result, is the same on every GPU (see kernels/ags.cu).
const AGS_DOTS_GRID: u32 = 1024;
/// `AGS_DOTS_BLOCK` of kernels/ags.cu.
pub const AGS_DOTS_BLOCK: u32 = 256;
/// `AGS_UPDATE_BLOCK` of kernels/ags.cu.
pub const AGS_UPDATE_BLOCK: u32 = 256;

kernel_set! {
    /// The functions of kernels/ags.cu, the resident grid (blocks per multiprocessor at
    /// `AGS_UPDATE_BLOCK` threads, times the multiprocessors) of each elementwise one, and the
    /// reduction's device scratch.
    AgsKernels from "ags" {
        dots_partial = "ags_dots_partial",
        dots_finalize = "ags_dots_finalize",
        sgd_step = "ags_sgd_step",
        combine = "ags_combine",
    }
    state |m| {
        sgd_step_grid: u32 = m.resident_grid(&m.function("ags_sgd_step")?, AGS_UPDATE_BLOCK)?,
        combine_grid: u32 = m.resident_grid(&m.function("ags_combine")?, AGS_UPDATE_BLOCK)?,
        scratch: Mutex<DotsScratch> = Mutex::new(DotsScratch {
            partials: alloc(m, 3 * AGS_DOTS_GRID as usize)?,
            dots: alloc(m, 3)?,
        }),
    }
}

/// A zeroed device buffer for the reduction.
fn alloc(m: &LoadedModule<'_>, len: usize) -> Result<CudaSlice<f64>, GpuError> {
    m.stream()
        .alloc_zeros(len)
        .map_err(driver("allocating the surgery's scratch"))
}

/// The partial sums of `ags_dots_partial` (`3 * AGS_DOTS_GRID`) and the three results.
struct DotsScratch {
    partials: CudaSlice<f64>,
    dots: CudaSlice<f64>,
}

/// Blocks for an elementwise pass over `n` values: enough for one float4 per thread, capped
/// at the kernel's resident grid `max_blocks` (one wave; the grid-stride loop does the rest).
fn elementwise_grid(n: usize, max_blocks: u32) -> LaunchConfig {
    let per_block = 4 * AGS_UPDATE_BLOCK as usize;
    let blocks = n.div_ceil(per_block).clamp(1, max_blocks as usize);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (AGS_UPDATE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl UpdateOps for CudaEngine {
    /// Deterministic: the same inputs (values and alignment) give the same bits on every run
    /// and every GPU.
    fn grad_dots(&self, g1: DevView<'_>, g2: DevView<'_>) -> Result<GradDots> {
        let mut scratch = self.dots_scratch();
        let scratch = &mut *scratch;
        let out = scratch.dots.dev_mut();
        self.launch_grad_dots(g1, g2, &mut scratch.partials, out)?;
        let [g1g2, g1g1, g2g2]: [f64; 3] = self
            .stream
            .clone_dtoh(&scratch.dots)?
            .try_into()
            .expect("three values");
        Ok(GradDots { g1g2, g1g1, g2g2 })
    }

    fn combine_grads(
        &self,
        (alpha, beta): (f32, f32),
        g1: DevView<'_>,
        g2: DevView<'_>,
        out: DevViewMut<'_>,
    ) -> Result<()> {
        check_len("second gradient", g2.len(), g1.len())?;
        check_len("combined gradient", out.len(), g1.len())?;
        let n = g1.len() as u64;
        // SAFETY: three buffers of n values, as kernels/ags.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.ags.combine)
                .arg(g1.ptr())
                .arg(g2.ptr())
                .arg(out.ptr())
                .arg(&n)
                .arg(&alpha)
                .arg(&beta)
                .launch(elementwise_grid(g1.len(), self.ags.combine_grid))?;
        }
        Ok(())
    }

    fn sgd_step(&self, u: &SgdUpdate, a: SgdBuffers<'_, Self>) -> Result<()> {
        a.check()?;
        let n = a.params.len();
        let len = n as u64;
        // SAFETY: four buffers of n values, as kernels/ags.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.ags.sgd_step)
                .arg(a.g1.ptr())
                .arg(a.g2.ptr())
                .arg(a.params.ptr())
                .arg(a.momentum.ptr())
                .arg(&len)
                .arg(&u.alpha)
                .arg(&u.beta)
                .arg(&u.lr)
                .arg(&u.momentum)
                .arg(&u.weight_decay)
                .launch(elementwise_grid(n, self.ags.sgd_step_grid))?;
        }
        Ok(())
    }
}

impl CudaEngine {
    /// [`UpdateOps::grad_dots`] without the download: queues the two kernels, which write
    /// `{g1.g2, |g1|^2, |g2|^2}` into `out` (3 values) on the device.
    pub fn grad_dots_to(
        &self,
        g1: DevView<'_>,
        g2: DevView<'_>,
        out: DevViewMut<'_, f64>,
    ) -> Result<()> {
        let mut scratch = self.dots_scratch();
        self.launch_grad_dots(g1, g2, &mut scratch.partials, out)
    }

    fn dots_scratch(&self) -> std::sync::MutexGuard<'_, DotsScratch> {
        // A panic while holding it leaves only device buffers, which stay valid.
        self.ags.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn launch_grad_dots(
        &self,
        g1: DevView<'_>,
        g2: DevView<'_>,
        partials: &mut CudaSlice<f64>,
        out: DevViewMut<'_, f64>,
    ) -> Result<()> {
        check_len("second gradient", g2.len(), g1.len())?;
        check_len("inner products", out.len(), 3)?;
        let n = g1.len() as u64;
        let cfg = LaunchConfig {
            grid_dim: (AGS_DOTS_GRID, 1, 1),
            block_dim: (AGS_DOTS_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types, sizes and the launch shapes follow kernels/ags.cu's contract
        // (partials holds 3 * AGS_DOTS_GRID values).
        unsafe {
            self.stream
                .launch_builder(&self.ags.dots_partial)
                .arg(g1.ptr())
                .arg(g2.ptr())
                .arg(&n)
                .arg(&mut *partials)
                .launch(cfg)?;
            self.stream
                .launch_builder(&self.ags.dots_finalize)
                .arg(&*partials)
                .arg(&AGS_DOTS_GRID)
                .arg(out.ptr())
                .launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    ..cfg
                })?;
        }
        Ok(())
    }
}
