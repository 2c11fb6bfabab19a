//! Max pooling and global average pooling on the GPU (kernels/pool.cu); every result is
//! bit-identical to the CPU twin's (src/engine/cpu/pool.rs).

use anyhow::{Result, ensure};
use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, kernel_set};
use super::view::{DevView, DevViewMut};
use crate::engine::{AvgPool, MaxPool, PoolOps, ViewLen};

/// `POOL_BLOCK` of kernels/pool.cu.
pub const POOL_BLOCK: u32 = 256;
/// The most blocks of one launch; the kernels' grid-stride loops cover the rest.
const MAX_BLOCKS: usize = 1 << 20;

kernel_set! {
    /// The functions of kernels/pool.cu.
    PoolKernels from "pool" {
        max_forward = "maxpool_forward",
        max_backward = "maxpool_backward",
        avg_forward = "avgpool_forward",
        avg_backward = "avgpool_backward",
    }
}

/// One thread per item.
fn threads(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(POOL_BLOCK as usize).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (POOL_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The window as the kernels' ints `[h, w, oh, ow, k, s, p]`, after checking that it is a
/// valid pooling (PyTorch's rules: `pad <= kernel / 2`, so every window holds an image value)
/// and that a plane's indices fit an int.
fn check_window(s: &MaxPool) -> Result<[i32; 7]> {
    ensure!(
        s.kernel >= 1 && s.stride >= 1,
        "max pool kernel and stride must be positive"
    );
    ensure!(
        2 * s.pad <= s.kernel,
        "max pool padding {} exceeds half the kernel {}",
        s.pad,
        s.kernel
    );
    ensure!(
        s.in_h + 2 * s.pad >= s.kernel && s.in_w + 2 * s.pad >= s.kernel,
        "max pool kernel {} larger than the padded {}x{} input",
        s.kernel,
        s.in_h,
        s.in_w
    );
    let fits = |v: usize| v <= i32::MAX as usize;
    ensure!(
        fits(s.in_h * s.in_w)
            && fits(s.in_h + 2 * s.pad)
            && fits(s.in_w + 2 * s.pad)
            && fits(s.out_h() * s.out_w()),
        "max pool planes of {}x{} are too large for the CUDA kernels",
        s.in_h,
        s.in_w
    );
    Ok([
        s.in_h,
        s.in_w,
        s.out_h(),
        s.out_w(),
        s.kernel,
        s.stride,
        s.pad,
    ]
    .map(|v| v as i32))
}

/// Pushes a window's `h, w, oh, ow, kernel, stride, pad` (the kernels' argument order).
fn window_args<'a>(launch: &mut LaunchArgs<'a>, window: &'a [i32; 7]) {
    for v in window {
        launch.arg(v);
    }
}

impl PoolOps for CudaEngine {
    fn maxpool_forward(&self, s: &MaxPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        let window = check_window(s)?;
        s.check_forward(x.len(), y.len())?;
        if y.is_empty() {
            return Ok(());
        }
        let planes = s.planes as u64;
        let mut launch = self.stream.launch_builder(&self.pool.max_forward);
        launch.arg(x.ptr()).arg(&planes);
        window_args(&mut launch, &window);
        launch.arg(y.ptr());
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe { launch.launch(threads(y.len())) }?;
        Ok(())
    }

    fn maxpool_backward(
        &self,
        s: &MaxPool,
        x: DevView<'_>,
        dy: DevView<'_>,
        dx: DevViewMut<'_>,
    ) -> Result<()> {
        let window = check_window(s)?;
        s.check_backward(x.len(), dy.len(), dx.len())?;
        if dx.is_empty() {
            return Ok(());
        }
        let planes = s.planes as u64;
        let mut launch = self.stream.launch_builder(&self.pool.max_backward);
        launch.arg(x.ptr()).arg(dy.ptr()).arg(&planes);
        window_args(&mut launch, &window);
        launch.arg(dx.ptr());
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe { launch.launch(threads(dx.len())) }?;
        Ok(())
    }

    fn avgpool_forward(&self, s: &AvgPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        s.check_forward(x.len(), y.len())?;
        self.launch_avgpool(&self.pool.avg_forward, s, x, y)
    }

    fn avgpool_backward(&self, s: &AvgPool, dy: DevView<'_>, dx: DevViewMut<'_>) -> Result<()> {
        s.check_backward(dy.len(), dx.len())?;
        self.launch_avgpool(&self.pool.avg_backward, s, dy, dx)
    }
}

impl CudaEngine {
    /// One average-pool kernel from `input` to `output` (lengths checked by the caller), one
    /// thread per output value.
    fn launch_avgpool(
        &self,
        kernel: &CudaFunction,
        s: &AvgPool,
        input: DevView<'_>,
        output: DevViewMut<'_>,
    ) -> Result<()> {
        ensure!(s.spatial > 0, "average pool over empty planes");
        if output.is_empty() {
            return Ok(());
        }
        let (planes, spatial) = (s.planes as u64, s.spatial as u64);
        // SAFETY: lengths checked by the caller; any grid (kernels/pool.cu).
        unsafe {
            self.stream
                .launch_builder(kernel)
                .arg(input.ptr())
                .arg(&planes)
                .arg(&spatial)
                .arg(output.ptr())
                .launch(threads(output.len()))?;
        }
        Ok(())
    }
}
