//! `slam bench kernels`: each CUDA op timed with CUDA events, next to the device's measured
//! copy bandwidth.

use anyhow::{Context, Result, ensure};
use clap::Args;
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::median;
use crate::data::input::augment::{AugmentConfig, ViewJob, ViewParams};
use crate::data::input::rng::ViewKey;
use crate::data::store::PatchSize;
use crate::engine::cuda::{CudaEngine, DevSlice, MatmulMode, PairLoss};
use crate::engine::{Conv2d, ConvOps, LossViews, SgdBuffers, SgdUpdate, UpdateOps, ViewPair};
use crate::gpu_data::{aug_shape, view_table};

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
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

/// Random values in [-1, 1): never zeros, which can hide unwritten outputs and run faster.
fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// One measured op: median and fastest time, and the bytes it must move or the FLOPs it does.
struct Row {
    name: &'static str,
    size: String,
    median_us: f64,
    min_us: f64,
    bytes: Option<f64>,
    flops: Option<f64>,
}

pub fn run(args: &BenchKernelsArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        args.params > 0 && args.n > 0 && args.dim > 0 && args.views > 0 && args.conv_batch > 0,
        "--params, --n, --dim, --views and --conv-batch must be positive"
    );
    let gpu = CudaEngine::new(args.gpu).context("slam bench kernels needs a CUDA GPU")?;
    let (major, minor) = gpu.compute_capability();
    let (dmaj, dmin) = gpu.driver_version()?;
    let sources: Vec<String> = gpu
        .kernel_sources()
        .iter()
        .map(|(name, source)| format!("{name}.cu: {source:?}"))
        .collect();
    println!(
        "bench kernels: {} (sm_{major}{minor}, {} SMs), driver CUDA {dmaj}.{dmin}; {}",
        gpu.device_name(),
        gpu.sm_count(),
        sources.join(", ")
    );
    println!(
        "median and fastest of {} runs after {} warm-up runs, each timed with CUDA events \
         behind two untimed runs",
        args.runs, args.warmup
    );

    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<(f64, f64)> {
        for _ in 0..args.warmup {
            f()?;
        }
        let mut us = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            // Two untimed runs queued first keep the device busy while the host queues the
            // timed one, so that launch latency stays out of the measurement.
            f()?;
            f()?;
            us.push(1e3 * gpu.time_ms(&mut *f)? as f64);
        }
        gpu.synchronize()?;
        let min = us.iter().copied().fold(f64::INFINITY, f64::min);
        Ok((median(us), min))
    };
    let mut rows = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b65726e);

    // The ceiling: a device-to-device copy well past the L2 cache, bytes read + written.
    let copy_len = (64usize << 20).max(args.params);
    let src: CudaSlice<f32> = gpu.upload(&random(&mut rng, copy_len))?;
    let mut dst: CudaSlice<f32> = gpu.zeros(copy_len)?;
    let (median_us, min_us) = time(&mut || Ok(gpu.stream().memcpy_dtod(&src, &mut dst)?))?;
    rows.push(Row {
        name: "device-to-device copy",
        size: format!("{} MiB", (copy_len * 4) >> 20),
        median_us,
        min_us,
        bytes: Some(8.0 * copy_len as f64),
        flops: None,
    });
    drop((src, dst));

    let p = args.params;
    let size = format!("{p} params");
    let g1 = gpu.upload(&random(&mut rng, p))?;
    let g2 = gpu.upload(&random(&mut rng, p))?;
    let mut params = gpu.upload(&random(&mut rng, p))?;
    let mut momentum = gpu.upload(&random(&mut rng, p))?;
    let mut combined: CudaSlice<f32> = gpu.zeros(p)?;
    let mut dots: CudaSlice<f64> = gpu.zeros(3)?;
    let u = SgdUpdate {
        alpha: 0.9,
        beta: 1.1,
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    let (v1, v2) = (g1.dev(), g2.dev());
    let mut dots_view = dots.dev_mut();
    let (median_us, min_us) = time(&mut || gpu.grad_dots_to(v1, v2, dots_view.reborrow()))?;
    rows.push(Row {
        name: "AGS grad_dots (f64 reduction)",
        size: size.clone(),
        median_us,
        min_us,
        bytes: Some(8.0 * p as f64),
        flops: None,
    });
    let (mut pv, mut mv) = (params.dev_mut(), momentum.dev_mut());
    let mut sgd_step = || {
        let buffers = SgdBuffers {
            g1: v1,
            g2: v2,
            params: pv.reborrow(),
            momentum: mv.reborrow(),
        };
        gpu.sgd_step(&u, buffers)
    };
    let (median_us, min_us) = time(&mut sgd_step)?;
    rows.push(Row {
        name: "AGS + SGD fused update",
        size: size.clone(),
        median_us,
        min_us,
        bytes: Some(24.0 * p as f64),
        flops: None,
    });
    let (median_us, min_us) = time(&mut || {
        gpu.grad_dots_to(v1, v2, dots_view.reborrow())?;
        sgd_step()
    })?;
    rows.push(Row {
        name: "AGS step: grad_dots + update",
        size: size.clone(),
        median_us,
        min_us,
        bytes: Some(32.0 * p as f64),
        flops: None,
    });
    let mut cv = combined.dev_mut();
    let (median_us, min_us) = time(&mut || gpu.combine_grads((0.9, 1.1), v1, v2, cv.reborrow()))?;
    rows.push(Row {
        name: "combine_grads",
        size,
        median_us,
        min_us,
        bytes: Some(12.0 * p as f64),
        flops: None,
    });

    let pair = ViewPair {
        dim: args.dim,
        n: args.n,
    };
    let len = args.dim * args.n;
    let size = format!("2n={} x {}", 2 * args.n, args.dim);
    let z_i = gpu.upload(&random(&mut rng, len))?;
    let z_j = gpu.upload(&random(&mut rng, len))?;
    let (zi, zj) = (z_i.dev(), z_j.dev());
    let mut dz_i: CudaSlice<f32> = gpu.zeros(len)?;
    let mut dz_j: CudaSlice<f32> = gpu.zeros(len)?;
    let mut loss: CudaSlice<f32> = gpu.zeros(1)?;
    let (mut di, mut dj, mut lv) = (dz_i.dev_mut(), dz_j.dev_mut(), loss.dev_mut());
    let m = 2.0 * args.n as f64;
    let losses = [
        (
            PairLoss::NtXent,
            "NT-Xent loss + grad (3 kernels, 3 sgemm)",
            Some(6.0 * m * m * args.dim as f64),
        ),
        (PairLoss::Cohesion, "cohesion loss + grad (3 kernels)", None),
    ];
    for (kind, name, flops) in losses {
        let (median_us, min_us) = time(&mut || {
            let views = LossViews {
                z_i: zi,
                z_j: zj,
                dz_i: di.reborrow(),
                dz_j: dj.reborrow(),
            };
            gpu.pair_loss_to(kind, &pair, 0.07, views, lv.reborrow())
        })?;
        rows.push(Row {
            name,
            size: size.clone(),
            median_us,
            min_us,
            bytes: None,
            flops,
        });
    }

    rows.push(bench_augment(args, &gpu, &mut rng, &time)?);
    rows.extend(bench_conv(args, &gpu, &mut rng, &time)?);

    let copy_gbs = rows[0].bytes.expect("copy bytes") / rows[0].median_us / 1e3;
    println!(
        "{:<42} {:>22} {:>10} {:>10} {:>10} {:>9} {:>10}",
        "op", "size", "median us", "min us", "GB/s", "% copy", "TFLOP/s"
    );
    for row in &rows {
        let gbs = row.bytes.map(|b| b / row.median_us / 1e3);
        let cell =
            |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        println!(
            "{:<42} {:>22} {:>10.1} {:>10.1} {:>10} {:>9} {:>10}",
            row.name,
            row.size,
            row.median_us,
            row.min_us,
            cell(gbs, 0),
            cell(gbs.map(|g| 100.0 * g / copy_gbs), 1),
            cell(row.flops.map(|f| f / row.median_us / 1e6), 2),
        );
    }
    println!(
        "GB/s counts the bytes each pass must move (every input read once, every output written \
         once); the copy counts bytes read + written. A convolution's FLOPs are 2 x its \
         multiply-adds (im2col's unfolding and zero padding not counted)."
    );
    Ok(())
}

