//! The embedded CUDA kernels: the table build.rs writes (every `kernels/*.cu`, its source and
//! fatbin), the launch constants the Rust side shares with the kernels, and the NVRTC path
//! that compiles a kernel file without a fatbin. Needs no GPU; the ops themselves are held to
//! their CPU twins by tests/cuda_ops.rs.

use std::fs;
use std::path::Path;

use slam_ags::engine::cuda::{
    AGS_DOTS_BLOCK, AGS_UPDATE_BLOCK, CONV_BLOCK, KERNEL_FILES, KernelFile, LINEAR_BLOCK,
    LOSS_BLOCK, LOSS_COLS, NORM_BLOCK, NORM_CHUNK, POOL_BLOCK, compile_cubin, kernel_file,
};

/// The names of the `extern "C" __global__` functions declared in a kernel source.
fn kernel_names(source: &str) -> Vec<&str> {
    source
        .split("extern \"C\" __global__")
        .skip(1)
        .map(|decl| {
            let decl = decl
                .trim_start()
                .strip_prefix("void")
                .expect("kernels return void");
            let decl = match decl.trim_start().strip_prefix("__launch_bounds__") {
                Some(rest) => &rest[rest.find(')').unwrap() + 1..],
                None => decl,
            };
            decl[..decl.find('(').unwrap()].trim()
        })
        .collect()
}

#[test]
fn every_kernel_file_is_embedded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    // The GPU check runs this executable on another machine, away from the checkout.
    let checkout = dir.is_dir();
    if checkout {
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
            .map(|path| path.file_stem().unwrap().to_str().unwrap().to_owned())
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = KERNEL_FILES.iter().map(|k| k.name).collect();
        assert_eq!(embedded, on_disk);
    } else {
        println!(
            "{} is not here: the embedded sources are not compared with it",
            dir.display()
        );
    }

    for file in KERNEL_FILES {
        if checkout {
            let source = fs::read_to_string(dir.join(format!("{}.cu", file.name))).unwrap();
            assert_eq!(
                file.source, source,
                "{}.cu differs from the embedded source",
                file.name
            );
        }
        let names = kernel_names(file.source);
        assert!(
            !names.is_empty(),
            "{}.cu declares no extern \"C\" kernel",
            file.name
        );
        match file.fatbin {
            Some(fatbin) => {
                assert!(!fatbin.is_empty(), "{}.fatbin is empty", file.name);
                for name in names {
                    let found = fatbin.windows(name.len()).any(|w| w == name.as_bytes());
                    assert!(found, "{}.fatbin lacks kernel {name}", file.name);
                }
            }
            None => println!("{}.cu: no fatbin embedded (built without nvcc)", file.name),
        }
    }
    assert!(kernel_file("ags").is_some() && kernel_file("loss").is_some());
    assert!(kernel_file("no-such-kernel").is_none());
}

#[test]
fn block_sizes_match_the_kernels() {
    for (file, define, value) in [
        ("ags", "AGS_DOTS_BLOCK", AGS_DOTS_BLOCK),
        ("ags", "AGS_UPDATE_BLOCK", AGS_UPDATE_BLOCK),
        ("loss", "LOSS_BLOCK", LOSS_BLOCK),
        ("loss", "LOSS_COLS", LOSS_COLS),
        ("norm", "NORM_BLOCK", NORM_BLOCK),
        ("norm", "NORM_CHUNK", NORM_CHUNK as u32),
        ("pool", "POOL_BLOCK", POOL_BLOCK),
        ("conv", "CONV_BLOCK", CONV_BLOCK),
        ("linear", "LINEAR_BLOCK", LINEAR_BLOCK),
    ] {
        let line = format!("#define {define} {value}\n");
        assert!(
            kernel_file(file).unwrap().source.contains(&line),
            "{file}.cu lacks {line:?}"
        );
    }
}

/// Without a fatbin the engine compiles a kernel file with NVRTC, to a cubin for the device's
/// own architecture (native code the driver loads as it is, where PTX from a newer NVRTC
/// would be refused). Every kernel file, the engine's and dev/cuda's, compiles so for sm_80
/// and sm_90; needs libnvrtc (CI puts the pinned one on LD_LIBRARY_PATH), no GPU.
#[test]
fn nvrtc_compiles_every_kernel_file_to_a_cubin() {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        // CI installs NVRTC with the pinned nvcc and sets SLAM_REQUIRE_NVCC: there a missing
        // library is a broken setup, not a reason to skip.
        assert!(
            std::env::var_os("SLAM_REQUIRE_NVCC").is_none(),
            "SLAM_REQUIRE_NVCC is set but libnvrtc cannot be loaded: put the folder of the \
             pinned nvidia-cuda-nvrtc's libnvrtc.so.13 on LD_LIBRARY_PATH"
        );
        println!("skipped: libnvrtc cannot be loaded (put its folder on LD_LIBRARY_PATH)");
        return;
    }
    let dev: &[KernelFile] = include!(concat!(env!("OUT_DIR"), "/dev_kernels.rs"));
    for file in KERNEL_FILES.iter().chain(dev) {
        for arch in [(8, 0), (9, 0)] {
            let cubin = compile_cubin(file, arch)
                .unwrap_or_else(|e| panic!("{}.cu for sm_{}{}: {e}", file.name, arch.0, arch.1));
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{}.cu: not an ELF cubin",
                file.name
            );
            for name in kernel_names(file.source) {
                let found = cubin.windows(name.len()).any(|w| w == name.as_bytes());
                assert!(found, "{}.cu's cubin lacks kernel {name}", file.name);
            }
            println!(
                "{}.cu: sm_{}{} cubin of {} bytes",
                file.name,
                arch.0,
                arch.1,
                cubin.len()
            );
        }
    }
}
