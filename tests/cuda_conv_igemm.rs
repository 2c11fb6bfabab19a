//! The implicit-GEMM convolution kernel under development (dev/cuda/conv_igemm.cu) against
//! the CPU engine's convolution and the CUDA engine's im2col + cuBLAS, through the dev
//! program's own check (dev/cuda/conv_igemm.rs, included here as a module; its shapes and
//! tolerances are documented there). Without a GPU every test prints why it skips and
//! passes (SLAM_REQUIRE_GPU=1 makes that a failure).

mod common;

#[allow(dead_code)]
#[path = "../dev/cuda/conv_igemm.rs"]
mod conv_igemm;

use common::cuda;
use conv_igemm::{Check, check};
use slam_ags::engine::cuda::MatmulMode;

#[test]
fn igemm_exact_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    check(&gpu, Check::Exact)
}

#[test]
fn igemm_tensor_cores_stay_close() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    check(&gpu, Check::TensorCores)
}

/// Same inputs, same result on every run: each output sums its terms in a fixed order.
#[test]
fn igemm_is_deterministic_and_agrees_with_im2col() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    check(&gpu, Check::Deterministic)
}
