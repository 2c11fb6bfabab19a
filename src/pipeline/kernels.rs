//! Each CUDA op timed with CUDA events, next to the device's measured copy bandwidth
//! (`slam bench kernels`): the surgery and update passes over the flat parameters, both
//! losses, the fused view kernel and the engine's convolutions at ResNet-18's shapes.

use anyhow::{Result, ensure};
use clap::Args;
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::bench::median;
use crate::data::input::augment::{AugmentConfig, ViewJob, ViewParams};
use crate::data::input::rng::ViewKey;
use crate::data::store::PatchSize;
use crate::engine::cuda::{CudaEngine, DevSlice, MatmulMode, PairLoss};
use crate::engine::{Conv2d, ConvOps, LossViews, SgdBuffers, SgdUpdate, UpdateOps, ViewPair};
use crate::feed::{aug_shape, view_table};

/// What `slam bench kernels` times, at the reference's sizes by default.
#[derive(Args, Clone, Debug)]
pub struct KernelBench {
    /// Flat parameter count of the AGS and SGD passes (the reference: ResNet-18 + projector).
    #[arg(long, default_value_t = 11_701_824)]
    pub params: usize,
    /// Samples per view of the losses (2n rows in all; the reference: 128).
    #[arg(long, default_value_t = 128)]
    pub n: usize,
    /// Embedding size of the losses (the reference: 512).
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Views per launch of the augmentation kernel (the reference: 4 views x 128 = 512).
    #[arg(long, default_value_t = 512)]
    pub views: usize,
    /// Side of the square u8 patches the augmentation reads (the reference: 256).
    #[arg(long, default_value_t = 256)]
    pub patch: usize,
    /// Side of the views it writes (the reference: 224).
    #[arg(long, default_value_t = 224)]
    pub crop: usize,
    /// Images per batch of the convolution rows (the reference: 128; at --crop).
    #[arg(long, default_value_t = 128)]
    pub conv_batch: usize,
    /// Timed runs of each op (the median is reported).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Untimed runs of each op first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
}

/// One measured op: median and fastest time, and the bytes it must move or the FLOPs it
/// does.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub name: &'static str,
    pub size: String,
    pub median_us: f64,
    pub min_us: f64,
    pub bytes: Option<f64>,
    pub flops: Option<f64>,
}

/// Random values in [-1, 1): never zeros, which can hide unwritten outputs and run faster.
pub(crate) fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Times ops on one engine: each run behind two untimed ones, after the warm-up.
struct Timer<'a> {
    eng: &'a CudaEngine,
    runs: usize,
    warmup: usize,
}

impl Timer<'_> {
    /// An op's row: median and fastest microseconds of `f`.
    fn row(
        &self,
        name: &'static str,
        size: &str,
        (bytes, flops): (Option<f64>, Option<f64>),
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<KernelRow> {
        for _ in 0..self.warmup {
            f()?;
        }
        let mut us = Vec::with_capacity(self.runs);
        for _ in 0..self.runs {
            // Two untimed runs queued first keep the device busy while the host queues the
            // timed one, so that launch latency stays out of the measurement.
            f()?;
            f()?;
            us.push(1e3 * self.eng.time_ms(&mut *f)? as f64);
        }
        self.eng.synchronize()?;
        let min_us = us.iter().copied().fold(f64::INFINITY, f64::min);
        Ok(KernelRow {
            name,
            size: size.to_owned(),
            median_us: median(us),
            min_us,
            bytes,
            flops,
        })
    }
}

