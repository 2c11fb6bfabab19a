//! The CUDA kernels' logic on the host, where there is no GPU: `scripts/emu/` compiles a
//! kernel source as C++ with a shim that runs each block's threads as fibers (barriers for
//! `__syncthreads`, warp-level `mma.sync` assembled from the lanes' fragments) and checks it
//! against a naive f64 reference. Skips, saying why, where no C++ compiler is found.

use std::path::Path;
use std::process::Command;

#[test]
fn implicit_gemm_convolution_matches_a_naive_one_in_emulation() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/emu/conv_igemm.sh");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        println!("skipped: no C++ compiler ({cxx}) to build the emulation");
        return;
    }
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the emulation failed");
    assert!(text.contains("0 failures"), "{text}");
}
