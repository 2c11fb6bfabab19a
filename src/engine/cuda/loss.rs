//! The two task losses on the GPU (kernels/loss.cu, with cuBLAS for NT-Xent's two products);
//! the CPU twin is src/engine/cpu/loss.rs. Feature-major `[dim, n]` views in, the loss out,
//! `dz_i`, `dz_j` written.

use std::sync::{Mutex, MutexGuard};

use anyhow::{Result, ensure};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, driver, kernel_set};
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::{LossOps, LossViews, ViewLen, ViewPair, check_len};

/// `LOSS_BLOCK` of kernels/loss.cu.
pub const LOSS_BLOCK: u32 = 256;
/// `LOSS_COLS` of kernels/loss.cu: samples per block of its column kernels.
pub const LOSS_COLS: u32 = 8;

kernel_set! {
    /// The functions of kernels/loss.cu and their device scratch.
    LossKernels from "loss" {
        normalize = "loss_normalize",
        ntxent_softmax = "ntxent_softmax",
        ntxent_backward = "ntxent_backward",
        cohesion_rowsum = "cohesion_rowsum",
        cohesion_backward = "cohesion_backward",
    }
    state |m| {
        scratch: Mutex<Scratch> = Mutex::new(Scratch {
            loss: m
                .stream()
                .alloc_zeros(1)
                .map_err(driver("allocating the loss scratch"))?,
            shaped: None,
        }),
    }
}

/// The loss value (one float the host reads back) and the intermediates, allocated for the
/// last batch shape.
struct Scratch {
    loss: CudaSlice<f32>,
    shaped: Option<LossScratch>,
}

/// Intermediates of both losses for one batch shape (see kernels/loss.cu for the layouts).
struct LossScratch {
    pair: ViewPair,
    /// Normalized rows, feature-major `[dim, m]` (the column-major `m x dim` matrix F).
    f: CudaSlice<f32>,
    /// `max(|z_a|, 1e-12)` per column.
    norm: CudaSlice<f64>,
    /// `F F^T`, `m x m`.
    sim: CudaSlice<f32>,
    /// NT-Xent's `dL/dS`, row-major `m x m`.
    grad: CudaSlice<f32>,
    /// `dL/dF`, feature-major `[dim, m]`.
    df: CudaSlice<f32>,
    /// NT-Xent's per-row terms.
    row_loss: CudaSlice<f64>,
    /// Cohesion's column sum `s`, `[dim]`.
    colsum: CudaSlice<f64>,
    /// Cohesion's `[s_k^2 | sum_a f[k, a]^2]`, `[2 dim]`.
    stats: CudaSlice<f64>,
}

impl LossScratch {
    fn new(stream: &std::sync::Arc<CudaStream>, pair: ViewPair) -> Result<Self> {
        let (m, d) = (2 * pair.n, pair.dim);
        Ok(Self {
            pair,
            f: stream.alloc_zeros(d * m)?,
            norm: stream.alloc_zeros(m)?,
            sim: stream.alloc_zeros(m * m)?,
            grad: stream.alloc_zeros(m * m)?,
            df: stream.alloc_zeros(d * m)?,
            row_loss: stream.alloc_zeros(m)?,
            colsum: stream.alloc_zeros(d)?,
            stats: stream.alloc_zeros(2 * d)?,
        })
    }
}

