//! 2-D convolution on the GPU as im2col (kernels/conv.cu) + cuBLAS products over the
//! channel-major `[C, N, H, W]` batch, chunked over the images so that the unfolded matrix
//! stays within [`COLS_BUDGET`]; the CPU twin is src/engine/cpu/conv.rs.
//!
//! Per chunk of `nb` images (`P = Ho*Wo` outputs each, `K = Cin*k*k`):
//! forward `Y[:, chunk] = W cols`, backward `dW += dY[:, chunk] cols^T` (accumulated across
//! the chunks in a fixed order) and `dX[:, chunk] += fold(W^T dY[:, chunk])`. A 1x1 stride-1
//! convolution needs no unfolding: `X` itself is `cols` for the whole batch.
//!
//! In cuBLAS's column-major terms a row-major `[r, c]` matrix with row stride `ld` is its
//! transpose, so `Y = W cols` is computed as `Y^T[cn, Cout] = cols^T[cn, K] W^T[K, Cout]`.

use anyhow::{Result, ensure};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::blas::Operand;
use super::runtime::{CudaEngine, kernel_set};
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::{Conv2d, ConvBackward, ConvOps, ViewLen};

/// `CONV_BLOCK` of kernels/conv.cu.
pub const CONV_BLOCK: u32 = 256;

/// Upper bound on one chunk's unfolded matrix, in f32 values (256 MiB): large enough that
/// the products are not skinny, small enough to sit beside the activations.
const COLS_BUDGET: usize = 64 << 20;

kernel_set! {
    /// The functions of kernels/conv.cu.
    ConvKernels from "conv" {
        im2col = "conv_im2col",
        col2im = "conv_col2im",
    }
}

/// `ConvShape` of kernels/conv.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvShape {
    batch: u32,
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    kernel: u32,
    stride: u32,
    pad: u32,
}

// SAFETY: a plain struct of u32s with the kernel's layout.
unsafe impl cudarc::driver::DeviceRepr for ConvShape {}

fn is_pointwise(s: &Conv2d) -> bool {
    s.kernel == 1 && s.stride == 1 && s.pad == 0
}

/// Images per chunk.
fn chunk_images(s: &Conv2d) -> usize {
    let per_image = s.in_channels * s.kernel * s.kernel * s.out_h() * s.out_w();
    (COLS_BUDGET / per_image.max(1)).clamp(1, s.batch.max(1))
}

/// Checks the shape against the kernels' index types and returns it in their form.
fn conv_shape(s: &Conv2d) -> Result<ConvShape> {
    ensure!(
        s.kernel > 0
            && s.stride > 0
            && s.in_h + 2 * s.pad >= s.kernel
            && s.in_w + 2 * s.pad >= s.kernel,
        "convolution shape {s:?} has no output"
    );
    let rows = s.in_channels * s.kernel * s.kernel;
    ensure!(
        rows <= 65535,
        "convolution with {rows} unfolded rows is beyond the CUDA kernels' 65535"
    );
    let fits = |v: usize| u32::try_from(v).is_ok();
    ensure!(
        fits(s.batch * s.in_h * s.in_w) && fits(s.batch * s.out_h() * s.out_w()),
        "convolution batch too large for the CUDA kernels: {s:?}"
    );
    Ok(ConvShape {
        batch: s.batch as u32,
        in_h: s.in_h as u32,
        in_w: s.in_w as u32,
        out_h: s.out_h() as u32,
        out_w: s.out_w() as u32,
        kernel: s.kernel as u32,
        stride: s.stride as u32,
        pad: s.pad as u32,
    })
}

