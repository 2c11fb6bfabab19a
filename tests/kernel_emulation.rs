//! The CUDA kernels' logic on the host, where there is no GPU: `scripts/emu/` compiles a
//! kernel source as C++ with a shim (`cuda_shim.h`) that runs each block's threads as fibers
//! (barriers for `__syncthreads`, the warp shuffles and the warp-level `mma.sync`) and checks
//! it, launched as `src/engine/cuda/` launches it, against a naive reference. One test per
//! kernel file; each skips, saying why, where no C++ compiler is found.

use std::path::Path;
use std::process::Command;

/// Builds and runs `scripts/emu/<driver>.cpp` through `emulate.sh`; panics on any failure.
fn emulate(driver: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/emu/emulate.sh");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        println!("skipped: no C++ compiler ({cxx}) to build the emulation");
        return;
    }
    let out = Command::new("bash")
        .arg(&script)
        .arg(driver)
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the emulation of {driver} failed");
    assert!(text.contains("\n0 failures"), "{text}");
}

#[test]
fn implicit_gemm_convolution_matches_a_naive_one_in_emulation() {
    emulate("conv_igemm");
}

#[test]
fn batch_norm_kernels_match_the_cpu_formulas_in_emulation() {
    emulate("norm");
}

#[test]
fn pooling_kernels_match_the_cpu_twin_bit_for_bit_in_emulation() {
    emulate("pool");
}

#[test]
fn convolution_unfolding_and_linear_kernels_match_naive_ones_in_emulation() {
    emulate("conv_linear");
}