impl KernelBench {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.runs > 0, "--runs must be at least 1");
        ensure!(
            self.params > 0 && self.n > 0 && self.dim > 0 && self.views > 0 && self.conv_batch > 0,
            "--params, --n, --dim, --views and --conv-batch must be positive"
        );
        Ok(())
    }

    /// Every row, the device-to-device copy (the bandwidth ceiling) first.
    pub fn run(&self, eng: &CudaEngine) -> Result<Vec<KernelRow>> {
        self.validate()?;
        let timer = Timer {
            eng,
            runs: self.runs,
            warmup: self.warmup,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0x6b65726e);
        let mut rows = vec![self.copy(&timer, &mut rng)?];
        rows.extend(self.surgery(&timer, &mut rng)?);
        rows.extend(self.losses(&timer, &mut rng)?);
        rows.push(self.augment(&timer, &mut rng)?);
        rows.extend(self.convolutions(&timer, &mut rng)?);
        Ok(rows)
    }

    /// A device-to-device copy well past the L2 cache, bytes read + written.
    fn copy(&self, timer: &Timer<'_>, rng: &mut ChaCha8Rng) -> Result<KernelRow> {
        let eng = timer.eng;
        let len = (64usize << 20).max(self.params);
        let src: CudaSlice<f32> = eng.upload(&random(rng, len))?;
        let mut dst: CudaSlice<f32> = eng.zeros(len)?;
        let size = format!("{} MiB", (len * 4) >> 20);
        let cost = (Some(8.0 * len as f64), None);
        timer.row("device-to-device copy", &size, cost, &mut || {
            Ok(eng.stream().memcpy_dtod(&src, &mut dst)?)
        })
    }

    /// The surgery's inner products and the fused update over the flat parameters.
    fn surgery(&self, timer: &Timer<'_>, rng: &mut ChaCha8Rng) -> Result<Vec<KernelRow>> {
        let eng = timer.eng;
        let p = self.params;
        let size = format!("{p} params");
        let (g1, g2) = (eng.upload(&random(rng, p))?, eng.upload(&random(rng, p))?);
        let mut params = eng.upload(&random(rng, p))?;
        let mut momentum = eng.upload(&random(rng, p))?;
        let mut combined: CudaSlice<f32> = eng.zeros(p)?;
        let mut dots: CudaSlice<f64> = eng.zeros(3)?;
        let u = SgdUpdate {
            alpha: 0.9,
            beta: 1.1,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        let (v1, v2) = (g1.dev(), g2.dev());
        let mut dots_view = dots.dev_mut();
        let (mut pv, mut mv) = (params.dev_mut(), momentum.dev_mut());
        let mut sgd_step = || {
            let buffers = SgdBuffers {
                g1: v1,
                g2: v2,
                params: pv.reborrow(),
                momentum: mv.reborrow(),
            };
            eng.sgd_step(&u, buffers)
        };
        let bytes = |per_value: f64| (Some(per_value * p as f64), None);
        let mut rows = vec![timer.row(
            "AGS grad_dots (f64 reduction)",
            &size,
            bytes(8.0),
            &mut || eng.grad_dots_to(v1, v2, dots_view.reborrow()),
        )?];
        rows.push(timer.row("AGS + SGD fused update", &size, bytes(24.0), &mut sgd_step)?);
        rows.push(timer.row(
            "AGS step: grad_dots + update",
            &size,
            bytes(32.0),
            &mut || {
                eng.grad_dots_to(v1, v2, dots_view.reborrow())?;
                sgd_step()
            },
        )?);
        let mut cv = combined.dev_mut();
        rows.push(timer.row("combine_grads", &size, bytes(12.0), &mut || {
            eng.combine_grads((0.9, 1.1), v1, v2, cv.reborrow())
        })?);
        Ok(rows)
    }

    /// Both losses with their gradients over `2n` rows of `dim`.
    fn losses(&self, timer: &Timer<'_>, rng: &mut ChaCha8Rng) -> Result<Vec<KernelRow>> {
        let eng = timer.eng;
        let pair = ViewPair {
            dim: self.dim,
            n: self.n,
        };
        let len = self.dim * self.n;
        let size = format!("2n={} x {}", 2 * self.n, self.dim);
        let (z_i, z_j) = (
            eng.upload(&random(rng, len))?,
            eng.upload(&random(rng, len))?,
        );
        let mut dz_i: CudaSlice<f32> = eng.zeros(len)?;
        let mut dz_j: CudaSlice<f32> = eng.zeros(len)?;
        let mut loss: CudaSlice<f32> = eng.zeros(1)?;
        let (mut di, mut dj, mut lv) = (dz_i.dev_mut(), dz_j.dev_mut(), loss.dev_mut());
        let m = 2.0 * self.n as f64;
        let kinds = [
            (
                PairLoss::NtXent,
                "NT-Xent loss + grad (3 kernels, 3 sgemm)",
                Some(6.0 * m * m * self.dim as f64),
            ),
            (PairLoss::Cohesion, "cohesion loss + grad (3 kernels)", None),
        ];
        let mut rows = Vec::new();
        for (kind, name, flops) in kinds {
            rows.push(timer.row(name, &size, (None, flops), &mut || {
                let views = LossViews {
                    z_i: z_i.dev(),
                    z_j: z_j.dev(),
                    dz_i: di.reborrow(),
                    dz_j: dj.reborrow(),
                };
                eng.pair_loss_to(kind, &pair, 0.07, views, lv.reborrow())
            })?);
        }
        Ok(rows)
    }

    /// The fused view kernel over `views` views of a step (a quarter center crops, the rest
    /// contrastive views with the reference's jitter, as a SLAM step has them) of random
    /// patches resident on the device, view table upload included. It must move every view's
    /// crop in (u8, read once) and its normalized f32 CHW out: 15 bytes per output pixel.
    fn augment(&self, timer: &Timer<'_>, rng: &mut ChaCha8Rng) -> Result<KernelRow> {
        let eng = timer.eng;
        let cfg = AugmentConfig {
            crop: self.crop,
            ..AugmentConfig::default()
        };
        let size = PatchSize::square(self.patch);
        let shape = aug_shape(&cfg, size)?;
        // Distinct patches for every view, so that no view is served from another's cache
        // lines.
        let host: Vec<u8> = (0..self.views * size.bytes())
            .map(|_| rng.random())
            .collect();
        let pixels: CudaSlice<u8> = eng.upload(&host)?;
        let center = ViewParams::center(&cfg, size)?;
        let jobs = (0..self.views)
            .map(|v| {
                let params = if v % 4 == 2 {
                    center
                } else {
                    let key = ViewKey {
                        seed: 1,
                        step: 0,
                        slot: v as u32,
                        view: 0,
                    };
                    ViewParams::contrastive(&cfg, size, key)?
                };
                Ok(ViewJob {
                    patch: v as u32,
                    params,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (table, ranges) = view_table(&[&jobs], cfg.crop, Ok)?;
        let mut out: CudaSlice<f32> = eng.zeros(ranges[0].end)?;
        let (px, mut ov) = (pixels.dev(), out.dev_mut());
        let pixels_out = (self.views * cfg.crop * cfg.crop) as f64;
        let label = format!("{} x {}^2 of {}^2", self.views, cfg.crop, self.patch);
        timer.row(
            "augment views (u8 HWC -> f32 CNHW)",
            &label,
            (Some(15.0 * pixels_out), None),
            &mut || eng.augment(px, &shape, &table, ov.reborrow()),
        )
    }

    /// Forward convolutions of ResNet-18 at `conv_batch` images of `crop` pixels (the stem, a
    /// layer1 3x3, a layer3 3x3 and a layer2 1x1 stride-2 downsample), by im2col + cuBLAS
    /// (what the engine runs), with exact f32 products and with TF32. The implicit-GEMM
    /// variant times itself against these in `cargo run --release --example conv_igemm`.
    fn convolutions(&self, timer: &Timer<'_>, rng: &mut ChaCha8Rng) -> Result<Vec<KernelRow>> {
        let eng = timer.eng;
        let (n, crop) = (self.conv_batch, self.crop);
        let conv = |(cin, cout), hw, (kernel, stride, pad)| {
            Conv2d::new(n, (cin, cout), (hw, hw), (kernel, stride, pad))
        };
        let layers = [
            ("stem", conv((3, 64), crop, (7, 2, 3))),
            ("layer1", conv((64, 64), crop / 4, (3, 1, 1))),
            ("layer3", conv((256, 256), crop / 16, (3, 1, 1))),
            ("down2", conv((64, 128), crop / 4, (1, 2, 0))),
        ];
        let versions = [
            ("conv fwd im2col+cuBLAS (exact)", MatmulMode::Exact),
            ("conv fwd im2col+cuBLAS (tf32)", MatmulMode::Tf32),
        ];
        let mode = eng.matmul_mode();
        let mut rows = Vec::new();
        for (layer, s) in layers {
            let x = eng.upload(&random(rng, s.in_len()))?;
            let w = eng.upload(&random(rng, s.weight_len()))?;
            let mut y: CudaSlice<f32> = eng.zeros(s.out_len())?;
            let (xv, wv, mut yv) = (x.dev(), w.dev(), y.dev_mut());
            let size = format!(
                "{layer} {}>{} {}x{}/{} @{}",
                s.in_channels, s.out_channels, s.kernel, s.kernel, s.stride, s.in_h
            );
            for (name, matmul) in versions {
                eng.set_matmul_mode(matmul);
                let cost = (None, Some(2.0 * s.macs() as f64));
                rows.push(timer.row(name, &size, cost, &mut || {
                    eng.conv2d_forward(&s, xv, wv, yv.reborrow())
                })?);
            }
        }
        eng.set_matmul_mode(mode);
        Ok(rows)
    }
}
