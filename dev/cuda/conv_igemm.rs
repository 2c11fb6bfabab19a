//! The forward convolution as one implicit-GEMM kernel (dev/cuda/conv_igemm.cu): the same
//! result as the engine's im2col + cuBLAS (`ConvOps::conv2d_forward` of the CUDA engine)
//! without the unfolded matrix, which it never writes or reads back. A kernel variant under
//! development, not on the engine's path: this file loads it, checks it against the CPU
//! engine and times it against the engine's convolution, side by side.
//!
//! ```text
//! cargo run --release --example conv_igemm                   check, then time at the reference shapes
//! cargo run --release --example conv_igemm -- --batch 32 --crop 112 --runs 50
//! ```
//!
//! The engine's [`MatmulMode`] picks the arithmetic: `Exact` runs the f32 FFMA kernels (k
//! summed in order), `Tf32` the TF32 tensor-core kernels (mma.sync m16n8k8), and `Bf16` the
//! TF32 ones too (no bf16 kernel: TF32 keeps more mantissa bits than bf16 at the same speed
//! class). Layers with at most 64 output channels take the 64-row block tile, the others the
//! 128-row one. `tests/cuda_conv_igemm.rs` runs [`check`] on a GPU; the host emulation of the
//! kernel (`scripts/emu/conv_igemm.sh`) runs everywhere in `cargo test`.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::{CudaEngine, DevSlice, DevView, DevViewMut, KernelFile, MatmulMode};
use slam_ags::engine::{Conv2d, ConvOps, ViewLen};

/// The kernel files of dev/cuda, embedded (with their fatbins when nvcc built them).
const DEV_KERNEL_FILES: &[KernelFile] = include!(concat!(env!("OUT_DIR"), "/dev_kernels.rs"));

/// `IGEMM_THREADS` of dev/cuda/conv_igemm.cu.
pub const IGEMM_THREADS: u32 = 256;
/// `IGEMM_BN` of dev/cuda/conv_igemm.cu: output pixels per block.
const IGEMM_BN: usize = 128;

/// The four kernels of dev/cuda/conv_igemm.cu, loaded on one engine's device.
pub struct ConvIgemm {
    f32_m64: CudaFunction,
    f32_m128: CudaFunction,
    tf32_m64: CudaFunction,
    tf32_m128: CudaFunction,
}

/// `IgemmShape` of dev/cuda/conv_igemm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct IgemmShape {
    batch: u32,
    cin: u32,
    cout: u32,
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    kernel: u32,
    stride: u32,
    pad: u32,
}

// SAFETY: a plain struct of u32s with the kernel's layout.
unsafe impl cudarc::driver::DeviceRepr for IgemmShape {}

/// Checks the shape against the kernel's index types and returns it in its form.
fn igemm_shape(s: &Conv2d) -> Result<IgemmShape> {
    ensure!(
        s.kernel > 0
            && s.stride > 0
            && s.in_h + 2 * s.pad >= s.kernel
            && s.in_w + 2 * s.pad >= s.kernel,
        "convolution shape {s:?} has no output"
    );
    let fits_i32 = |v: usize| i32::try_from(v).is_ok();
    ensure!(
        fits_i32(s.batch * s.in_h * s.in_w)
            && fits_i32(s.batch * s.out_h() * s.out_w())
            && fits_i32(s.in_channels * s.kernel * s.kernel)
            && fits_i32(s.out_channels)
            && fits_i32(s.in_h + s.pad + s.kernel)
            && fits_i32(s.in_w + s.pad + s.kernel),
        "convolution too large for the implicit-GEMM kernel: {s:?}"
    );
    let u = |v: usize| v as u32;
    Ok(IgemmShape {
        batch: u(s.batch),
        cin: u(s.in_channels),
        cout: u(s.out_channels),
        in_h: u(s.in_h),
        in_w: u(s.in_w),
        out_h: u(s.out_h()),
        out_w: u(s.out_w()),
        kernel: u(s.kernel),
        stride: u(s.stride),
        pad: u(s.pad),
    })
}

