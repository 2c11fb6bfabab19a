//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

/// Relative L2 error of `got` against `want`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Runs `f` on a rayon pool of `threads` threads.
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Runs the built `slam` binary.
pub fn slam(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_slam"))
        .args(args)
        .output()
        .expect("slam runs")
}

/// Asserts that `out` is a failure with exit status 1 whose stderr mentions every needle and
/// no panic; returns stderr.
pub fn assert_fails_with(out: &std::process::Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1; stderr {err:?}"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "stderr {err:?} does not mention {needle:?}"
        );
    }
    assert!(!err.contains("panicked"), "slam panicked: {err}");
    err
}

/// Asserts that `out` is a success; returns stdout and stderr together.
pub fn assert_succeeds(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "slam failed: {text}");
    text
}

/// A deterministic RGB image whose pixels depend on `seed` and position.
pub fn test_image(width: u32, height: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 7 + seed * 31) as u8,
            (y * 13 + seed * 5) as u8,
            (x * y + seed * 3) as u8,
        ])
    })
}

/// Saves an image at `path` in the format its extension names, creating its folder.
pub fn save_image(path: &std::path::Path, image: impl Into<image::DynamicImage>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.into().save(path).unwrap();
}

/// The path of `path` as a `&str` for command lines.
pub fn arg(path: &std::path::Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A store of four bags (abnormal, normal, abnormal, normal) of 12 random 16x16 patches,
/// with instance truth: the first patch of each abnormal bag is an abnormal cell.
pub fn random_store(dir: &std::path::Path) -> std::path::PathBuf {
    use rand::{Rng, SeedableRng};
    use slam_ags::data::{BagLabel, PatchSize, StoreWriter};
    let path = dir.join("train.patches");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut w = StoreWriter::create(&path, PatchSize::square(16)).unwrap();
    for (name, label) in [
        ("abnormal_0", BagLabel::Abnormal),
        ("normal_0", BagLabel::Normal),
        ("abnormal_1", BagLabel::Abnormal),
        ("normal_1", BagLabel::Normal),
    ] {
        w.begin_bag(name, label).unwrap();
        for i in 0..12 {
            let pixels: Vec<u8> = (0..16 * 16 * 3).map(|_| rng.random()).collect();
            let cell = label.is_abnormal() && i == 0;
            w.push_patch(&pixels, Some(cell), &format!("{name}/{i}.png"))
                .unwrap();
        }
    }
    w.finish().unwrap();
    path
}

/// `slam pretrain` flags of a network small enough for tests: a ResNet-10 of width 4 with
/// projector output 8, batch 8 at crop 12 (the 16x16 patches of [`random_store`]).
pub const TINY_RUN_FLAGS: [&str; 10] = [
    "--arch",
    "resnet10",
    "--width",
    "4",
    "--out-dim",
    "8",
    "--batch",
    "8",
    "--crop",
    "12",
];

/// Whether the CUDA driver library loads here (a machine without it has no GPU).
pub fn has_cuda_driver() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The GPU, or None (with the reason printed) where there is none and SLAM_REQUIRE_GPU is
/// unset (the GPU check script sets it, so that a missing GPU fails there). Any other
/// failure to start fails the test.
pub fn gpu() -> Option<slam_ags::engine::cuda::Gpu> {
    use slam_ags::engine::cuda::Gpu;
    match Gpu::new(0) {
        Ok(gpu) => {
            println!(
                "GPU: {} (sm_{}{}), kernels {:?}",
                gpu.name(),
                gpu.compute_capability().0,
                gpu.compute_capability().1,
                gpu.kernel_sources()
            );
            Some(gpu)
        }
        Err(err) if err.is_no_gpu() && std::env::var_os("SLAM_REQUIRE_GPU").is_none() => {
            println!("skipped: {err}");
            None
        }
        Err(err) => panic!("cannot start the GPU: {err}"),
    }
}

/// The CUDA engine in `mode` on [`gpu`]'s terms (None, with the reason printed, without a
/// GPU).
pub fn cuda_engine(
    mode: slam_ags::engine::cuda::MatmulMode,
) -> Option<slam_ags::engine::cuda::CudaEngine> {
    let engine = slam_ags::engine::cuda::CudaEngine::from_gpu(gpu()?);
    engine.gpu().set_matmul_mode(mode);
    Some(engine)
}

/// `len` values uniform in [-1, 1).
pub fn uniform(rng: &mut rand_chacha::ChaCha8Rng, len: usize) -> Vec<f32> {
    use rand::Rng;
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A convolution of `batch` images of `hw`, `cin` to `cout` channels.
pub fn conv(
    batch: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
) -> slam_ags::engine::Conv2d {
    slam_ags::engine::Conv2d {
        batch,
        in_channels: cin,
        out_channels: cout,
        in_h: hw.0,
        in_w: hw.1,
        kernel: k,
        stride,
        pad,
    }
}