/// `time` of [`run`]: an op's median and fastest microseconds.
type Timer<'a> = dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> + 'a;

/// The fused view kernel over `--views` views of a step (a quarter center crops, the rest
/// contrastive views with the reference's jitter, as a SLAM step has them) of random patches
/// resident on the device, view table upload included. It must move every view's crop in
/// (u8, read once) and its normalized f32 CHW out: 15 bytes per output pixel.
fn bench_augment(
    args: &BenchKernelsArgs,
    gpu: &CudaEngine,
    rng: &mut ChaCha8Rng,
    time: &Timer<'_>,
) -> Result<Row> {
    let cfg = AugmentConfig {
        crop: args.crop,
        ..AugmentConfig::default()
    };
    let size = PatchSize::square(args.patch);
    let shape = aug_shape(&cfg, size)?;
    // Distinct patches for every view, so that no view is served from another's cache lines.
    let patches = args.views;
    let host: Vec<u8> = (0..patches * size.bytes()).map(|_| rng.random()).collect();
    let pixels: CudaSlice<u8> = gpu.upload(&host)?;
    let center = ViewParams::center(&cfg, size)?;
    let jobs = (0..args.views)
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
    let mut out: CudaSlice<f32> = gpu.zeros(ranges[0].end)?;
    let (px, mut ov) = (pixels.dev(), out.dev_mut());
    let (median_us, min_us) = time(&mut || gpu.augment(px, &shape, &table, ov.reborrow()))?;
    let pixels_out = (args.views * cfg.crop * cfg.crop) as f64;
    Ok(Row {
        name: "augment views (u8 HWC -> f32 CNHW)",
        size: format!("{} x {}^2 of {}^2", args.views, cfg.crop, args.patch),
        median_us,
        min_us,
        bytes: Some(15.0 * pixels_out),
        flops: None,
    })
}