impl ConvIgemm {
    /// Loads dev/cuda/conv_igemm.cu on `eng`'s device.
    pub fn load(eng: &CudaEngine) -> Result<Self> {
        let file = DEV_KERNEL_FILES
            .iter()
            .find(|f| f.name == "conv_igemm")
            .context("build.rs embeds dev/cuda/conv_igemm.cu")?;
        let (module, source) = eng.load_module(file)?;
        println!("dev/cuda/conv_igemm.cu: {source:?}");
        let function = |name: &str| {
            module
                .load_function(name)
                .with_context(|| format!("loading kernel {name}"))
        };
        Ok(Self {
            f32_m64: function("conv_igemm_f32_m64")?,
            f32_m128: function("conv_igemm_f32_m128")?,
            tf32_m64: function("conv_igemm_tf32_m64")?,
            tf32_m128: function("conv_igemm_tf32_m128")?,
        })
    }

    /// `y = conv(x, w)` by the implicit-GEMM kernel in `eng`'s [`MatmulMode`]; `y` is
    /// written. Means what `ConvOps::conv2d_forward` means.
    pub fn forward(
        &self,
        eng: &CudaEngine,
        s: &Conv2d,
        x: DevView<'_>,
        w: DevView<'_>,
        y: DevViewMut<'_>,
    ) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        let shape = igemm_shape(s)?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let tensor_cores = eng.matmul_mode() != MatmulMode::Exact;
        let (f, rows) = match (tensor_cores, s.out_channels <= 64) {
            (false, true) => (&self.f32_m64, 64),
            (false, false) => (&self.f32_m128, 128),
            (true, true) => (&self.tf32_m64, 64),
            (true, false) => (&self.tf32_m128, 128),
        };
        let pixels = s.batch * s.out_h() * s.out_w();
        let grid_y = s.out_channels.div_ceil(rows);
        ensure!(
            grid_y <= 65535,
            "convolution with {} output channels is beyond the implicit-GEMM grid",
            s.out_channels
        );
        let cfg = LaunchConfig {
            grid_dim: (pixels.div_ceil(IGEMM_BN) as u32, grid_y as u32, 1),
            block_dim: (IGEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x is [Cin, N, H, W], w [Cout, Cin*k*k], y [Cout, N*Ho*Wo] (lengths
        // checked); the kernel reads and writes only within them, and its indices fit their
        // types (igemm_shape).
        unsafe {
            eng.stream()
                .launch_builder(f)
                .arg(x.ptr())
                .arg(w.ptr())
                .arg(&shape)
                .arg(y.ptr())
                .launch(cfg)?;
        }
        Ok(())
    }
}

/// ResNet-18's convolutions (at crop 224 divided by 4, batch 2), then odd shapes: every tile
/// edge (output channels and pixels not multiples of the block tile, K not a multiple of the
/// 16-wide slice), kernels 1, 3, 5 and 7, strides 1 to 3.
fn check_shapes() -> Vec<Conv2d> {
    vec![
        Conv2d::new(2, (3, 64), (56, 56), (7, 2, 3)),
        Conv2d::new(2, (64, 64), (14, 14), (3, 1, 1)),
        Conv2d::new(2, (64, 128), (14, 14), (3, 2, 1)),
        Conv2d::new(2, (64, 128), (14, 14), (1, 2, 0)),
        Conv2d::new(2, (128, 128), (7, 7), (3, 1, 1)),
        Conv2d::new(2, (128, 256), (7, 7), (3, 2, 1)),
        Conv2d::new(2, (128, 256), (7, 7), (1, 2, 0)),
        Conv2d::new(2, (256, 256), (4, 4), (3, 1, 1)),
        Conv2d::new(2, (256, 512), (4, 4), (3, 2, 1)),
        Conv2d::new(2, (256, 512), (4, 4), (1, 2, 0)),
        Conv2d::new(2, (512, 512), (2, 2), (3, 1, 1)),
        Conv2d::new(2, (3, 8), (13, 11), (7, 2, 3)),
        Conv2d::new(3, (8, 16), (9, 7), (3, 2, 1)),
        Conv2d::new(4, (16, 8), (5, 5), (1, 1, 0)),
        Conv2d::new(1, (1, 1), (1, 1), (1, 1, 0)),
        Conv2d::new(2, (4, 4), (2, 2), (3, 1, 1)),
        Conv2d::new(1, (32, 130), (9, 10), (3, 1, 1)),
        Conv2d::new(1, (20, 200), (7, 7), (3, 1, 1)),
        Conv2d::new(3, (5, 65), (11, 13), (5, 3, 2)),
        Conv2d::new(5, (64, 64), (23, 21), (3, 1, 1)),
    ]
}

/// `len` values uniform in [-1, 1).
fn uniform(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Relative L2 error and the largest error relative to the largest magnitude of `want`.
fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut diff, mut norm, mut max, mut scale) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        diff += d * d;
        norm += (w as f64).powi(2);
        max = max.max(d);
        scale = scale.max((w as f64).abs());
    }
    ((diff / norm.max(1e-30)).sqrt(), max / scale.max(1e-30))
}

