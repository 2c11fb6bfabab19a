//! The embedded CUDA kernels: the table build.rs writes (every `kernels/*.cu`, its source and
//! fatbin) and the launch constants the Rust side shares with the kernels. Needs no GPU; the
//! ops themselves are held to their CPU twins by tests/cuda_ops.rs.

use std::fs;
use std::path::Path;

use slam_ags::engine::cuda::{
    AGS_DOTS_BLOCK, AGS_UPDATE_BLOCK, CONV_BLOCK, KERNEL_FILES, LINEAR_BLOCK, LOSS_BLOCK,
    LOSS_COLS, NORM_BLOCK, NORM_CHUNK, POOL_BLOCK, kernel_file,
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
