//! Engines: where tensors live and how ops run on them.
//!
//! The network in [`crate::model`] is written once against the [`Engine`] trait; `cpu` is the
//! pure-Rust numerical reference, `cuda` runs the handwritten kernels. Engines know flat f32
//! buffers, shapes and ops, and nothing of the network, the method or the command line.
//!
//! Conventions every engine follows:
//! - Activations are channel-major, `[C, N, H, W]`: one channel of the whole batch is
//!   contiguous, so batch norm reads contiguous rows and a convolution over the whole batch
//!   is one matrix product `Y[Cout, N*Ho*Wo] = W[Cout, Cin*k*k] * cols`. Feature matrices
//!   (pooled features, projector activations, embeddings) are `[D, N]` for the same reason.
//! - Parameters are views into one flat buffer, in PyTorch's layouts (conv weight
//!   `[Cout, Cin, k, k]`, linear weight `[out, in]`); a batch norm's weight and bias are one
//!   view `[gamma; beta]`, a linear layer's weight and bias one view `[W; b]`, running
//!   statistics one view `[mean; var]`, matching the reference model's order.
//! - Parameter gradients always accumulate (`+=`), because two forward passes feed one
//!   task gradient. Input gradients of convolutions and linear layers accumulate too (the
//!   residual shortcut's gradient is summed into them for free); batch norm and pooling
//!   input gradients are written (`=`). Each method says which.

pub mod cpu;
pub mod cuda;

use std::ops::Range;

pub use anyhow::Result;

/// The three inner products adaptive gradient surgery needs, from one pass over g1 and g2.
/// Accumulated in f64 so that the result does not depend on the summation order beyond
/// f64 rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GradDots {
    /// g1 . g2
    pub g1g2: f64,
    /// |g1|^2
    pub g1g1: f64,
    /// |g2|^2
    pub g2g2: f64,
}

/// Reorders a batch from PyTorch's `[N, C, H, W]` to the engines' `[C, N, H, W]`.
pub fn nchw_to_cnhw(data: &[f32], n: usize, c: usize, plane: usize) -> Vec<f32> {
    assert_eq!(
        data.len(),
        n * c * plane,
        "batch size does not match its shape"
    );
    let mut out = vec![0.0; data.len()];
    for (i, src) in data.chunks_exact(plane).enumerate() {
        let (img, ch) = (i / c, i % c);
        out[(ch * n + img) * plane..][..plane].copy_from_slice(src);
    }
    out
}

/// A 2-D convolution without bias over a `[C, N, H, W]` batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn in_len(&self) -> usize {
        self.in_channels * self.batch * self.in_h * self.in_w
    }
    pub fn out_len(&self) -> usize {
        self.out_channels * self.batch * self.out_h() * self.out_w()
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    /// Multiply-adds of the forward pass (the backward pass costs twice this).
    pub fn macs(&self) -> usize {
        self.out_len() * self.in_channels * self.kernel * self.kernel
    }
}

/// Batch normalization over `channels` rows of `per_channel = N*H*W` values each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    pub channels: usize,
    pub per_channel: usize,
    pub eps: f32,
    pub momentum: f32,
}

impl BatchNorm {
    pub fn len(&self) -> usize {
        self.channels * self.per_channel
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Max pooling of `planes = C*N` planes of `h x w`, with square window, stride and padding
/// (padding never wins the max, as in PyTorch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool {
    pub planes: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool {
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kernel) / self.stride + 1
    }
}

/// Global average pooling: each of `planes = C*N` planes of `spatial = H*W` values becomes
/// one value, so `[C, N, H, W]` becomes `[C, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool {
    pub planes: usize,
    pub spatial: usize,
}

/// A linear layer on feature-major `[in, N]` inputs: `y = W x + b`, `W` is `[out, in]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Length of the `[W; b]` parameter view.
    pub fn param_len(&self) -> usize {
        self.out_features * (self.in_features + 1)
    }
}

/// Two views of `n` samples embedded in `dim` dimensions, each feature-major `[dim, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewPair {
    pub dim: usize,
    pub n: usize,
}

