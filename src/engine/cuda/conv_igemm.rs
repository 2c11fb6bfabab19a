//! The forward convolution as one implicit-GEMM kernel (kernels/conv_igemm.cu): the same
//! result as [`Gpu::conv2d_forward`] (im2col + cuBLAS, src/engine/cuda/conv.rs) without the
//! unfolded matrix, which it never writes or reads back. A benchmarked alternative
//! (`slam bench kernels`); the engine still runs [`Gpu::conv2d_forward`].
//!
//! The Gpu's [`MatmulMode`] picks the arithmetic: `Exact` runs the f32 FFMA kernels (k summed
//! in order), `Tf32` the TF32 tensor-core kernels (mma.sync m16n8k8), and `Bf16` the TF32
//! ones too (no bf16 kernel: TF32 keeps more mantissa bits than bf16 at the same speed
//! class). Layers with at most 64 output channels take the 64-row block tile, the others the
//! 128-row one.

use std::sync::Arc;

use anyhow::{Result, ensure};
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::blas::MatmulMode;
use super::gpu::{Gpu, GpuError, load_function};
use super::view::{DevView, DevViewMut};
use crate::engine::Conv2d;

/// `IGEMM_THREADS` of kernels/conv_igemm.cu.
pub const IGEMM_THREADS: u32 = 256;
/// `IGEMM_BN` of kernels/conv_igemm.cu: output pixels per block.
const IGEMM_BN: usize = 128;

/// The functions of kernels/conv_igemm.cu.
pub(super) struct ConvIgemmKernels {
    f32_m64: CudaFunction,
    f32_m128: CudaFunction,
    tf32_m64: CudaFunction,
    tf32_m128: CudaFunction,
}

impl ConvIgemmKernels {
    pub fn load(m: &Arc<CudaModule>) -> Result<Self, GpuError> {
        Ok(Self {
            f32_m64: load_function(m, "conv_igemm_f32_m64")?,
            f32_m128: load_function(m, "conv_igemm_f32_m128")?,
            tf32_m64: load_function(m, "conv_igemm_tf32_m64")?,
            tf32_m128: load_function(m, "conv_igemm_tf32_m128")?,
        })
    }
}

/// `IgemmShape` of kernels/conv_igemm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct IgemmShape {
    batch: u32,
    cin: u32,
    cout: u32,
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    kernel: u32,
    stride: u32,
    pad: u32,
}

// SAFETY: a plain struct of u32s with the kernel's layout.
unsafe impl cudarc::driver::DeviceRepr for IgemmShape {}

/// Checks the shape against the kernel's index types and returns it in its form.
fn igemm_shape(s: &Conv2d) -> Result<IgemmShape> {
    ensure!(
        s.kernel > 0
            && s.stride > 0
            && s.in_h + 2 * s.pad >= s.kernel
            && s.in_w + 2 * s.pad >= s.kernel,
        "convolution shape {s:?} has no output"
    );
    let fits_i32 = |v: usize| i32::try_from(v).is_ok();
    ensure!(
        fits_i32(s.batch * s.in_h * s.in_w)
            && fits_i32(s.batch * s.out_h() * s.out_w())
            && fits_i32(s.in_channels * s.kernel * s.kernel)
            && fits_i32(s.out_channels)
            && fits_i32(s.in_h + s.pad + s.kernel)
            && fits_i32(s.in_w + s.pad + s.kernel),
        "convolution too large for the implicit-GEMM kernel: {s:?}"
    );
    let u = |v: usize| v as u32;
    Ok(IgemmShape {
        batch: u(s.batch),
        cin: u(s.in_channels),
        cout: u(s.out_channels),
        in_h: u(s.in_h),
        in_w: u(s.in_w),
        out_h: u(s.out_h()),
        out_w: u(s.out_w()),
        kernel: u(s.kernel),
        stride: u(s.stride),
        pad: u(s.pad),
    })
}

impl Gpu {
    /// `y = conv(x, w)` by the implicit-GEMM kernel; `y` is written. Means what
    /// [`Gpu::conv2d_forward`] means.
    pub fn conv2d_forward_igemm(
        &self,
        s: &Conv2d,
        x: DevView<'_>,
        w: DevView<'_>,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        let shape = igemm_shape(s)?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let tensor_cores = self.matmul_mode() != MatmulMode::Exact;
        let (f, rows) = match (tensor_cores, s.out_channels <= 64) {
            (false, true) => (&self.conv_igemm.f32_m64, 64),
            (false, false) => (&self.conv_igemm.f32_m128, 128),
            (true, true) => (&self.conv_igemm.tf32_m64, 64),
            (true, false) => (&self.conv_igemm.tf32_m128, 128),
        };
        let pixels = s.batch * s.out_h() * s.out_w();
        let grid_y = s.out_channels.div_ceil(rows);
        ensure!(
            grid_y <= 65535,
            "convolution with {} output channels is beyond the implicit-GEMM grid",
            s.out_channels
        );
        let cfg = LaunchConfig {
            grid_dim: (pixels.div_ceil(IGEMM_BN) as u32, grid_y as u32, 1),
            block_dim: (IGEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x is [Cin, N, H, W], w [Cout, Cin*k*k], y [Cout, N*Ho*Wo] (lengths
        // checked); the kernel reads and writes only within them, and its indices fit their
        // types (igemm_shape).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x.ptr())
                .arg(w.ptr())
                .arg(&shape)
                .arg(y.ptr())
                .launch(cfg)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(batch: usize, cin: usize, hw: usize, kernel: usize, stride: usize) -> Conv2d {
        Conv2d {
            batch,
            in_channels: cin,
            out_channels: 64,
            in_h: hw,
            in_w: hw,
            kernel,
            stride,
            pad: kernel / 2,
        }
    }

    #[test]
    fn igemm_shape_takes_the_reference_shapes_and_refuses_oversized_ones() {
        let stem = igemm_shape(&conv(128, 3, 224, 7, 2)).unwrap();
        assert_eq!((stem.out_h, stem.out_w, stem.pad), (112, 112, 3));
        igemm_shape(&conv(128, 64, 56, 3, 1)).unwrap();
        // batch * H * W past i32.
        let err = igemm_shape(&conv(1 << 16, 3, 256, 3, 1)).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        // A kernel larger than the padded image.
        let mut s = conv(1, 3, 4, 7, 1);
        s.pad = 0;
        assert!(igemm_shape(&s).is_err());
    }
}
