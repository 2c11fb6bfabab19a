//! The implicit-GEMM convolution kernel (kernels/conv_igemm.cu, `Gpu::conv2d_forward_igemm`)
//! against the CPU engine's convolution, on ResNet-18's convolution shapes at a small batch
//! and on odd shapes (every tile edge: output channels and pixels not multiples of the block
//! tile, K not a multiple of the 16-wide slice, kernels 1, 3, 5 and 7, strides 1 to 3).
//! Without a GPU every test prints why it skips and passes (SLAM_REQUIRE_GPU=1 makes that a
//! failure).
//!
//! Tolerances (relative L2 error, and 10x that on the largest element): the exact FFMA path
//! differs from the CPU engine only in summation order, so 1e-5; TF32 rounds both operands
//! to 10 mantissa bits (about 3e-4 relative L2 on these products), so 1e-2.

mod common;

use common::{conv, gpu, rel_err, uniform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::{DevSlice, Gpu, MatmulMode};
use slam_ags::engine::{Conv2d, Engine};

/// ResNet-18's convolutions (at crop 224 divided by 4, batch 2), then odd shapes.
fn shapes() -> Vec<Conv2d> {
    vec![
        conv(2, 3, 64, (56, 56), 7, 2, 3),
        conv(2, 64, 64, (14, 14), 3, 1, 1),
        conv(2, 64, 128, (14, 14), 3, 2, 1),
        conv(2, 64, 128, (14, 14), 1, 2, 0),
        conv(2, 128, 128, (7, 7), 3, 1, 1),
        conv(2, 128, 256, (7, 7), 3, 2, 1),
        conv(2, 128, 256, (7, 7), 1, 2, 0),
        conv(2, 256, 256, (4, 4), 3, 1, 1),
        conv(2, 256, 512, (4, 4), 3, 2, 1),
        conv(2, 256, 512, (4, 4), 1, 2, 0),
        conv(2, 512, 512, (2, 2), 3, 1, 1),
        conv(2, 3, 8, (13, 11), 7, 2, 3),
        conv(3, 8, 16, (9, 7), 3, 2, 1),
        conv(4, 16, 8, (5, 5), 1, 1, 0),
        conv(1, 1, 1, (1, 1), 1, 1, 0),
        conv(2, 4, 4, (2, 2), 3, 1, 1),
        conv(1, 32, 130, (9, 10), 3, 1, 1),
        conv(1, 20, 200, (7, 7), 3, 1, 1),
        conv(3, 5, 65, (11, 13), 5, 3, 2),
        conv(5, 64, 64, (23, 21), 3, 1, 1),
    ]
}

fn case(gpu: &Gpu, s: &Conv2d, seed: u64, tol: f64) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (x, w) = (
        uniform(&mut rng, s.in_len()),
        uniform(&mut rng, s.weight_len()),
    );
    let mut want = vec![0.0; s.out_len()];
    CpuEngine.conv2d_forward(s, &x, &w, &mut want)?;
    let (gx, gw) = (gpu.upload(&x)?, gpu.upload(&w)?);
    // One guard value past the end, which the kernel must leave alone.
    let mut gy = gpu.upload(&vec![f32::NAN; s.out_len() + 1])?;
    let out = s.out_len();
    gpu.conv2d_forward_igemm(s, gx.dev(), gw.dev(), gy.dev_mut().slice_mut(0..out))?;
    let got = gpu.download(gy.dev())?;
    assert!(got[out].is_nan(), "{s:?}: wrote past the output");
    let got = &got[..out];
    let l2 = rel_err(got, &want);
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let max = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (&g, &v)| m.max((g as f64 - v as f64).abs()))
        / scale.max(1e-30);
    println!(
        "{:?} {s:?}: relative L2 error {l2:.2e}, max error {max:.2e}",
        gpu.matmul_mode()
    );
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{s:?}: non-finite values"
    );
    assert!(
        l2 < tol && max < 10.0 * tol,
        "{s:?}: error {l2:e} / {max:e} above {tol:e}"
    );
    Ok(())
}

#[test]
fn igemm_exact_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    gpu.set_matmul_mode(MatmulMode::Exact);
    for (i, s) in shapes().iter().enumerate() {
        case(&gpu, s, 300 + i as u64, 1e-5)?;
    }
    Ok(())
}

#[test]
fn igemm_tensor_cores_stay_close() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for mode in [MatmulMode::Tf32, MatmulMode::Bf16] {
        gpu.set_matmul_mode(mode);
        for (i, s) in shapes().iter().enumerate() {
            case(&gpu, s, 400 + i as u64, 1e-2)?;
        }
    }
    Ok(())
}

/// Same inputs, same result on every run: each output sums its terms in a fixed order.
#[test]
fn igemm_is_deterministic_and_agrees_with_im2col() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    gpu.set_matmul_mode(MatmulMode::Exact);
    let s = conv(3, 64, 128, (15, 15), 3, 1, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (gx, gw) = (
        gpu.upload(&uniform(&mut rng, s.in_len()))?,
        gpu.upload(&uniform(&mut rng, s.weight_len()))?,
    );
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut gy = gpu.upload(&vec![f32::NAN; s.out_len()])?;
        gpu.conv2d_forward_igemm(&s, gx.dev(), gw.dev(), gy.dev_mut())?;
        runs.push(gpu.download(gy.dev())?);
    }
    assert_eq!(runs[0], runs[1], "two runs differ");
    let mut gy = gpu.upload(&vec![f32::NAN; s.out_len()])?;
    gpu.conv2d_forward(&s, gx.dev(), gw.dev(), gy.dev_mut())?;
    let l2 = rel_err(&runs[0], &gpu.download(gy.dev())?);
    println!("igemm vs im2col + cuBLAS: relative L2 {l2:.2e}");
    assert!(l2 < 1e-5, "igemm and im2col differ by {l2:e}");
    Ok(())
}