/// One fused surgery + SGD update: `g = alpha g1 + beta g2; d = g + weight_decay p;
/// m = momentum m + d; p -= lr m` (PyTorch's SGD; `m` starts at zero, which makes the first
/// step `m = d` exactly as PyTorch does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdUpdate {
    pub alpha: f32,
    pub beta: f32,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// Fails unless `got == want`, naming the buffer. Every engine checks its ops' buffers with
/// it and the shape methods below, so that both report the same errors.
pub fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    anyhow::ensure!(got == want, "{what}: expected {want} values, got {got}");
    Ok(())
}

impl Conv2d {
    /// The buffers of a forward pass.
    pub fn check_forward(&self, x: usize, w: usize, y: usize) -> Result<()> {
        check_len("conv2d input", x, self.in_len())?;
        check_len("conv2d weight", w, self.weight_len())?;
        check_len("conv2d output", y, self.out_len())
    }

    /// The buffers of a backward pass (`dx` when given).
    pub fn check_backward(
        &self,
        x: usize,
        w: usize,
        dy: usize,
        dw: usize,
        dx: Option<usize>,
    ) -> Result<()> {
        check_len("conv2d input", x, self.in_len())?;
        check_len("conv2d weight", w, self.weight_len())?;
        check_len("conv2d output gradient", dy, self.out_len())?;
        check_len("conv2d weight gradient", dw, self.weight_len())?;
        dx.map_or(Ok(()), |dx| {
            check_len("conv2d input gradient", dx, self.in_len())
        })
    }
}

impl BatchNorm {
    /// The input, `[gamma; beta]` and a buffer of the input's shape (the residual, or the
    /// output whose ReLU the backward undoes); and that the batch is not empty.
    pub fn check(&self, x: usize, affine: usize, same_shape: Option<usize>) -> Result<()> {
        check_len("batch norm input", x, self.len())?;
        check_len("batch norm weight and bias", affine, 2 * self.channels)?;
        anyhow::ensure!(self.per_channel > 0, "batch norm over an empty batch");
        same_shape.map_or(Ok(()), |len| {
            check_len("batch norm residual/output", len, self.len())
        })
    }

    /// A per-channel pair of statistics (`[mean; invstd]`, `[mean; var]`) or of gradients.
    pub fn check_pairs(&self, what: &str, len: usize) -> Result<()> {
        check_len(what, len, 2 * self.channels)
    }

    /// A buffer of the input's shape.
    pub fn check_like_input(&self, what: &str, len: usize) -> Result<()> {
        check_len(what, len, self.len())
    }
}

impl MaxPool {
    /// An input and an output (or their gradients), named by `what`.
    pub fn check(&self, what: [&str; 2], x: usize, y: usize) -> Result<()> {
        check_len(what[0], x, self.planes * self.in_h * self.in_w)?;
        check_len(what[1], y, self.planes * self.out_h() * self.out_w())
    }
}

impl AvgPool {
    /// An input and an output (or their gradients), named by `what`.
    pub fn check(&self, what: [&str; 2], x: usize, y: usize) -> Result<()> {
        check_len(what[0], x, self.planes * self.spatial)?;
        check_len(what[1], y, self.planes)
    }
}

impl Linear {
    /// The input, `[W; b]` and the output of a forward pass.
    pub fn check_forward(&self, x: usize, wb: usize, y: usize) -> Result<()> {
        check_len("linear input", x, self.in_features * self.batch)?;
        check_len("linear parameters", wb, self.param_len())?;
        check_len("linear output", y, self.out_features * self.batch)
    }

    /// The buffers of a backward pass (the output `y` when the ReLU is undone, `dx` when
    /// given).
    pub fn check_backward(
        &self,
        x: usize,
        wb: usize,
        y: Option<usize>,
        dy: usize,
        dwb: usize,
        dx: Option<usize>,
    ) -> Result<()> {
        let out = self.out_features * self.batch;
        check_len("linear input", x, self.in_features * self.batch)?;
        check_len("linear parameters", wb, self.param_len())?;
        check_len("linear output gradient", dy, out)?;
        check_len("linear parameter gradient", dwb, self.param_len())?;
        if let Some(y) = y {
            check_len("linear output", y, out)?;
        }
        dx.map_or(Ok(()), |dx| {
            check_len("linear input gradient", dx, self.in_features * self.batch)
        })
    }
}

