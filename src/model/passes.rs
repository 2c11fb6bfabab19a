//! The network's forward pass in training mode and its hand-derived backward pass, written
//! once for every engine. Activations are channel-major `[C, N, H, W]`; the pooled features
//! and projector activations are `[D, N]` (see [`crate::engine`]).

use anyhow::{Result, ensure};

use super::network::{BnParams, ConvParams, LinearParams, Network};
use crate::engine::{
    AvgPool, BatchNorm, BnBackward, BnForward, BnStats, Conv2d, ConvBackward, Engine, Linear,
    LinearBackward, LinearForward, MaxPool,
};

/// PyTorch's BatchNorm2d defaults.
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// A convolution followed by batch norm (and, fused into it, the residual add and ReLU).
struct ConvBn<E: Engine> {
    conv: Conv2d,
    bn: BatchNorm,
    conv_out: E::Buf,
    /// `[mean; invstd]` of this batch.
    saved: E::Buf,
    out: E::Buf,
}

struct Block<E: Engine> {
    first: ConvBn<E>,
    /// Its `out` is the block's output.
    second: ConvBn<E>,
    downsample: Option<ConvBn<E>>,
}

/// How batch norm runs in a forward pass.
enum Norm<'r, E: Engine> {
    /// With the batch's statistics, updating the running ones at this momentum.
    Train(&'r mut E::Buf, f32),
    /// With the running statistics (evaluation).
    Eval(&'r E::Buf),
}

/// Everything one training-mode forward pass keeps for its backward pass.
pub struct Activations<'a, E: Engine> {
    batch: usize,
    input: &'a E::Buf,
    stem: ConvBn<E>,
    pool: MaxPool,
    pooled: E::Buf,
    blocks: Vec<Block<E>>,
    /// Encoder output `h`, `[feature_dim, N]`.
    pub features: E::Buf,
    /// Projector hidden layer after its ReLU, `[feature_dim, N]`.
    hidden: E::Buf,
    /// Projector output `z`, `[out_dim, N]`.
    pub z: E::Buf,
}

fn linear_shape(p: &LinearParams, batch: usize) -> Linear {
    Linear {
        batch,
        in_features: p.in_features,
        out_features: p.out_features,
    }
}

/// `act(W x + b)` of one projector layer over `batch` samples, into a new buffer.
fn project<E: Engine>(
    eng: &E,
    params: &E::Buf,
    layer: &LinearParams,
    x: &E::Buf,
    batch: usize,
    relu: bool,
) -> Result<E::Buf> {
    let s = linear_shape(layer, batch);
    let mut y = eng.alloc(s.out_features * batch)?;
    let forward = LinearForward {
        x: eng.all(x),
        wb: eng.view(params, layer.weight_bias.clone()),
        relu,
        y: eng.all_mut(&mut y),
    };
    eng.linear_forward(&s, forward)?;
    Ok(y)
}