fn blocks(grid: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (LOSS_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks the buffers as the CPU engine does, and that they fit the kernels' 32-bit indices
/// and cuBLAS's int dimensions. Returns `(n, dim)` as u32.
fn check_pair(s: &ViewPair, t: f32, a: &LossViews<'_, CudaEngine>) -> Result<(u32, u32)> {
    a.check(s, t)?;
    ensure!(
        2 * s.n <= i32::MAX as usize && s.dim <= i32::MAX as usize,
        "loss batch too large for the CUDA kernels: n = {}, dim = {}",
        s.n,
        s.dim
    );
    Ok((s.n as u32, s.dim as u32))
}

/// The two losses over a pair of views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairLoss {
    /// NT-Xent over the `2n` rows `[z_i; z_j]` (each row's partner is its other view).
    NtXent,
    /// Cohesion over the `m = 2n` normalized rows: `(1 - mean_{a != b} f_a . f_b) / T`,
    /// linear in `m`.
    Cohesion,
}

impl LossOps for CudaEngine {
    fn ntxent(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32> {
        self.pair_loss(PairLoss::NtXent, s, temperature, a)
    }

    fn cohesion(&self, s: &ViewPair, temperature: f32, a: LossViews<'_, Self>) -> Result<f32> {
        self.pair_loss(PairLoss::Cohesion, s, temperature, a)
    }
}

impl CudaEngine {
    /// `kind` over the rows `[z_i; z_j]` at temperature `t`: returns the loss (waiting for
    /// the device) and writes `dz_i`, `dz_j`.
    fn pair_loss(
        &self,
        kind: PairLoss,
        s: &ViewPair,
        t: f32,
        a: LossViews<'_, Self>,
    ) -> Result<f32> {
        let mut scratch = self.loss_scratch();
        let Scratch { loss, shaped } = &mut *scratch;
        let ws = shaped_scratch(&self.stream, shaped, s)?;
        self.launch_pair_loss(kind, ws, s, t, a, loss.dev_mut())?;
        Ok(self.stream.clone_dtoh(loss)?[0])
    }

    /// The loss of [`LossOps::ntxent`] or [`LossOps::cohesion`] without the download: it is
    /// written into `loss` (1 value) on the device, so nothing waits.
    pub fn pair_loss_to(
        &self,
        kind: PairLoss,
        s: &ViewPair,
        t: f32,
        a: LossViews<'_, Self>,
        loss: DevViewMut<'_>,
    ) -> Result<()> {
        let mut scratch = self.loss_scratch();
        let ws = shaped_scratch(&self.stream, &mut scratch.shaped, s)?;
        self.launch_pair_loss(kind, ws, s, t, a, loss)
    }

    fn loss_scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic while holding it leaves only device buffers, which stay valid.
        self.loss.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn launch_pair_loss(
        &self,
        kind: PairLoss,
        ws: &mut LossScratch,
        s: &ViewPair,
        t: f32,
        a: LossViews<'_, Self>,
        loss: DevViewMut<'_>,
    ) -> Result<()> {
        let shape = check_pair(s, t, &a)?;
        check_len("loss", loss.len(), 1)?;
        // Both losses start from the normalized rows f (and the norms) in the scratch.
        self.launch_normalize(ws, shape, a.z_i, a.z_j)?;
        let out = [a.dz_i, a.dz_j];
        match kind {
            PairLoss::NtXent => self.launch_ntxent(ws, shape, t, out, loss),
            PairLoss::Cohesion => self.launch_cohesion(ws, shape, t, out, loss),
        }
    }

    /// `f = z / max(|z|, 1e-12)` and the norms, into the scratch.
    fn launch_normalize(
        &self,
        ws: &mut LossScratch,
        (n, dim): (u32, u32),
        z_i: DevView<'_>,
        z_j: DevView<'_>,
    ) -> Result<()> {
        // SAFETY: shapes checked by check_pair; scratch sized for them (kernels/loss.cu).
        unsafe {
            self.stream
                .launch_builder(&self.loss.normalize)
                .arg(z_i.ptr())
                .arg(z_j.ptr())
                .arg(&n)
                .arg(&dim)
                .arg(&mut ws.f)
                .arg(&mut ws.norm)
                .launch(blocks((2 * n).div_ceil(LOSS_COLS) as usize))?;
        }
        Ok(())
    }

    fn launch_ntxent(
        &self,
        ws: &mut LossScratch,
        (n, dim): (u32, u32),
        t: f32,
        [dz_i, dz_j]: [DevViewMut<'_>; 2],
        loss: DevViewMut<'_>,
    ) -> Result<()> {
        let (m, d) = (2 * n as i32, dim as i32);
        let inv_t = 1.0 / t as f64;
        // Column-major, F is m x d with leading dimension m (the [dim, m] scratch).
        // sim = F F^T.
        let sim = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_T,
            m,
            n: m,
            k: d,
            alpha: 1.0f32,
            lda: m,
            ldb: m,
            beta: 0.0,
            ldc: m,
        };
        // SAFETY: every matrix lies inside its scratch buffer (m*d, m*m, m*m, m*d values).
        unsafe { self.blas.gemm(sim, &ws.f, &ws.f, &mut ws.sim) }?;
        // SAFETY: as in launch_normalize.
        unsafe {
            self.stream
                .launch_builder(&self.loss.ntxent_softmax)
                .arg(&ws.sim)
                .arg(&n)
                .arg(&inv_t)
                .arg(&mut ws.grad)
                .arg(&mut ws.row_loss)
                .launch(blocks(2 * n as usize))?;
        }
        // df = (G + G^T) F / T in two products: the row-major G is the column-major G^T, so
        // op N reads G^T and op T reads G.
        let dgrad = |transa, beta| GemmConfig {
            transa,
            transb: CUBLAS_OP_N,
            m,
            n: d,
            k: m,
            alpha: inv_t as f32,
            lda: m,
            ldb: m,
            beta,
            ldc: m,
        };
        // SAFETY: as for sim.
        unsafe {
            self.blas
                .gemm(dgrad(CUBLAS_OP_N, 0.0), &ws.grad, &ws.f, &mut ws.df)?;
            self.blas
                .gemm(dgrad(CUBLAS_OP_T, 1.0), &ws.grad, &ws.f, &mut ws.df)?;
        }
        // SAFETY: as in launch_normalize.
        unsafe {
            self.stream
                .launch_builder(&self.loss.ntxent_backward)
                .arg(&ws.f)
                .arg(&ws.norm)
                .arg(&ws.df)
                .arg(&ws.row_loss)
                .arg(&n)
                .arg(&dim)
                .arg(dz_i.ptr())
                .arg(dz_j.ptr())
                .arg(loss.ptr())
                .launch(blocks((2 * n).div_ceil(LOSS_COLS) as usize))?;
        }
        Ok(())
    }

    fn launch_cohesion(
        &self,
        ws: &mut LossScratch,
        (n, dim): (u32, u32),
        t: f32,
        [dz_i, dz_j]: [DevViewMut<'_>; 2],
        loss: DevViewMut<'_>,
    ) -> Result<()> {
        let t = t as f64;
        let warps = LOSS_BLOCK / 32;
        // SAFETY: as in launch_normalize.
        unsafe {
            self.stream
                .launch_builder(&self.loss.cohesion_rowsum)
                .arg(&ws.f)
                .arg(&n)
                .arg(&dim)
                .arg(&mut ws.colsum)
                .arg(&mut ws.stats)
                .launch(blocks(dim.div_ceil(warps) as usize))?;
            self.stream
                .launch_builder(&self.loss.cohesion_backward)
                .arg(&ws.f)
                .arg(&ws.norm)
                .arg(&ws.colsum)
                .arg(&ws.stats)
                .arg(&n)
                .arg(&dim)
                .arg(&t)
                .arg(dz_i.ptr())
                .arg(dz_j.ptr())
                .arg(loss.ptr())
                .launch(blocks((2 * n).div_ceil(LOSS_COLS) as usize))?;
        }
        Ok(())
    }
}

/// The scratch for shape `s`, reallocated when the shape changes.
fn shaped_scratch<'a>(
    stream: &std::sync::Arc<CudaStream>,
    slot: &'a mut Option<LossScratch>,
    s: &ViewPair,
) -> Result<&'a mut LossScratch> {
    if slot.as_ref().is_none_or(|ws| ws.pair != *s) {
        *slot = None;
        *slot = Some(LossScratch::new(stream, *s)?);
    }
    Ok(slot.as_mut().expect("just set"))
}
