//! Max pooling and global average pooling on the GPU (kernels/pool.cu); every result is
//! bit-identical to the CPU twin's (src/engine/cpu/pool.rs).

use anyhow::{Result, ensure};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, GpuError, KernelSet, LoadedModule};
use super::view::{DevView, DevViewMut};
use crate::engine::{AvgPool, MaxPool, PoolOps};

/// `POOL_BLOCK` of kernels/pool.cu.
pub const POOL_BLOCK: u32 = 256;
/// The most blocks of one launch; the kernels' grid-stride loops cover the rest.
const MAX_BLOCKS: usize = 1 << 20;

/// The functions of kernels/pool.cu.
pub(super) struct PoolKernels {
    max_forward: CudaFunction,
    max_backward: CudaFunction,
    avg_forward: CudaFunction,
    avg_backward: CudaFunction,
}

impl KernelSet for PoolKernels {
    const FILE: &'static str = "pool";

    fn load(m: &LoadedModule<'_>) -> Result<Self, GpuError> {
        Ok(PoolKernels {
            max_forward: m.function("maxpool_forward")?,
            max_backward: m.function("maxpool_backward")?,
            avg_forward: m.function("avgpool_forward")?,
            avg_backward: m.function("avgpool_backward")?,
        })
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

impl PoolOps for CudaEngine {
    fn maxpool_forward(&self, s: &MaxPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        let [h, w, oh, ow, k, st, p] = check_window(s)?;
        s.check_forward(x.len(), y.len())?;
        if y.is_empty() {
            return Ok(());
        }
        let planes = s.planes as u64;
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe {
            self.stream
                .launch_builder(&self.pool.max_forward)
                .arg(x.ptr())
                .arg(&planes)
                .arg(&h)
                .arg(&w)
                .arg(&oh)
                .arg(&ow)
                .arg(&k)
                .arg(&st)
                .arg(&p)
                .arg(y.ptr())
                .launch(threads(y.len()))?;
        }
        Ok(())
    }

    fn maxpool_backward(
        &self,
        s: &MaxPool,
        x: DevView<'_>,
        dy: DevView<'_>,
        dx: DevViewMut<'_>,
    ) -> Result<()> {
        let [h, w, oh, ow, k, st, p] = check_window(s)?;
        s.check_backward(x.len(), dy.len(), dx.len())?;
        if dx.is_empty() {
            return Ok(());
        }
        let planes = s.planes as u64;
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe {
            self.stream
                .launch_builder(&self.pool.max_backward)
                .arg(x.ptr())
                .arg(dy.ptr())
                .arg(&planes)
                .arg(&h)
                .arg(&w)
                .arg(&oh)
                .arg(&ow)
                .arg(&k)
                .arg(&st)
                .arg(&p)
                .arg(dx.ptr())
                .launch(threads(dx.len()))?;
        }
        Ok(())
    }

    fn avgpool_forward(&self, s: &AvgPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        s.check_forward(x.len(), y.len())?;
        ensure!(s.spatial > 0, "average pool over empty planes");
        if y.is_empty() {
            return Ok(());
        }
        let (planes, spatial) = (s.planes as u64, s.spatial as u64);
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe {
            self.stream
                .launch_builder(&self.pool.avg_forward)
                .arg(x.ptr())
                .arg(&planes)
                .arg(&spatial)
                .arg(y.ptr())
                .launch(threads(s.planes))?;
        }
        Ok(())
    }

    fn avgpool_backward(&self, s: &AvgPool, dy: DevView<'_>, dx: DevViewMut<'_>) -> Result<()> {
        s.check_backward(dy.len(), dx.len())?;
        ensure!(s.spatial > 0, "average pool over empty planes");
        if dx.is_empty() {
            return Ok(());
        }
        let (planes, spatial) = (s.planes as u64, s.spatial as u64);
        // SAFETY: lengths checked above; any grid (kernels/pool.cu).
        unsafe {
            self.stream
                .launch_builder(&self.pool.avg_backward)
                .arg(dy.ptr())
                .arg(&planes)
                .arg(&spatial)
                .arg(dx.ptr())
                .launch(threads(dx.len()))?;
        }
        Ok(())
    }
}