/// Grid for `rows` rows of `row_len` values: at most 1024 blocks per row (grid-stride).
fn rows_grid(rows: usize, row_len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            row_len.div_ceil(CONV_BLOCK as usize).clamp(1, 1024) as u32,
            rows as u32,
            1,
        ),
        block_dim: (CONV_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Offset by `values` f32s.
fn at(ptr: &CUdeviceptr, values: usize) -> CUdeviceptr {
    ptr + 4 * values as CUdeviceptr
}

impl ConvOps for CudaEngine {
    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: DevView<'_>,
        w: DevView<'_>,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        let shape = conv_shape(s)?;
        let (k, cout) = (s.in_channels * s.kernel * s.kernel, s.out_channels);
        let plane = s.out_h() * s.out_w();
        let ld_y = s.batch * plane;
        if is_pointwise(s) {
            // SAFETY: x is [Cin, N*P], w [Cout, Cin], y [Cout, N*P] (lengths checked).
            return unsafe {
                self.gemm(
                    (ld_y, cout, k),
                    Operand::n(*x.ptr(), ld_y),
                    Operand::n(*w.ptr(), k),
                    0.0,
                    *y.ptr(),
                    ld_y,
                )
            };
        }
        let chunk = chunk_images(s);
        let mut cols = self.scratch_f32(k * chunk * plane)?;
        for n0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - n0);
            let cn = nb * plane;
            let unfold = (*x.ptr(), *cols.dev_mut().ptr());
            self.launch_fold(&self.conv.im2col, &shape, unfold, (n0, nb), (k, cn))?;
            // SAFETY: cols holds [K, cn]; y's chunk is columns n0*P.. of [Cout, N*P].
            unsafe {
                self.gemm(
                    (cn, cout, k),
                    Operand::n(*cols.dev().ptr(), cn),
                    Operand::n(*w.ptr(), k),
                    0.0,
                    at(y.ptr(), n0 * plane),
                    ld_y,
                )?;
            }
        }
        Ok(())
    }

    fn conv2d_backward(&self, s: &Conv2d, a: ConvBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let ConvBackward { x, w, dy, dw, dx } = a;
        let shape = conv_shape(s)?;
        let (k, cout) = (s.in_channels * s.kernel * s.kernel, s.out_channels);
        let plane = s.out_h() * s.out_w();
        let ld_y = s.batch * plane;
        if is_pointwise(s) {
            // SAFETY: as in conv2d_forward; dx is [Cin, N*P] like x.
            unsafe {
                // dW^T[Cin, Cout] += X[Cin, NP] dY^T[NP, Cout]
                self.gemm(
                    (k, cout, ld_y),
                    Operand::t(*x.ptr(), ld_y),
                    Operand::n(*dy.ptr(), ld_y),
                    1.0,
                    *dw.ptr(),
                    k,
                )?;
                // dX^T[NP, Cin] += dY^T[NP, Cout] W[Cout, Cin]
                if let Some(dx) = dx {
                    self.gemm(
                        (ld_y, k, cout),
                        Operand::n(*dy.ptr(), ld_y),
                        Operand::t(*w.ptr(), k),
                        1.0,
                        *dx.ptr(),
                        ld_y,
                    )?;
                }
            }
            return Ok(());
        }
        let chunk = chunk_images(s);
        let mut cols = self.scratch_f32(k * chunk * plane)?;
        for n0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - n0);
            let cn = nb * plane;
            let dy_chunk = at(dy.ptr(), n0 * plane);
            let cols_ptr = *cols.dev_mut().ptr();
            self.launch_fold(
                &self.conv.im2col,
                &shape,
                (*x.ptr(), cols_ptr),
                (n0, nb),
                (k, cn),
            )?;
            // SAFETY: cols holds [K, cn]; dy's chunk is columns n0*P.. of [Cout, N*P].
            unsafe {
                // dW^T[K, Cout] += cols[K, cn] dY_chunk^T[cn, Cout]
                self.gemm(
                    (k, cout, cn),
                    Operand::t(cols_ptr, cn),
                    Operand::n(dy_chunk, ld_y),
                    1.0,
                    *dw.ptr(),
                    k,
                )?;
            }
            if let Some(dx) = &dx {
                // SAFETY: as above; the product overwrites cols after the dW product read
                // it (one stream, in order).
                unsafe {
                    // dcols^T[cn, K] = dY_chunk^T[cn, Cout] W[Cout, K]
                    self.gemm(
                        (cn, k, cout),
                        Operand::n(dy_chunk, ld_y),
                        Operand::t(*w.ptr(), k),
                        0.0,
                        cols_ptr,
                        cn,
                    )?;
                }
                let pixels = nb * s.in_h * s.in_w;
                let fold = (cols_ptr, *dx.ptr());
                let grid = (s.in_channels, pixels);
                self.launch_fold(&self.conv.col2im, &shape, fold, (n0, nb), grid)?;
            }
        }
        Ok(())
    }
}

impl CudaEngine {
    /// Images `n0..n0 + nb` unfolded (`conv_im2col`: the batch `x` into `cols[K, nb P]`),
    /// or folded back (`conv_col2im`: `cols` added into the batch `dx`): both take the same
    /// arguments, over a grid of `rows` rows of `row_len` values.
    fn launch_fold(
        &self,
        kernel: &CudaFunction,
        shape: &ConvShape,
        (src, dst): (CUdeviceptr, CUdeviceptr),
        (n0, nb): (usize, usize),
        (rows, row_len): (usize, usize),
    ) -> Result<()> {
        let (n0, nb) = (n0 as u32, nb as u32);
        // SAFETY: the batch side holds the whole batch, the unfolded side at least
        // rows * row_len values (the caller sized it for the largest chunk); indices fit u32
        // (conv_shape).
        unsafe {
            self.stream
                .launch_builder(kernel)
                .arg(&src)
                .arg(shape)
                .arg(&n0)
                .arg(&nb)
                .arg(&dst)
                .launch(rows_grid(rows, row_len))?;
        }
        Ok(())
    }
}
