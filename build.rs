//! Compiles every `kernels/*.cu` with nvcc into a fatbin (sm_80 and sm_90 SASS, compute_90 PTX
//! for newer GPUs to JIT) and writes `$OUT_DIR/kernels.rs`, the table `src/engine/cuda` embeds;
//! likewise `dev/cuda/*.cu` (kernel variants under development) into `$OUT_DIR/dev_kernels.rs`,
//! which only the dev programs embed.
//!
//! nvcc is found through `NVCC` (the binary), `CUDA_HOME` or `CUDA_PATH` (`bin/nvcc` below it),
//! else `PATH`. Without nvcc, or when a kernel fails to compile, the build warns and embeds the
//! source alone (NVRTC compiles it at run time); `SLAM_REQUIRE_NVCC=1` makes both an error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const NVCC_ARCH_FLAGS: &[&str] = &[
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=[sm_90,compute_90]",
];

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "SLAM_REQUIRE_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = env::var("SLAM_REQUIRE_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let nvcc = find_nvcc();
    if nvcc.is_none() {
        let msg = "nvcc not found (set NVCC, CUDA_HOME or PATH)";
        if require {
            fail(&format!("SLAM_REQUIRE_NVCC is set and {msg}"));
        }
        println!("cargo:warning={msg}: CUDA kernels will be compiled at run time with NVRTC");
    }
    for (dir, table) in [("kernels", "kernels.rs"), ("dev/cuda", "dev_kernels.rs")] {
        let text = kernel_table(&manifest_dir.join(dir), &out_dir, nvcc.as_deref(), require);
        fs::write(out_dir.join(table), text).expect("cannot write a kernel table");
    }
}

/// The `&[KernelFile]` literal of every `.cu` file in `dir`, sorted by name: its source and,
/// where nvcc compiled it, its fatbin.
fn kernel_table(dir: &Path, out_dir: &Path, nvcc: Option<&Path>, require: bool) -> String {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut kernels: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    kernels.sort();
    let mut table = String::from("&[\n");
    for source in &kernels {
        println!("cargo:rerun-if-changed={}", source.display());
        let stem = source
            .file_stem()
            .unwrap()
            .to_str()
            .expect("kernel names must be UTF-8");
        let fatbin = nvcc.and_then(|nvcc| {
            let fatbin = out_dir.join(format!("{stem}.fatbin"));
            match compile(nvcc, source, &fatbin) {
                Ok(()) => Some(fatbin),
                Err(err) if require => fail(&format!("SLAM_REQUIRE_NVCC is set and {err}")),
                Err(err) => {
                    for line in err.lines() {
                        println!("cargo:warning={line}");
                    }
                    println!("cargo:warning={stem}.cu will be compiled at run time with NVRTC");
                    None
                }
            }
        });
        let fatbin = match fatbin {
            Some(path) => format!("Some(include_bytes!({:?}))", path.to_str().unwrap()),
            None => "None".to_owned(),
        };
        writeln!(
            table,
            "    KernelFile {{ name: {stem:?}, source: include_str!({:?}), fatbin: {fatbin} }},",
            source.to_str().expect("kernel paths must be UTF-8"),
        )
        .unwrap();
    }
    table.push_str("]\n");
    table
}

/// Fails the build with `msg` shown as it is (a panic would add a backtrace).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// The nvcc to use, or None when there is none. An explicit `NVCC` is the only candidate,
/// so that a wrong one is reported instead of silently replaced by another nvcc.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        if !nvcc.is_file() {
            println!("cargo:warning=NVCC={} is not a file", nvcc.display());
            return None;
        }
        return Some(nvcc);
    }
    let toolkits = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(env::var_os);
    let toolkit_nvcc = toolkits.map(|dir| Path::new(&dir).join("bin").join("nvcc"));
    let path = env::var_os("PATH").unwrap_or_default();
    let path_nvcc = env::split_paths(&path).map(|dir| dir.join("nvcc"));
    toolkit_nvcc.chain(path_nvcc).find(|nvcc| nvcc.is_file())
}

/// Runs nvcc on one kernel; the error carries the command line and nvcc's output. nvcc's
/// warnings are passed on as cargo warnings. nvcc finds its own headers, also in the PyPI
/// layout (nvidia/cu13/{bin,include,nvvm}) through the nvcc.profile next to it.
fn compile(nvcc: &Path, source: &Path, fatbin: &Path) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.args(["--fatbin", "-O3"]).args(NVCC_ARCH_FLAGS);
    cmd.arg("-o").arg(fatbin).arg(source);
    let shown = format!("{cmd:?}");
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        return Err(format!(
            "nvcc failed ({}): {shown}\n{stdout}{stderr}",
            output.status
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=nvcc: {line}");
    }
    Ok(())
}
