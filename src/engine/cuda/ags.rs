//! Adaptive gradient surgery and SGD on the GPU (kernels/ags.cu): one f64 reduction pass for
//! the three inner products, one fused elementwise pass for `alpha g1 + beta g2` and the
//! optimizer. Same meaning as the [`crate::engine::Engine`] methods of the same names.

use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::view::{DevSlice, DevView, DevViewMut};

use super::gpu::{AGS_DOTS_BLOCK, AGS_DOTS_GRID, Gpu};
use crate::engine::check_len;
use crate::engine::{GradDots, SgdUpdate};

impl Gpu {
    /// `g1 . g2`, `|g1|^2`, `|g2|^2` in one pass, accumulated in f64. Deterministic: the
    /// same inputs (values and alignment) give the same bits on every run and every GPU.
    pub fn grad_dots(&self, g1: DevView<'_>, g2: DevView<'_>) -> Result<GradDots> {
        let mut scratch = self.scratch();
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

    /// [`Gpu::grad_dots`] without the download: queues the two kernels, which write
    /// `{g1.g2, |g1|^2, |g2|^2}` into `out` (3 values) on the device.
    pub fn grad_dots_to(
        &self,
        g1: DevView<'_>,
        g2: DevView<'_>,
        out: DevViewMut<'_, f64>,
    ) -> Result<()> {
        let mut scratch = self.scratch();
        self.launch_grad_dots(g1, g2, &mut scratch.partials, out)
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

    /// `out = alpha g1 + beta g2`, bit-identical to the CPU engine.
    pub fn combine_grads(
        &self,
        g1: DevView<'_>,
        g2: DevView<'_>,
        alpha: f32,
        beta: f32,
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
                .launch(Gpu::elementwise_grid(g1.len(), self.ags.combine_grid))?;
        }
        Ok(())
    }

    /// The fused surgery + SGD pass of [`SgdUpdate`] over the flat parameter and momentum
    /// buffers, in place; bit-identical to the CPU engine.
    pub fn sgd_step(
        &self,
        u: &SgdUpdate,
        g1: DevView<'_>,
        g2: DevView<'_>,
        params: DevViewMut<'_>,
        momentum: DevViewMut<'_>,
    ) -> Result<()> {
        let n = params.len();
        check_len("first gradient", g1.len(), n)?;
        check_len("second gradient", g2.len(), n)?;
        check_len("momentum", momentum.len(), n)?;
        let len = n as u64;
        // SAFETY: four buffers of n values, as kernels/ags.cu's contract asks.
        unsafe {
            self.stream
                .launch_builder(&self.ags.sgd_step)
                .arg(g1.ptr())
                .arg(g2.ptr())
                .arg(params.ptr())
                .arg(momentum.ptr())
                .arg(&len)
                .arg(&u.alpha)
                .arg(&u.beta)
                .arg(&u.lr)
                .arg(&u.momentum)
                .arg(&u.weight_decay)
                .launch(Gpu::elementwise_grid(n, self.ags.sgd_step_grid))?;
        }
        Ok(())
    }
}