impl ViewPair {
    /// `z_i`, `z_j`, `dz_i`, `dz_j`; and that the batch is not empty.
    pub fn check(&self, lens: [usize; 4]) -> Result<()> {
        anyhow::ensure!(self.n > 0 && self.dim > 0, "loss over an empty batch");
        for (what, len) in ["z_i", "z_j", "dz_i", "dz_j"].into_iter().zip(lens) {
            check_len(what, len, self.dim * self.n)?;
        }
        Ok(())
    }
}

/// Tensor storage and the ops the network is built from.
pub trait Engine: Sync {
    /// A flat f32 buffer on the engine's device.
    type Buf: Send + Sync;
    /// A read-only view of part of a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    /// A short name for reports ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// The memory a training step may plan for on this engine's device (bytes), if known:
    /// the host's available memory (or `SLAM_MEMORY_LIMIT`) by default.
    fn memory_available(&self) -> Result<Option<u64>> {
        crate::memory::available_bytes()
    }

    /// What [`Engine::memory_available`] measures, for messages.
    fn memory_kind(&self) -> &'static str {
        "memory"
    }

    /// The arithmetic of the convolutions' and linear layers' products: "f32", or the
    /// tensor-core input rounding ("tf32", "bf16") an engine was asked for.
    fn precision(&self) -> &'static str {
        "f32"
    }

    /// A zero-filled buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, src: Self::View<'_>) -> Result<Vec<f32>>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>
    where
        Self: 'a;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>
    where
        Self: 'a;
    /// The whole buffer as a view.
    fn all<'a>(&self, buf: &'a Self::Buf) -> Self::View<'a>
    where
        Self: 'a,
    {
        self.view(buf, 0..self.buf_len(buf))
    }
    /// The whole buffer as a writable view.
    fn all_mut<'a>(&self, buf: &'a mut Self::Buf) -> Self::ViewMut<'a>
    where
        Self: 'a,
    {
        let len = self.buf_len(buf);
        self.view_mut(buf, 0..len)
    }
    fn fill_zero(&self, dst: Self::ViewMut<'_>) -> Result<()>;

    /// `y = conv(x, w)`; `y` is written.
    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        w: Self::View<'_>,
        y: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// `dw += dL/dw`, and `dx += dL/dx` when `dx` is given.
    fn conv2d_backward(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        w: Self::View<'_>,
        dy: Self::View<'_>,
        dw: Self::ViewMut<'_>,
        dx: Option<Self::ViewMut<'_>>,
    ) -> Result<()>;

    /// Training-mode batch norm with this batch's statistics, optionally followed by a
    /// residual add and a ReLU: `y = act(gamma (x - mean) invstd + beta [+ residual])`.
    /// Writes `y` and `saved = [mean; invstd]`; updates `running = [mean; var]` with
    /// `r = (1 - momentum) r + momentum batch_stat`, the variance unbiased (as PyTorch).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_train_forward(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        affine: Self::View<'_>,
        residual: Option<Self::View<'_>>,
        relu: bool,
        y: Self::ViewMut<'_>,
        saved: Self::ViewMut<'_>,
        running: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Evaluation-mode batch norm with the running statistics `[mean; var]`, optionally
    /// followed by a residual add and a ReLU. Writes `y`.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_eval_forward(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        affine: Self::View<'_>,
        running: Self::View<'_>,
        residual: Option<Self::View<'_>>,
        relu: bool,
        y: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Backward of [`Engine::batchnorm_train_forward`]. With `relu_out = Some(y)` the ReLU
    /// is undone first, in place: `dy <- dy [y > 0]`; on return `dy` is then the gradient of
    /// the pre-activation sum, which is also the residual's gradient. With `xhat = (x - mean)
    /// invstd` and `M` values per channel: `dgamma = sum dy xhat`, `dbeta = sum dy`,
    /// `dx = gamma invstd / M (M dy - dbeta - xhat dgamma)`. Writes `dx`;
    /// `daffine += [dgamma; dbeta]`.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_train_backward(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        affine: Self::View<'_>,
        saved: Self::View<'_>,
        relu_out: Option<Self::View<'_>>,
        dy: Self::ViewMut<'_>,
        dx: Self::ViewMut<'_>,
        daffine: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Writes `y`.
    fn maxpool_forward(&self, s: &MaxPool, x: Self::View<'_>, y: Self::ViewMut<'_>) -> Result<()>;

    /// Routes each output gradient to the first maximum of its window (PyTorch's choice on
    /// ties), recomputed from `x`. Writes `dx`.
    fn maxpool_backward(
        &self,
        s: &MaxPool,
        x: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Writes `y`.
    fn avgpool_forward(&self, s: &AvgPool, x: Self::View<'_>, y: Self::ViewMut<'_>) -> Result<()>;

    /// `dx = dy / spatial`, broadcast over each plane. Writes `dx`.
    fn avgpool_backward(
        &self,
        s: &AvgPool,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// `y = act(W x + b)` with `wb = [W; b]`. Writes `y`.
    fn linear_forward(
        &self,
        s: &Linear,
        x: Self::View<'_>,
        wb: Self::View<'_>,
        relu: bool,
        y: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// Backward of [`Engine::linear_forward`]. With `relu_out = Some(y)`, first
    /// `dy <- dy [y > 0]` in place. Then `dW += dy x^T`, `db += sum_n dy`, and
    /// `dx += W^T dy` when `dx` is given.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        s: &Linear,
        x: Self::View<'_>,
        wb: Self::View<'_>,
        relu_out: Option<Self::View<'_>>,
        dy: Self::ViewMut<'_>,
        dwb: Self::ViewMut<'_>,
        dx: Option<Self::ViewMut<'_>>,
    ) -> Result<()>;

    /// NT-Xent contrastive loss over the `2n` rows `[z_i; z_j]`, each row paired with its
    /// other view. With `f = z / max(|z|, 1e-12)` and `S = f f^T / T`:
    /// `loss = -mean_a [S[a, p(a)] - log sum_{b != a} exp S[a, b]]`.
    /// Returns the loss and writes its gradients `dz_i`, `dz_j`.
    #[allow(clippy::too_many_arguments)]
    fn ntxent(
        &self,
        s: &ViewPair,
        z_i: Self::View<'_>,
        z_j: Self::View<'_>,
        temperature: f32,
        dz_i: Self::ViewMut<'_>,
        dz_j: Self::ViewMut<'_>,
    ) -> Result<f32>;

    /// Cohesion loss over the `m = 2n` normalized rows `[z_i; z_j]`:
    /// `loss = (1 - mean_{a != b} f_a . f_b) / T`. Returns the loss and writes its
    /// gradients `dz_i`, `dz_j`; linear in `m` (the `m x m` matrix is never formed).
    #[allow(clippy::too_many_arguments)]
    fn cohesion(
        &self,
        s: &ViewPair,
        z_i: Self::View<'_>,
        z_j: Self::View<'_>,
        temperature: f32,
        dz_i: Self::ViewMut<'_>,
        dz_j: Self::ViewMut<'_>,
    ) -> Result<f32>;

    /// `g1 . g2`, `|g1|^2`, `|g2|^2` in one pass, accumulated in f64, deterministic.
    fn grad_dots(&self, g1: Self::View<'_>, g2: Self::View<'_>) -> Result<GradDots>;

    /// `out = alpha g1 + beta g2` (the combined gradient, for step dumps).
    fn combine_grads(
        &self,
        g1: Self::View<'_>,
        g2: Self::View<'_>,
        alpha: f32,
        beta: f32,
        out: Self::ViewMut<'_>,
    ) -> Result<()>;

    /// The fused surgery + SGD pass of [`SgdUpdate`] over the flat parameter and momentum
    /// buffers.
    fn sgd_step(
        &self,
        u: &SgdUpdate,
        g1: Self::View<'_>,
        g2: Self::View<'_>,
        params: Self::ViewMut<'_>,
        momentum: Self::ViewMut<'_>,
    ) -> Result<()>;
}