/// One shape against the CPU engine: relative L2 error below `tol` and the largest error
/// below `10 tol`, nothing non-finite, nothing written past the output.
fn check_case(eng: &CudaEngine, k: &ConvIgemm, s: &Conv2d, seed: u64, tol: f64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (x, w) = (
        uniform(&mut rng, s.in_len()),
        uniform(&mut rng, s.weight_len()),
    );
    let mut want = vec![0.0; s.out_len()];
    CpuEngine.conv2d_forward(s, &x, &w, &mut want)?;
    let (gx, gw) = (eng.upload(&x)?, eng.upload(&w)?);
    // One guard value past the end, which the kernel must leave alone.
    let out = s.out_len();
    let mut gy = eng.upload(&vec![f32::NAN; out + 1])?;
    k.forward(eng, s, gx.dev(), gw.dev(), gy.dev_mut().slice_mut(0..out))?;
    let got = eng.download(gy.dev())?;
    ensure!(got[out].is_nan(), "{s:?}: wrote past the output");
    let got = &got[..out];
    let (l2, max) = errors(got, &want);
    println!(
        "{:?} {s:?}: relative L2 error {l2:.2e}, max error {max:.2e}",
        eng.matmul_mode()
    );
    ensure!(
        got.iter().all(|v| v.is_finite()),
        "{s:?}: non-finite values"
    );
    ensure!(
        l2 < tol && max < 10.0 * tol,
        "{s:?}: error {l2:e} / {max:e} above {tol:e}"
    );
    Ok(())
}

/// Which part of the check to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Exact FFMA kernels against the CPU engine to 1e-5: they differ only in summation
    /// order.
    Exact,
    /// TF32 (and bf16 mode, which runs TF32) to 1e-2: TF32 rounds both operands to 10
    /// mantissa bits (about 3e-4 relative L2 on these products).
    TensorCores,
    /// Two runs bit-identical (each output sums its terms in a fixed order), and within 1e-5
    /// of the engine's im2col + cuBLAS.
    Deterministic,
}

/// Holds the kernel to its twins; leaves the engine in exact mode.
pub fn check(eng: &CudaEngine, which: Check) -> Result<()> {
    let k = ConvIgemm::load(eng)?;
    match which {
        Check::Exact => {
            eng.set_matmul_mode(MatmulMode::Exact);
            for (i, s) in check_shapes().iter().enumerate() {
                check_case(eng, &k, s, 300 + i as u64, 1e-5)?;
            }
        }
        Check::TensorCores => {
            for mode in [MatmulMode::Tf32, MatmulMode::Bf16] {
                eng.set_matmul_mode(mode);
                for (i, s) in check_shapes().iter().enumerate() {
                    check_case(eng, &k, s, 400 + i as u64, 1e-2)?;
                }
            }
        }
        Check::Deterministic => {
            eng.set_matmul_mode(MatmulMode::Exact);
            let s = Conv2d::new(3, (64, 128), (15, 15), (3, 1, 1));
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let (gx, gw) = (
                eng.upload(&uniform(&mut rng, s.in_len()))?,
                eng.upload(&uniform(&mut rng, s.weight_len()))?,
            );
            let mut runs = Vec::new();
            for _ in 0..2 {
                let mut gy = eng.upload(&vec![f32::NAN; s.out_len()])?;
                k.forward(eng, &s, gx.dev(), gw.dev(), gy.dev_mut())?;
                runs.push(eng.download(gy.dev())?);
            }
            ensure!(runs[0] == runs[1], "two runs differ");
            let mut gy = eng.upload(&vec![f32::NAN; s.out_len()])?;
            eng.conv2d_forward(&s, gx.dev(), gw.dev(), gy.dev_mut())?;
            let (l2, _) = errors(&runs[0], &eng.download(gy.dev())?);
            println!("igemm vs im2col + cuBLAS: relative L2 {l2:.2e}");
            ensure!(l2 < 1e-5, "igemm and im2col differ by {l2:e}");
        }
    }
    eng.set_matmul_mode(MatmulMode::Exact);
    Ok(())
}

