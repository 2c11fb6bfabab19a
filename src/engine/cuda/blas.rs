//! The matrix products of the convolutions and linear layers: cuBLAS `gemmEx` on f32
//! matrices, with the compute mode an explicit switch ([`MatmulMode`]).

use anyhow::{Result, ensure};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdeviceptr;

use super::runtime::CudaEngine;
use super::view::DevSlice;

/// How the f32 products of the network's layers use the tensor cores. The inputs, outputs
/// and accumulation stay f32 in every mode; the losses' small products are always exact.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MatmulMode {
    /// Full f32 multiplies (no tensor cores): matches the CPU engine to f32 rounding.
    #[default]
    Exact,
    /// Inputs rounded to TF32 (10-bit mantissa) on the tensor cores, as PyTorch's
    /// allow_tf32.
    Tf32,
    /// Inputs rounded to bf16 (7-bit mantissa) on the tensor cores, f32 accumulation.
    Bf16,
}

impl MatmulMode {
    fn compute_type(self) -> cublasComputeType_t {
        match self {
            MatmulMode::Exact => cublasComputeType_t::CUBLAS_COMPUTE_32F,
            MatmulMode::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            MatmulMode::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }
}

/// One operand of a column-major product: a device address, whether it is transposed, and
/// its leading dimension (in values).
#[derive(Clone, Copy, Debug)]
pub(super) struct Operand {
    pub ptr: CUdeviceptr,
    pub transposed: bool,
    pub ld: usize,
}

impl Operand {
    pub fn n(ptr: CUdeviceptr, ld: usize) -> Self {
        Self {
            ptr,
            transposed: false,
            ld,
        }
    }
    pub fn t(ptr: CUdeviceptr, ld: usize) -> Self {
        Self {
            ptr,
            transposed: true,
            ld,
        }
    }
}

fn op(transposed: bool) -> cublasOperation_t {
    if transposed {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

fn dim(what: &str, v: usize) -> Result<i32> {
    ensure!(
        v <= i32::MAX as usize,
        "matrix {what} {v} exceeds cuBLAS's int range"
    );
    Ok(v as i32)
}

impl CudaEngine {
    /// The device's matrix rate in the current [`MatmulMode`]: FLOP/s of a square 8192
    /// product of two distinct random matrices (the best of five, after two warm-up runs;
    /// constant operands would flatter the tensor cores, whose power draw depends on the
    /// data). The ceiling the training step's FLOP/s is compared with.
    pub fn matmul_rate(&self) -> Result<f64> {
        use rand::{Rng, SeedableRng};
        const SIDE: usize = 8192;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x6d61746d);
        let mut random = || -> Vec<f32> {
            (0..SIDE * SIDE)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        };
        let (a, b) = (self.upload(&random())?, self.upload(&random())?);
        let mut c = self.zeros::<f32>(SIDE * SIDE)?;
        let (pa, pb, pc) = (*a.dev().ptr(), *b.dev().ptr(), *c.dev_mut().ptr());
        // SAFETY: a, b and c each hold one SIDE x SIDE matrix.
        let run = || unsafe {
            self.gemm(
                (SIDE, SIDE, SIDE),
                Operand::n(pa, SIDE),
                Operand::n(pb, SIDE),
                0.0,
                pc,
                SIDE,
            )
        };
        run()?;
        run()?;
        let mut best = f32::INFINITY;
        for _ in 0..5 {
            best = best.min(self.time_ms(run)?);
        }
        Ok(2.0 * (SIDE as f64).powi(3) / (best as f64 * 1e-3))
    }

    /// Column-major `C[m, n] = op(A)[m, k] op(B)[k, n] + beta C` in the engine's
    /// [`MatmulMode`].
    ///
    /// # Safety
    /// Every operand must address a live device range that holds its matrix with its
    /// leading dimension (`C` also writable and not overlapping `A` or `B`).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        beta: f32,
        c: CUdeviceptr,
        ldc: usize,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let f32_t = cudaDataType::CUDA_R_32F;
        // SAFETY: the caller's contract; alpha and beta are host scalars read during the call.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                op(a.transposed),
                op(b.transposed),
                dim("rows", m)?,
                dim("columns", n)?,
                dim("depth", k)?,
                (&alpha) as *const f32 as *const _,
                a.ptr as *const _,
                f32_t,
                dim("leading dimension", a.ld)?,
                b.ptr as *const _,
                f32_t,
                dim("leading dimension", b.ld)?,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                f32_t,
                dim("leading dimension", ldc)?,
                self.matmul_mode().compute_type(),
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )?;
        }
        Ok(())
    }
}
