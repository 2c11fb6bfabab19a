//! Each distinct convolution and batch norm of one training pass, timed alone on random
//! operands (`slam bench layers`): where a step's time goes, layer by layer. The rows and
//! their names match `pytorch/bench_cpu.py layers`, which times PyTorch's ops at the same
//! shapes.

use std::time::Instant;

use anyhow::{Result, ensure};
use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::kernels::random;
use crate::engine::{BatchNorm, BnBackward, BnForward, BnStats, Conv2d, ConvBackward, Engine};
use crate::model::{BN_EPS, BN_MOMENTUM, NetSpec, Network};

/// What `slam bench layers` times.
#[derive(Args, Clone, Debug)]
pub struct LayersBench {
    #[command(flatten)]
    pub net: NetSpec,
    /// Side of the input crops.
    #[arg(long, default_value_t = 64)]
    pub crop: usize,
    /// Images per pass (a step of `slam bench step --batch B` runs four passes of B/2).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Timed runs of each op (the fastest is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs of each op first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

/// One distinct layer of a pass: its best forward and backward times.
#[derive(Debug, Serialize)]
pub struct LayerTiming {
    /// `conv` or `bn`.
    pub op: &'static str,
    /// `conv3x3/1 64->64 @16` (kernel, stride, channels, input side) or `bn+relu 64 @16`.
    pub name: String,
    /// How many layers of one pass have this shape.
    pub count: usize,
    pub forward_ms: f64,
    /// Convolutions: the input and weight gradients (the stem's weight gradient only, as in
    /// the step); batch norm: back through the ReLU mask and the normalization.
    pub backward_ms: f64,
}

/// The distinct items of `items`, in order of first appearance, with their counts.
fn distinct<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<(T, usize)> {
    let mut out: Vec<(T, usize)> = Vec::new();
    for item in items {
        match out.iter_mut().find(|(seen, _)| *seen == item) {
            Some((_, count)) => *count += 1,
            None => out.push((item, 1)),
        }
    }
    out
}

impl LayersBench {
    /// Times every distinct convolution and batch norm (with ReLU) of one training pass on
    /// `eng`; calls `on_layer` after each.
    pub fn run<E: Engine>(
        &self,
        eng: &E,
        on_layer: &mut dyn FnMut(&LayerTiming),
    ) -> Result<Vec<LayerTiming>> {
        ensure!(self.runs > 0, "--runs must be at least 1");
        ensure!(self.batch >= 2, "--batch must be at least 2 (batch norm)");
        let net = Network::new(self.net.resolve()?);
        let convs = net.conv_shapes(self.batch, self.crop);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut rows = Vec::new();
        for (s, count) in distinct(convs.iter().copied()) {
            // The step needs no input gradient of the stem.
            let stem = s == convs[0];
            let row = self.conv(eng, &s, stem, count, &mut rng)?;
            on_layer(&row);
            rows.push(row);
        }
        let norms = convs.iter().map(|s| (s.out_channels, s.out_h(), s.out_w()));
        for ((channels, h, w), count) in distinct(norms) {
            let s = BatchNorm {
                channels,
                per_channel: self.batch * h * w,
                eps: BN_EPS,
                momentum: BN_MOMENTUM,
            };
            let row = self.batch_norm(eng, &s, h, count, &mut rng)?;
            on_layer(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    /// The fastest of `runs` runs of `op` (after `warmup` untimed ones), in milliseconds.
    fn best<E: Engine>(&self, eng: &E, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            op()?;
        }
        eng.synchronize()?;
        let mut best = f64::INFINITY;
        for _ in 0..self.runs {
            let start = Instant::now();
            op()?;
            eng.synchronize()?;
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    }

    fn conv<E: Engine>(
        &self,
        eng: &E,
        s: &Conv2d,
        stem: bool,
        count: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<LayerTiming> {
        let x = eng.upload(&random(rng, s.in_len()))?;
        let w = eng.upload(&random(rng, s.weight_len()))?;
        let dy = eng.upload(&random(rng, s.out_len()))?;
        let (mut y, mut dw) = (eng.alloc(s.out_len())?, eng.zeros(s.weight_len())?);
        let mut dx = eng.zeros(s.in_len())?;
        let forward_ms = self.best(eng, || {
            eng.conv2d_forward(s, eng.all(&x), eng.all(&w), eng.all_mut(&mut y))
        })?;
        let backward_ms = self.best(eng, || {
            let backward = ConvBackward {
                x: eng.all(&x),
                w: eng.all(&w),
                dy: eng.all(&dy),
                dw: eng.all_mut(&mut dw),
                dx: (!stem).then(|| eng.all_mut(&mut dx)),
            };
            eng.conv2d_backward(s, backward)
        })?;
        Ok(LayerTiming {
            op: "conv",
            name: format!(
                "conv{k}x{k}/{} {}->{} @{}",
                s.stride,
                s.in_channels,
                s.out_channels,
                s.in_h,
                k = s.kernel
            ),
            count,
            forward_ms,
            backward_ms,
        })
    }

    fn batch_norm<E: Engine>(
        &self,
        eng: &E,
        s: &BatchNorm,
        side: usize,
        count: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<LayerTiming> {
        let c = s.channels;
        let x = eng.upload(&random(rng, s.len()))?;
        let dy0 = random(rng, s.len());
        let affine = eng.upload(&[vec![1.0; c], vec![0.0; c]].concat())?;
        let mut running = eng.upload(&[vec![0.0; c], vec![1.0; c]].concat())?;
        let (mut saved, mut y) = (eng.alloc(2 * c)?, eng.alloc(s.len())?);
        let (mut dx, mut daffine) = (eng.alloc(s.len())?, eng.zeros(2 * c)?);
        let forward_ms = self.best(eng, || {
            let forward = BnForward {
                x: eng.all(&x),
                affine: eng.all(&affine),
                residual: None,
                relu: true,
                y: eng.all_mut(&mut y),
                stats: BnStats::Batch {
                    saved: eng.all_mut(&mut saved),
                    running: eng.all_mut(&mut running),
                },
            };
            eng.batchnorm_forward(s, forward)
        })?;
        // The backward pass masks dy in place: each run starts from a fresh copy, uploaded
        // outside the timed op.
        let mut dys: Vec<E::Buf> = (0..self.warmup + self.runs)
            .map(|_| eng.upload(&dy0))
            .collect::<Result<_>>()?;
        let backward_ms = self.best(eng, || {
            let mut dy = dys.pop().expect("one copy of dy per run");
            let backward = BnBackward {
                x: eng.all(&x),
                affine: eng.all(&affine),
                saved: eng.all(&saved),
                relu_out: Some(eng.all(&y)),
                dy: eng.all_mut(&mut dy),
                dx: eng.all_mut(&mut dx),
                daffine: eng.all_mut(&mut daffine),
            };
            eng.batchnorm_backward(s, backward)
        })?;
        Ok(LayerTiming {
            op: "bn",
            name: format!("bn+relu {c} @{side}"),
            count,
            forward_ms,
            backward_ms,
        })
    }
}
