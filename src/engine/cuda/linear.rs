//! Linear layers on feature-major `[features, N]` matrices on the GPU: `Y = W X + b` as one
//! cuBLAS product and kernels/linear.cu for the bias, the ReLU and the bias gradient; the
//! CPU twin is src/engine/cpu/linear.rs. Column-major, the row-major `[out, N]` output is
//! `Y^T[N, out] = X^T[N, in] W^T[in, out]`.

use anyhow::{Result, ensure};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::blas::Operand;
use super::runtime::{CudaEngine, kernel_set};
use crate::engine::{Linear, LinearBackward, LinearForward, LinearOps, ViewLen};

/// `LINEAR_BLOCK` of kernels/linear.cu.
pub const LINEAR_BLOCK: u32 = 256;

kernel_set! {
    /// The functions of kernels/linear.cu.
    LinearKernels from "linear" {
        bias_act = "linear_bias_act",
        relu_mask = "relu_mask",
        bias_grad = "linear_bias_grad",
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(LINEAR_BLOCK as usize).clamp(1, 4096) as u32,
            1,
            1,
        ),
        block_dim: (LINEAR_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_linear(s: &Linear) -> Result<(u32, u32)> {
    ensure!(
        u32::try_from(s.out_features * s.batch).is_ok()
            && u32::try_from(s.in_features * s.batch).is_ok(),
        "linear layer too large for the CUDA kernels: {s:?}"
    );
    Ok((s.out_features as u32, s.batch as u32))
}

impl LinearOps for CudaEngine {
    fn linear_forward(&self, s: &Linear, a: LinearForward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let LinearForward { x, wb, relu, y } = a;
        let (rows, cols) = check_linear(s)?;
        let (n, din, dout) = (s.batch, s.in_features, s.out_features);
        let bias = wb.slice(dout * din..s.param_len());
        // SAFETY: x is [in, N], W [out, in], y [out, N] (lengths checked).
        unsafe {
            self.gemm(
                (n, dout, din),
                Operand::n(*x.ptr(), n),
                Operand::n(*wb.ptr(), din),
                0.0,
                *y.ptr(),
                n,
            )?;
            self.stream
                .launch_builder(&self.linear.bias_act)
                .arg(y.ptr())
                .arg(bias.ptr())
                .arg(&rows)
                .arg(&cols)
                .arg(&i32::from(relu))
                .launch(elementwise(y.len()))?;
        }
        Ok(())
    }

    fn linear_backward(&self, s: &Linear, a: LinearBackward<'_, Self>) -> Result<()> {
        a.check(s)?;
        let LinearBackward {
            x,
            wb,
            relu_out,
            dy,
            dwb,
            dx,
        } = a;
        let out_len = s.out_features * s.batch;
        let (rows, cols) = check_linear(s)?;
        let (n, din, dout) = (s.batch, s.in_features, s.out_features);
        let dw = *dwb.ptr();
        let db = dwb.slice_mut(dout * din..s.param_len());
        // SAFETY: shapes as in linear_forward, lengths checked.
        unsafe {
            if let Some(y) = relu_out {
                let len = out_len as u64;
                self.stream
                    .launch_builder(&self.linear.relu_mask)
                    .arg(dy.ptr())
                    .arg(y.ptr())
                    .arg(&len)
                    .launch(elementwise(out_len))?;
            }
            // dW^T[in, out] += X[in, N] dY^T[N, out]
            self.gemm(
                (din, dout, n),
                Operand::t(*x.ptr(), n),
                Operand::n(*dy.ptr(), n),
                1.0,
                dw,
                din,
            )?;
            let warps = LINEAR_BLOCK / 32;
            self.stream
                .launch_builder(&self.linear.bias_grad)
                .arg(dy.ptr())
                .arg(&rows)
                .arg(&cols)
                .arg(db.ptr())
                .launch(LaunchConfig {
                    grid_dim: (rows.div_ceil(warps).max(1), 1, 1),
                    block_dim: (LINEAR_BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                })?;
            // dX^T[N, in] += dY^T[N, out] W[out, in]
            if let Some(dx) = dx {
                self.gemm(
                    (n, din, dout),
                    Operand::n(*dy.ptr(), n),
                    Operand::t(*wb.ptr(), din),
                    1.0,
                    *dx.ptr(),
                    n,
                )?;
            }
        }
        Ok(())
    }
}