/// The implicit-GEMM convolution checked against the CPU engine and timed against the
/// engine's im2col + cuBLAS at ResNet-18's shapes.
#[derive(Parser, Debug)]
struct Args {
    /// Images per batch of the timed convolutions (the reference: 128).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Side of the network's input crops (the reference: 224).
    #[arg(long, default_value_t = 224)]
    crop: usize,
    /// Timed runs of each convolution (the median is reported).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Skip the check against the CPU engine.
    #[arg(long)]
    no_check: bool,
}

/// Median and fastest microseconds of `runs` runs of `f`, after five warm-up runs.
fn time_us(eng: &CudaEngine, runs: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..5 {
        f()?;
    }
    let mut us = Vec::with_capacity(runs);
    for _ in 0..runs {
        us.push(1e3 * eng.time_ms(&mut *f)? as f64);
    }
    eng.synchronize()?;
    us.sort_by(f64::total_cmp);
    Ok((us[us.len() / 2], us[0]))
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.runs > 0 && args.batch > 0,
        "--runs and --batch must be positive"
    );
    let eng = match CudaEngine::new(0) {
        Ok(eng) => eng,
        // The GPU check sets SLAM_REQUIRE_GPU: there a missing GPU is a failure, not a skip.
        Err(err) if err.is_no_gpu() && std::env::var_os("SLAM_REQUIRE_GPU").is_none() => {
            println!("skipped: {err}");
            return Ok(());
        }
        Err(err) => return Err(err.into()),
    };
    println!(
        "{} (sm_{}{})",
        eng.device_name(),
        eng.compute_capability().0,
        eng.compute_capability().1
    );
    if !args.no_check {
        for which in [Check::Exact, Check::TensorCores, Check::Deterministic] {
            check(&eng, which)?;
        }
        println!("check: passed");
    }
    let k = ConvIgemm::load(&eng)?;
    let (n, crop) = (args.batch, args.crop);
    let layers = [
        ("stem", Conv2d::new(n, (3, 64), (crop, crop), (7, 2, 3))),
        (
            "layer1",
            Conv2d::new(n, (64, 64), (crop / 4, crop / 4), (3, 1, 1)),
        ),
        (
            "layer3",
            Conv2d::new(n, (256, 256), (crop / 16, crop / 16), (3, 1, 1)),
        ),
        (
            "down2",
            Conv2d::new(n, (64, 128), (crop / 4, crop / 4), (1, 2, 0)),
        ),
    ];
    println!(
        "{:<10} {:<26} {:>12} {:>12} {:>10}",
        "layer", "version", "median us", "min us", "TFLOP/s"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b65726e);
    for (layer, s) in layers {
        let x = eng.upload(&uniform(&mut rng, s.in_len()))?;
        let w = eng.upload(&uniform(&mut rng, s.weight_len()))?;
        let mut y = eng.upload(&vec![0.0; s.out_len()])?;
        let (xv, wv, mut yv) = (x.dev(), w.dev(), y.dev_mut());
        for mode in [MatmulMode::Exact, MatmulMode::Tf32] {
            eng.set_matmul_mode(mode);
            let im2col = time_us(&eng, args.runs, &mut || {
                eng.conv2d_forward(&s, xv, wv, yv.reborrow())
            })?;
            let igemm = time_us(&eng, args.runs, &mut || {
                k.forward(&eng, &s, xv, wv, yv.reborrow())
            })?;
            for (version, (median, min)) in [("im2col + cuBLAS", im2col), ("implicit GEMM", igemm)]
            {
                println!(
                    "{layer:<10} {:<26} {median:>12.1} {min:>12.1} {:>10.2}",
                    format!("{version} ({mode:?})"),
                    2.0 * s.macs() as f64 / median / 1e6
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn igemm_shape_takes_the_reference_shapes_and_refuses_oversized_ones() {
        let shape =
            |batch, cin, hw, k, stride| Conv2d::new(batch, (cin, 64), (hw, hw), (k, stride, k / 2));
        let stem = igemm_shape(&shape(128, 3, 224, 7, 2)).unwrap();
        assert_eq!((stem.out_h, stem.out_w, stem.pad), (112, 112, 3));
        igemm_shape(&shape(128, 64, 56, 3, 1)).unwrap();
        // batch * H * W past i32.
        let err = igemm_shape(&shape(1 << 16, 3, 256, 3, 1)).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        // A kernel larger than the padded image.
        let mut s = shape(1, 3, 4, 7, 1);
        s.pad = 0;
        assert!(igemm_shape(&s).is_err());
    }
}