impl Network {
    #[allow(clippy::too_many_arguments)]
    fn conv_bn_forward<E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        norm: &mut Norm<'_, E>,
        (conv, bn): (&ConvParams, &BnParams),
        x: &E::Buf,
        (batch, h, w): (usize, usize, usize),
        residual: Option<&E::Buf>,
        relu: bool,
    ) -> Result<ConvBn<E>> {
        let cs = conv.shape(batch, (h, w));
        let mut conv_out = eng.alloc(cs.out_len())?;
        let weight = eng.view(params, conv.weight.clone());
        eng.conv2d_forward(&cs, eng.all(x), weight, eng.all_mut(&mut conv_out))?;
        let bs = BatchNorm {
            channels: bn.channels,
            per_channel: batch * cs.out_h() * cs.out_w(),
            eps: BN_EPS,
            momentum: match norm {
                Norm::Train(_, momentum) => *momentum,
                Norm::Eval(_) => BN_MOMENTUM,
            },
        };
        let mut saved = eng.alloc(2 * bn.channels)?;
        let mut out = eng.alloc(bs.len())?;
        let affine = eng.view(params, bn.affine.clone());
        let residual = residual.map(|r| eng.all(r));
        let stats = match norm {
            Norm::Train(running, _) => BnStats::Batch {
                saved: eng.all_mut(&mut saved),
                running: eng.view_mut(running, bn.running.clone()),
            },
            Norm::Eval(running) => BnStats::Running(eng.view(running, bn.running.clone())),
        };
        let forward = BnForward {
            x: eng.all(&conv_out),
            affine,
            residual,
            relu,
            y: eng.all_mut(&mut out),
            stats,
        };
        eng.batchnorm_forward(&bs, forward)?;
        Ok(ConvBn {
            conv: cs,
            bn: bs,
            conv_out,
            saved,
            out,
        })
    }

    /// Back through [`Network::conv_bn_forward`]: accumulates the parameter gradients into
    /// `grads` and the input gradient into `dx`, and returns `dout` with the ReLU undone
    /// (the gradient of the residual, when there was one).
    #[allow(clippy::too_many_arguments)]
    fn conv_bn_backward<E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        grads: &mut E::Buf,
        (conv, bn): (&ConvParams, &BnParams),
        acts: &ConvBn<E>,
        x: &E::Buf,
        relu: bool,
        mut dout: E::Buf,
        dx: Option<&mut E::Buf>,
    ) -> Result<E::Buf> {
        let mut dconv = eng.alloc(acts.conv.out_len())?;
        eng.batchnorm_backward(
            &acts.bn,
            BnBackward {
                x: eng.all(&acts.conv_out),
                affine: eng.view(params, bn.affine.clone()),
                saved: eng.all(&acts.saved),
                relu_out: relu.then(|| eng.all(&acts.out)),
                dy: eng.all_mut(&mut dout),
                dx: eng.all_mut(&mut dconv),
                daffine: eng.view_mut(grads, bn.affine.clone()),
            },
        )?;
        eng.conv2d_backward(
            &acts.conv,
            ConvBackward {
                x: eng.all(x),
                w: eng.view(params, conv.weight.clone()),
                dy: eng.all(&dconv),
                dw: eng.view_mut(grads, conv.weight.clone()),
                dx: dx.map(|dx| eng.all_mut(dx)),
            },
        )?;
        Ok(dout)
    }

    /// Training-mode forward pass over `input` (`[3, batch, crop, crop]`): batch norms use
    /// this batch's statistics and update `running` (one `num_batches_tracked` step, which
    /// the caller counts).
    pub fn forward_train<'a, E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        running: &mut E::Buf,
        input: &'a E::Buf,
        batch: usize,
        crop: usize,
    ) -> Result<Activations<'a, E>> {
        self.train_pass(eng, params, running, input, (batch, crop), BN_MOMENTUM)
    }

    /// A training-mode forward pass kept only for what it does to `running`: each batch norm
    /// moves its running statistics by `momentum` towards this batch's. At the k-th batch
    /// (from 0) a momentum of `1 / (k + 1)` makes them the plain mean over the batches so far
    /// (PyTorch's `momentum=None`): how [`crate::embed::recalibrate_batch_norm`] gives a
    /// random network the statistics of the data.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_calibrate<E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        running: &mut E::Buf,
        input: &E::Buf,
        batch: usize,
        crop: usize,
        momentum: f32,
    ) -> Result<()> {
        self.train_pass(eng, params, running, input, (batch, crop), momentum)?;
        Ok(())
    }

    fn train_pass<'a, E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        running: &mut E::Buf,
        input: &'a E::Buf,
        (batch, crop): (usize, usize),
        momentum: f32,
    ) -> Result<Activations<'a, E>> {
        ensure!(
            batch >= 2,
            "batch norm in training mode needs at least 2 images per pass, got {batch}"
        );
        self.forward(
            eng,
            params,
            Norm::Train(running, momentum),
            input,
            batch,
            crop,
        )
    }

    /// Evaluation-mode forward pass (PyTorch's `model.eval()`): batch norms use the running
    /// statistics, which stay unchanged. The result's `features` is h and `z` the projection.
    pub fn forward_eval<'a, E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        running: &E::Buf,
        input: &'a E::Buf,
        batch: usize,
        crop: usize,
    ) -> Result<Activations<'a, E>> {
        ensure!(batch >= 1, "an evaluation pass needs at least 1 image");
        self.forward(eng, params, Norm::Eval(running), input, batch, crop)
    }

    fn forward<'a, E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        mut norm: Norm<'_, E>,
        input: &'a E::Buf,
        batch: usize,
        crop: usize,
    ) -> Result<Activations<'a, E>> {
        ensure!(crop >= 1, "crop must be at least 1 pixel");
        ensure!(
            eng.buf_len(input) == 3 * batch * crop * crop,
            "input holds {} values, expected 3 x {batch} x {crop} x {crop}",
            eng.buf_len(input)
        );
        let stem = self.conv_bn_forward(
            eng,
            params,
            &mut norm,
            (&self.stem_conv, &self.stem_bn),
            input,
            (batch, crop, crop),
            None,
            true,
        )?;
        let pool = MaxPool {
            planes: self.config.width * batch,
            in_h: stem.conv.out_h(),
            in_w: stem.conv.out_w(),
            kernel: 3,
            stride: 2,
            pad: 1,
        };
        let mut pooled = eng.alloc(pool.planes * pool.out_h() * pool.out_w())?;
        eng.maxpool_forward(&pool, eng.all(&stem.out), eng.all_mut(&mut pooled))?;

        let mut blocks: Vec<Block<E>> = Vec::with_capacity(self.blocks.len());
        let (mut h, mut w) = (pool.out_h(), pool.out_w());
        for spec in &self.blocks {
            let x = blocks.last().map_or(&pooled, |b| &b.second.out);
            let shape = (batch, h, w);
            let first = self.conv_bn_forward(
                eng,
                params,
                &mut norm,
                (&spec.conv1, &spec.bn1),
                x,
                shape,
                None,
                true,
            )?;
            let downsample = match &spec.downsample {
                Some((conv, bn)) => Some(self.conv_bn_forward(
                    eng,
                    params,
                    &mut norm,
                    (conv, bn),
                    x,
                    shape,
                    None,
                    false,
                )?),
                None => None,
            };
            let shortcut = downsample.as_ref().map_or(x, |d| &d.out);
            let (h1, w1) = (first.conv.out_h(), first.conv.out_w());
            let second = self.conv_bn_forward(
                eng,
                params,
                &mut norm,
                (&spec.conv2, &spec.bn2),
                &first.out,
                (batch, h1, w1),
                Some(shortcut),
                true,
            )?;
            (h, w) = (h1, w1);
            blocks.push(Block {
                first,
                second,
                downsample,
            });
        }

        let last = blocks.last().map_or(&pooled, |b| &b.second.out);
        let dim = self.config.feature_dim();
        let mut features = eng.alloc(dim * batch)?;
        let avg = AvgPool {
            planes: dim * batch,
            spatial: h * w,
        };
        eng.avgpool_forward(&avg, eng.all(last), eng.all_mut(&mut features))?;
        let hidden = project(eng, params, &self.proj_hidden, &features, batch, true)?;
        let z = project(eng, params, &self.proj_out, &hidden, batch, false)?;
        Ok(Activations {
            batch,
            input,
            stem,
            pool,
            pooled,
            blocks,
            features,
            hidden,
            z,
        })
    }

    /// Backward pass from `dz = dL/dz` (`[out_dim, N]`): accumulates `dL/dtheta` into the
    /// flat `grads` buffer.
    pub fn backward<E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        acts: &Activations<'_, E>,
        mut dz: E::Buf,
        grads: &mut E::Buf,
    ) -> Result<()> {
        let batch = acts.batch;
        let dim = self.config.feature_dim();
        let (fc0, fc2) = (&self.proj_hidden, &self.proj_out);
        let mut dhidden = eng.zeros(dim * batch)?;
        eng.linear_backward(
            &linear_shape(fc2, batch),
            LinearBackward {
                x: eng.all(&acts.hidden),
                wb: eng.view(params, fc2.weight_bias.clone()),
                relu_out: None,
                dy: eng.all_mut(&mut dz),
                dwb: eng.view_mut(grads, fc2.weight_bias.clone()),
                dx: Some(eng.all_mut(&mut dhidden)),
            },
        )?;
        let mut dfeatures = eng.zeros(dim * batch)?;
        eng.linear_backward(
            &linear_shape(fc0, batch),
            LinearBackward {
                x: eng.all(&acts.features),
                wb: eng.view(params, fc0.weight_bias.clone()),
                relu_out: Some(eng.all(&acts.hidden)),
                dy: eng.all_mut(&mut dhidden),
                dwb: eng.view_mut(grads, fc0.weight_bias.clone()),
                dx: Some(eng.all_mut(&mut dfeatures)),
            },
        )?;
        self.backward_features(eng, params, acts, dfeatures, grads)
    }

    /// Backward pass from `dh = dL/dh` (`[feature_dim, N]`, the encoder's output, bypassing
    /// the projector): accumulates the encoder's `dL/dtheta` into `grads`.
    pub fn backward_features<E: Engine>(
        &self,
        eng: &E,
        params: &E::Buf,
        acts: &Activations<'_, E>,
        dfeatures: E::Buf,
        grads: &mut E::Buf,
    ) -> Result<()> {
        let batch = acts.batch;
        let dim = self.config.feature_dim();
        ensure!(
            eng.buf_len(&dfeatures) == dim * batch,
            "the features' gradient holds {} values, expected {dim} x {batch}",
            eng.buf_len(&dfeatures)
        );
        let last = acts.blocks.last().map_or(&acts.pooled, |b| &b.second.out);
        let mut dout = eng.alloc(eng.buf_len(last))?;
        let avg = AvgPool {
            planes: dim * batch,
            spatial: eng.buf_len(last) / (dim * batch),
        };
        eng.avgpool_backward(&avg, eng.all(&dfeatures), eng.all_mut(&mut dout))?;

        for (i, (spec, block)) in self.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            let x = if i == 0 {
                &acts.pooled
            } else {
                &acts.blocks[i - 1].second.out
            };
            let mut dmid = eng.zeros(eng.buf_len(&block.first.out))?;
            // out = relu(bn2(conv2(mid)) + shortcut): dshortcut is dout after the ReLU.
            let dshortcut = self.conv_bn_backward(
                eng,
                params,
                grads,
                (&spec.conv2, &spec.bn2),
                &block.second,
                &block.first.out,
                true,
                dout,
                Some(&mut dmid),
            )?;
            let mut dx = match (&spec.downsample, &block.downsample) {
                (Some(params_ds), Some(acts_ds)) => {
                    let mut dx = eng.zeros(eng.buf_len(x))?;
                    self.conv_bn_backward(
                        eng,
                        params,
                        grads,
                        (&params_ds.0, &params_ds.1),
                        acts_ds,
                        x,
                        false,
                        dshortcut,
                        Some(&mut dx),
                    )?;
                    dx
                }
                _ => dshortcut,
            };
            self.conv_bn_backward(
                eng,
                params,
                grads,
                (&spec.conv1, &spec.bn1),
                &block.first,
                x,
                true,
                dmid,
                Some(&mut dx),
            )?;
            dout = dx;
        }

        let mut dstem = eng.alloc(eng.buf_len(&acts.stem.out))?;
        eng.maxpool_backward(
            &acts.pool,
            eng.all(&acts.stem.out),
            eng.all(&dout),
            eng.all_mut(&mut dstem),
        )?;
        self.conv_bn_backward(
            eng,
            params,
            grads,
            (&self.stem_conv, &self.stem_bn),
            &acts.stem,
            acts.input,
            true,
            dstem,
            None,
        )?;
        Ok(())
    }
}