/// Forward convolutions of ResNet-18 at `--conv-batch` images of `--crop` pixels (the stem,
/// a layer1 3x3, a layer3 3x3 and a layer2 1x1 stride-2 downsample), by im2col + cuBLAS (what
/// the engine runs), with exact f32 products and with TF32. The implicit-GEMM variant times
/// itself against these in `cargo run --release --example conv_igemm`.
fn bench_conv(
    args: &BenchKernelsArgs,
    gpu: &CudaEngine,
    rng: &mut ChaCha8Rng,
    time: &Timer<'_>,
) -> Result<Vec<Row>> {
    let (n, crop) = (args.conv_batch, args.crop);
    let conv = |cin, cout, hw: usize, kernel, stride, pad| Conv2d {
        batch: n,
        in_channels: cin,
        out_channels: cout,
        in_h: hw,
        in_w: hw,
        kernel,
        stride,
        pad,
    };
    let layers = [
        ("stem", conv(3, 64, crop, 7, 2, 3)),
        ("layer1", conv(64, 64, crop / 4, 3, 1, 1)),
        ("layer3", conv(256, 256, crop / 16, 3, 1, 1)),
        ("down2", conv(64, 128, crop / 4, 1, 2, 0)),
    ];
    let versions = [
        ("conv fwd im2col+cuBLAS (exact)", MatmulMode::Exact),
        ("conv fwd im2col+cuBLAS (tf32)", MatmulMode::Tf32),
    ];
    let mode = gpu.matmul_mode();
    let mut rows = Vec::new();
    for (layer, s) in layers {
        let x = gpu.upload(&random(rng, s.in_len()))?;
        let w = gpu.upload(&random(rng, s.weight_len()))?;
        let mut y: CudaSlice<f32> = gpu.zeros(s.out_len())?;
        let (xv, wv, mut yv) = (x.dev(), w.dev(), y.dev_mut());
        for (name, matmul) in versions {
            gpu.set_matmul_mode(matmul);
            let (median_us, min_us) = time(&mut || gpu.conv2d_forward(&s, xv, wv, yv.reborrow()))?;
            rows.push(Row {
                name,
                size: format!(
                    "{layer} {}>{} {}x{}/{} @{}",
                    s.in_channels, s.out_channels, s.kernel, s.kernel, s.stride, s.in_h
                ),
                median_us,
                min_us,
                bytes: None,
                flops: Some(2.0 * s.macs() as f64),
            });
        }
    }
    gpu.set_matmul_mode(mode);
    Ok(rows)
}
