//! Helpers shared by the integration tests (each test file uses some of them): running the
//! `slam` binary, test images and stores, random inputs, the error metrics ([`metrics`]), the
//! losses' f64 definitions ([`reference`]) and the CPU-vs-CUDA twin harness ([`twin`]).
#![allow(dead_code)]

pub mod metrics;
pub mod reference;
pub mod twin;

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

/// The CUDA engine with its products in `mode`, or None (with the reason printed) where there
/// is no GPU and SLAM_REQUIRE_GPU is unset (the GPU check script sets it, so that a missing
/// GPU fails there). Any other failure to start fails the test.
pub fn cuda(
    mode: slam_ags::engine::cuda::MatmulMode,
) -> Option<slam_ags::engine::cuda::CudaEngine> {
    use slam_ags::engine::cuda::CudaEngine;
    match CudaEngine::new(0) {
        Ok(eng) => {
            println!(
                "GPU: {} (sm_{}{}), kernels {:?}, {mode:?} products",
                eng.device_name(),
                eng.compute_capability().0,
                eng.compute_capability().1,
                eng.kernel_sources()
            );
            eng.set_matmul_mode(mode);
            Some(eng)
        }
        Err(err) if err.is_no_gpu() && std::env::var_os("SLAM_REQUIRE_GPU").is_none() => {
            println!("skipped on the GPU: {err}");
            None
        }
        Err(err) => panic!("cannot start the GPU: {err}"),
    }
}

/// `len` values uniform in [lo, hi).
pub fn uniform_in(rng: &mut rand_chacha::ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    use rand::Rng;
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// `len` values uniform in [-1, 1).
pub fn uniform(rng: &mut rand_chacha::ChaCha8Rng, len: usize) -> Vec<f32> {
    uniform_in(rng, len, -1.0, 1.0)
}

/// Flags of a network small enough for CLI tests: width 4, one block per stage, out_dim 8.
pub const TINY_NET_FLAGS: [&str; 6] = ["--width", "4", "--blocks", "1,1,1,1", "--out-dim", "8"];

/// A network of width `width`, `blocks` BasicBlocks per stage and projector output `out_dim`.
pub fn net(width: usize, blocks: [usize; 4], out_dim: usize) -> slam_ags::model::NetConfig {
    slam_ags::model::NetConfig {
        width,
        blocks,
        out_dim,
    }
}

/// Every patch of `store` embedded by `state` on the CPU engine, center crops of 12 (the
/// 16-pixel patches of [`random_store`]), `batch` patches per pass.
pub fn embed_on_cpu(
    state: &slam_ags::model::ModelState,
    store: &slam_ags::data::PatchStore,
    kind: slam_ags::embed::FeatureKind,
    batch: usize,
) -> slam_ags::embed::Embeddings {
    let settings = slam_ags::embed::EmbedSettings {
        kind,
        crop: 12,
        batch,
    };
    let engine = slam_ags::engine::cpu::CpuEngine;
    slam_ags::embed::embed(&engine, state, store, settings, |_, _| {}).unwrap()
}

/// Asserts that each of `files` exists in `dir`.
pub fn assert_files_exist(dir: &std::path::Path, files: &[&str]) {
    for file in files {
        assert!(
            dir.join(file).exists(),
            "{file} missing in {}",
            dir.display()
        );
    }
}

/// `slam synth` / `slam bags` / `slam demo` flags of a small bag plan: 8 bags of 10 cells at
/// witness rate 0.2.
pub const SMALL_PLAN_FLAGS: [&str; 6] =
    ["--bags", "8", "--bag-size", "10", "--witness-rate", "0.2"];

/// Bags of 30 instances in 6 dimensions; abnormal bags hide 2 instances whose first feature is
/// shifted by 3. A working MIL head learns the bags and attends to those instances.
pub fn toy_bags(count: usize, seed: u64) -> Vec<slam_ags::mil::MilBag> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|b| {
            let label = b % 2 == 0;
            let truth: Vec<bool> = (0..30).map(|i| label && i % 15 == 7).collect();
            let features = truth
                .iter()
                .flat_map(|&t| {
                    let shift = if t { 3.0 } else { 0.0 };
                    (0..6)
                        .map(|d| rng.random_range(-1.0..1.0) + if d == 0 { shift } else { 0.0 })
                        .collect::<Vec<f64>>()
                })
                .collect();
            slam_ags::mil::MilBag {
                name: format!("bag{b}"),
                label,
                features,
                truth: Some(truth),
            }
        })
        .collect()
}

/// Trains `spec` on 40 toy bags (seed 2) and asserts that the loss falls below
/// `loss_ratio` of the first epoch's, that it classifies 20 new toy bags and finds their
/// witnesses in its top 2 attention scores, and that training is deterministic.
pub fn assert_learns_toy_task(
    spec: &slam_ags::mil::HeadSpec,
    config: &slam_ags::mil::MilTrainConfig,
    loss_ratio: f64,
) {
    let mut losses = Vec::new();
    let bags = toy_bags(40, 2);
    let trained = spec
        .train(&bags, 6, config, |log| losses.push(log.loss))
        .unwrap();
    println!("losses {losses:?}");
    assert!(
        losses[config.epochs - 1] < loss_ratio * losses[0],
        "loss {losses:?}"
    );
    let test = toy_bags(20, 3);
    let predictions: Vec<_> = test.iter().map(|b| trained.selected.predict(b)).collect();
    let eval = slam_ags::mil::evaluate(&test, &predictions, 2);
    println!("{eval:?}");
    assert_eq!(eval.metrics.accuracy, 1.0);
    assert_eq!(eval.metrics.auc, Some(1.0));
    assert_eq!(eval.retrieval.len(), 10);
    assert!(eval.mean_fraction().unwrap() > 0.9);
    let again = spec.train(&bags, 6, config, |_| {}).unwrap();
    assert_eq!(
        trained.selected.params, again.selected.params,
        "training is deterministic per seed"
    );
}
