//! [`CudaEngine`]: the [`Engine`] trait on one GPU. Buffers are cudarc device buffers, views
//! the `Copy` [`DevView`]s; every op is the [`Gpu`] method of the same name, queued on the
//! one stream. Only the two losses and the surgery's inner products return host values, so
//! a training step waits for the device at those points alone (plus the embedding spread it
//! logs).

use std::ops::Range;

use cudarc::driver::CudaSlice;

use super::blas::MatmulMode;
use super::gpu::{Gpu, GpuError};
use super::loss::PairLoss;
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::{
    AvgPool, BatchNorm, Conv2d, Engine, GradDots, Linear, MaxPool, Result, SgdUpdate, ViewPair,
};

/// The CUDA engine: a [`Gpu`] and the [`Engine`] ops on it.
pub struct CudaEngine {
    gpu: Gpu,
}

impl CudaEngine {
    /// Opens CUDA device `ordinal` (see [`Gpu::new`]); the layers' products start in
    /// `mode`.
    pub fn new(ordinal: usize, mode: MatmulMode) -> Result<Self, GpuError> {
        let gpu = Gpu::new(ordinal)?;
        gpu.set_matmul_mode(mode);
        Ok(Self { gpu })
    }

    /// The engine on an opened GPU (in the GPU's current [`MatmulMode`]).
    pub fn from_gpu(gpu: Gpu) -> Self {
        Self { gpu }
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
}

impl Engine for CudaEngine {
    type Buf = CudaSlice<f32>;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    /// Free device memory, capped by `SLAM_MEMORY_LIMIT` when it is set.
    fn memory_available(&self) -> Result<Option<u64>> {
        let free = self.gpu.memory_info()?.0;
        let limit = crate::memory::available_bytes_from_limit()?;
        Ok(Some(limit.map_or(free, |l| l.min(free))))
    }

    fn memory_kind(&self) -> &'static str {
        "GPU memory"
    }

    fn precision(&self) -> &'static str {
        match self.gpu.matmul_mode() {
            MatmulMode::Exact => "f32",
            MatmulMode::Tf32 => "tf32",
            MatmulMode::Bf16 => "bf16",
        }
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.gpu.zeros(len)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.upload(host)
    }

    fn download(&self, src: DevView<'_>) -> Result<Vec<f32>> {
        self.gpu.download(src)
    }

    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a CudaSlice<f32>, range: Range<usize>) -> DevView<'a>
    where
        Self: 'a,
    {
        buf.dev().slice(range)
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaSlice<f32>, range: Range<usize>) -> DevViewMut<'a>
    where
        Self: 'a,
    {
        buf.dev_mut().slice_mut(range)
    }

    fn fill_zero(&self, dst: DevViewMut<'_>) -> Result<()> {
        self.gpu.fill_zero(dst)
    }

    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: DevView<'_>,
        w: DevView<'_>,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu.conv2d_forward(s, x, w, y)
    }

    fn conv2d_backward(
        &self,
        s: &Conv2d,
        x: DevView<'_>,
        w: DevView<'_>,
        dy: DevView<'_>,
        dw: DevViewMut<'_>,
        dx: Option<DevViewMut<'_>>,
    ) -> Result<()> {
        self.gpu.conv2d_backward(s, x, w, dy, dw, dx)
    }

    fn batchnorm_train_forward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        residual: Option<DevView<'_>>,
        relu: bool,
        y: DevViewMut<'_>,
        saved: DevViewMut<'_>,
        running: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu
            .batchnorm_train_forward(s, x, affine, residual, relu, y, saved, running)
    }

    fn batchnorm_eval_forward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        running: DevView<'_>,
        residual: Option<DevView<'_>>,
        relu: bool,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu
            .batchnorm_eval_forward(s, x, affine, running, residual, relu, y)
    }

    fn batchnorm_train_backward(
        &self,
        s: &BatchNorm,
        x: DevView<'_>,
        affine: DevView<'_>,
        saved: DevView<'_>,
        relu_out: Option<DevView<'_>>,
        dy: DevViewMut<'_>,
        dx: DevViewMut<'_>,
        daffine: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu
            .batchnorm_train_backward(s, x, affine, saved, relu_out, dy, dx, daffine)
    }

    fn maxpool_forward(&self, s: &MaxPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        self.gpu.maxpool_forward(s, x, y)
    }

    fn maxpool_backward(
        &self,
        s: &MaxPool,
        x: DevView<'_>,
        dy: DevView<'_>,
        dx: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu.maxpool_backward(s, x, dy, dx)
    }

    fn avgpool_forward(&self, s: &AvgPool, x: DevView<'_>, y: DevViewMut<'_>) -> Result<()> {
        self.gpu.avgpool_forward(s, x, y)
    }

    fn avgpool_backward(&self, s: &AvgPool, dy: DevView<'_>, dx: DevViewMut<'_>) -> Result<()> {
        self.gpu.avgpool_backward(s, dy, dx)
    }

    fn linear_forward(
        &self,
        s: &Linear,
        x: DevView<'_>,
        wb: DevView<'_>,
        relu: bool,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu.linear_forward(s, x, wb, relu, y)
    }

    fn linear_backward(
        &self,
        s: &Linear,
        x: DevView<'_>,
        wb: DevView<'_>,
        relu_out: Option<DevView<'_>>,
        dy: DevViewMut<'_>,
        dwb: DevViewMut<'_>,
        dx: Option<DevViewMut<'_>>,
    ) -> Result<()> {
        self.gpu.linear_backward(s, x, wb, relu_out, dy, dwb, dx)
    }

    fn ntxent(
        &self,
        s: &ViewPair,
        z_i: DevView<'_>,
        z_j: DevView<'_>,
        temperature: f32,
        dz_i: DevViewMut<'_>,
        dz_j: DevViewMut<'_>,
    ) -> Result<f32> {
        let kind = PairLoss::NtXent;
        self.gpu
            .pair_loss(kind, s, z_i, z_j, temperature, dz_i, dz_j)
    }

    fn cohesion(
        &self,
        s: &ViewPair,
        z_i: DevView<'_>,
        z_j: DevView<'_>,
        temperature: f32,
        dz_i: DevViewMut<'_>,
        dz_j: DevViewMut<'_>,
    ) -> Result<f32> {
        let kind = PairLoss::Cohesion;
        self.gpu
            .pair_loss(kind, s, z_i, z_j, temperature, dz_i, dz_j)
    }

    fn grad_dots(&self, g1: DevView<'_>, g2: DevView<'_>) -> Result<GradDots> {
        self.gpu.grad_dots(g1, g2)
    }

    fn combine_grads(
        &self,
        g1: DevView<'_>,
        g2: DevView<'_>,
        alpha: f32,
        beta: f32,
        out: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu.combine_grads(g1, g2, alpha, beta, out)
    }

    fn sgd_step(
        &self,
        u: &SgdUpdate,
        g1: DevView<'_>,
        g2: DevView<'_>,
        params: DevViewMut<'_>,
        momentum: DevViewMut<'_>,
    ) -> Result<()> {
        self.gpu.sgd_step(u, g1, g2, params, momentum)
    }
}
