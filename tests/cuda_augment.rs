//! The fused view kernel (kernels/augment.cu through `feed::DeviceStore` and
//! `CudaEngine::augment`) against the CPU augmentation (`render_batch`), bit for bit, for many random
//! keys and settings, with the store resident and streamed. Without a GPU each GPU test prints
//! why it skips and passes; with `SLAM_REQUIRE_GPU=1` a missing GPU fails them instead.

mod common;

use std::path::Path;

use common::cuda;
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::input::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
use slam_ags::data::input::rng::ViewKey;
use slam_ags::data::store::{BagLabel, PatchSize, PatchStore, StoreWriter};
use slam_ags::engine::cuda::{AUGMENT_BLOCK, AugView, DevSlice, MatmulMode, kernel_file};
use slam_ags::engine::nchw_to_cnhw;
use slam_ags::feed::{DeviceStore, Residency, aug_shape, view_table};

/// A store of `count` patches of `size` with pixels that exercise every branch of the ops:
/// random colors, grays (r = g = b, hue's equal-channel case), ties between two channels,
/// and the ends 0 and 255.
fn write_store(path: &Path, size: PatchSize, count: usize, seed: u64) -> PatchStore {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = StoreWriter::create(path, size).unwrap();
    for (bag, label) in [
        ("abnormal", BagLabel::Abnormal),
        ("normal", BagLabel::Normal),
    ] {
        w.begin_bag(bag, label).unwrap();
        for _ in 0..count / 2 {
            let mut px = Vec::with_capacity(size.bytes());
            for _ in 0..size.height * size.width {
                let [r, g, b]: [u8; 3] = rng.random();
                px.extend_from_slice(&match rng.random_range(0..8) {
                    0 => [r, r, r],
                    1 => [r, r, b],
                    2 => [r, g, g],
                    3 => [0, g, 255],
                    4 => [255, 255, b],
                    _ => [r, g, b],
                });
            }
            w.push_patch(&px, None, "").unwrap();
        }
    }
    w.finish().unwrap();
    PatchStore::open(path).unwrap()
}

/// The settings under test: the reference; odd crops of non-square patches; strong jitter
/// applied half the time (every op order, factors far from 1, large hue shifts); a crop as
/// large as the patch; and hue 0 (the identity op).
fn configs() -> Vec<(PatchSize, AugmentConfig)> {
    let strong = AugmentConfig {
        flip_p: 0.5,
        jitter_p: 0.5,
        brightness: 0.8,
        contrast: 0.8,
        saturation: 0.8,
        hue: 0.5,
        rotate_p: 0.5,
        ..AugmentConfig::default()
    };
    vec![
        (PatchSize::square(256), AugmentConfig::default()),
        (
            PatchSize {
                height: 37,
                width: 29,
            },
            AugmentConfig {
                crop: 13,
                ..strong.clone()
            },
        ),
        (
            PatchSize {
                height: 20,
                width: 31,
            },
            AugmentConfig {
                crop: 20,
                ..strong.clone()
            },
        ),
        (
            PatchSize::square(96),
            AugmentConfig {
                crop: 72,
                ..strong.clone()
            },
        ),
        (
            PatchSize::square(40),
            AugmentConfig {
                crop: 33,
                hue: 0.0,
                ..AugmentConfig::default()
            },
        ),
    ]
}

/// A step's four groups as the trainer makes them: two contrastive views of the positives,
/// a center crop and a contrastive view of the negatives, patches sampled with repeats.
fn step_jobs(
    rng: &mut ChaCha8Rng,
    cfg: &AugmentConfig,
    size: PatchSize,
    patches: usize,
    step: u64,
    n_pos: usize,
    n_neg: usize,
) -> [Vec<ViewJob>; 4] {
    let pos: Vec<u32> = (0..n_pos)
        .map(|_| rng.random_range(0..patches as u32))
        .collect();
    let neg: Vec<u32> = (0..n_neg)
        .map(|_| rng.random_range(0..patches as u32))
        .collect();
    let seed = rng.random();
    let contrastive = |patch: u32, slot: usize, view: u32| ViewJob {
        patch,
        params: ViewParams::contrastive(
            cfg,
            size,
            ViewKey {
                seed,
                step,
                slot: slot as u32,
                view,
            },
        )
        .unwrap(),
    };
    let center = ViewParams::center(cfg, size).unwrap();
    [
        pos.iter()
            .enumerate()
            .map(|(s, &p)| contrastive(p, s, 0))
            .collect(),
        pos.iter()
            .enumerate()
            .map(|(s, &p)| contrastive(p, s, 1))
            .collect(),
        neg.iter()
            .map(|&patch| ViewJob {
                patch,
                params: center,
            })
            .collect(),
        neg.iter()
            .enumerate()
            .map(|(s, &p)| contrastive(p, n_pos + s, 1))
            .collect(),
    ]
}

/// The CPU's views of `groups`, each group NCHW-rendered then reordered to the engines'
/// `[3, n, crop, crop]`, back to back: what the engine receives from the CPU path.
fn cpu_views(store: &PatchStore, cfg: &AugmentConfig, groups: &[&[ViewJob]]) -> Vec<f32> {
    let plane = cfg.crop * cfg.crop;
    let mut all = Vec::new();
    for jobs in groups {
        let mut out = vec![0.0; jobs.len() * 3 * plane];
        render_batch(store.pixels(), store.patch_size(), jobs, cfg, &mut out).unwrap();
        all.extend(nchw_to_cnhw(&out, jobs.len(), 3, plane));
    }
    all
}

/// Values whose bits differ, and the largest difference in units in the last place.
fn ulp_diff(got: &[f32], want: &[f32]) -> (usize, u64) {
    assert_eq!(got.len(), want.len());
    let mut count = 0;
    let mut max = 0;
    for (&a, &b) in got.iter().zip(want) {
        if a.to_bits() != b.to_bits() {
            count += 1;
            max = max.max((a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs());
        }
    }
    (count, max)
}

#[test]
fn block_size_matches_the_kernel() {
    let line = format!("#define AUG_BLOCK {AUGMENT_BLOCK}\n");
    assert!(kernel_file("augment").unwrap().source.contains(&line));
    assert!(
        kernel_file("augment")
            .unwrap()
            .source
            .contains("#define AUG_CHUNK 64\n"),
        "the contrast mean's chunks must be src/data/input/augment/render.rs's CHUNK"
    );
}

/// The table of a whole step is accepted by the launch check against the output it needs:
/// runs on the CPU.
#[test]
fn step_tables_pass_the_launch_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (i, (size, cfg)) in configs().into_iter().enumerate() {
        let store = write_store(&dir.path().join(format!("{i}.patches")), size, 6, i as u64);
        let jobs = step_jobs(&mut rng, &cfg, size, store.len(), 7, 5, 3);
        let groups: Vec<&[ViewJob]> = jobs.iter().map(Vec::as_slice).collect();
        let (table, ranges) = view_table(&groups, cfg.crop, Ok).unwrap();
        let total = ranges.last().unwrap().end;
        assert_eq!(total, 16 * 3 * cfg.crop * cfg.crop);
        let shape = aug_shape(&cfg, size).unwrap();
        slam_ags::engine::cuda::check_augment(&shape, store.pixels().len(), &table, total).unwrap();
        assert!(
            slam_ags::engine::cuda::check_augment(&shape, store.pixels().len(), &table, total - 1)
                .is_err()
        );
    }
}

#[test]
fn views_match_the_cpu_bit_for_bit_resident_and_streamed() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut rng = ChaCha8Rng::seed_from_u64(0xa06);
    for (i, (size, cfg)) in configs().into_iter().enumerate() {
        let store = write_store(&dir.path().join(format!("{i}.patches")), size, 12, i as u64);
        for residency in [Residency::Resident, Residency::Streamed] {
            let (n_pos, n_neg) = (6, 5);
            let mut dstore = DeviceStore::new(&gpu, &store, residency, 2 * (n_pos + n_neg), 0)?;
            println!(
                "config {i} ({size}, crop {}): {}",
                cfg.crop,
                dstore.summary()
            );
            // Several steps in a row: the streamed slots are reused in turn.
            for step in 0..5 {
                let jobs = step_jobs(&mut rng, &cfg, size, store.len(), step, n_pos, n_neg);
                let groups: Vec<&[ViewJob]> = jobs.iter().map(Vec::as_slice).collect();
                let want = cpu_views(&store, &cfg, &groups);
                // One float of slack in front: offset 1 takes the 4-byte store path.
                for front in [0, 1] {
                    let mut out: CudaSlice<f32> = gpu.zeros(front + want.len())?;
                    let view = out.dev_mut().slice_mut(front..front + want.len());
                    let ranges = dstore.render_now(&gpu, &store, &cfg, &groups, view)?;
                    assert_eq!(ranges.last().unwrap().end, want.len());
                    let got = gpu.download(out.dev())?;
                    let (count, max) = ulp_diff(&got[front..], &want);
                    println!(
                        "  {residency:?} step {step} offset {front}: {count} of {} values differ, max {max} ulp",
                        want.len()
                    );
                    assert_eq!(
                        (count, max),
                        (0, 0),
                        "config {i} {residency:?} step {step} offset {front}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Overlapped use: the next step is staged before the current one is rendered (the two
/// slots in flight), and the views still match.
#[test]
fn streaming_two_steps_ahead_matches() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (size, cfg) = configs().swap_remove(1);
    let store = write_store(&dir.path().join("s.patches"), size, 40, 9);
    let mut dstore = DeviceStore::new(&gpu, &store, Residency::Streamed, 16, 0)?;
    assert!(!dstore.is_resident());
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let steps: Vec<[Vec<ViewJob>; 4]> = (0..6)
        .map(|s| step_jobs(&mut rng, &cfg, size, store.len(), s, 4, 4))
        .collect();
    let patches =
        |jobs: &[Vec<ViewJob>; 4]| -> Vec<u32> { jobs.iter().flatten().map(|j| j.patch).collect() };
    let mut staged = Some(dstore.stage(&store, &patches(&steps[0]))?);
    for (k, jobs) in steps.iter().enumerate() {
        let next = match steps.get(k + 1) {
            Some(next) => Some(dstore.stage(&store, &patches(next))?),
            None => None,
        };
        // A third staged step would overwrite a slot still waiting to be rendered.
        if next.is_some() {
            assert!(dstore.stage(&store, &[0]).is_err());
        }
        let groups: Vec<&[ViewJob]> = jobs.iter().map(Vec::as_slice).collect();
        let want = cpu_views(&store, &cfg, &groups);
        let mut out: CudaSlice<f32> = gpu.zeros(want.len())?;
        dstore.render(&gpu, staged.take().unwrap(), &cfg, &groups, out.dev_mut())?;
        let got = gpu.download(out.dev())?;
        assert_eq!(ulp_diff(&got, &want), (0, 0), "step {k}");
        staged = next;
    }
    Ok(())
}

#[test]
fn rendering_is_deterministic() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (size, cfg) = configs().swap_remove(3);
    let store = write_store(&dir.path().join("d.patches"), size, 10, 4);
    let mut dstore = DeviceStore::new(&gpu, &store, Residency::Auto, 64, 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let jobs = step_jobs(&mut rng, &cfg, size, store.len(), 3, 16, 16);
    let groups: Vec<&[ViewJob]> = jobs.iter().map(Vec::as_slice).collect();
    let len = 64 * 3 * cfg.crop * cfg.crop;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut out: CudaSlice<f32> = gpu.zeros(len)?;
        dstore.render_now(&gpu, &store, &cfg, &groups, out.dev_mut())?;
        runs.push(gpu.download(out.dev())?);
    }
    assert_eq!(ulp_diff(&runs[0], &runs[1]), (0, 0));
    assert_eq!(ulp_diff(&runs[0], &runs[2]), (0, 0));
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> anyhow::Result<()> {
    let Some(gpu) = cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let size = PatchSize::square(16);
    let cfg = AugmentConfig {
        crop: 8,
        ..AugmentConfig::default()
    };
    let store = write_store(&dir.path().join("b.patches"), size, 4, 1);
    let other = write_store(&dir.path().join("o.patches"), size, 4, 2);
    let shape = aug_shape(&cfg, size)?;
    let pixels = gpu.upload(store.pixels())?;
    let mut out: CudaSlice<f32> = gpu.zeros(2 * 3 * 64)?;
    let center = ViewParams::center(&cfg, size)?;
    let view = slam_ags::feed::aug_view(&center, 0, 0, 2, 0)?;
    gpu.augment(pixels.dev(), &shape, &[view], out.dev_mut())?;
    let bad = [
        ("patch 4", AugView { patch: 4, ..view }),
        ("does not fit", AugView { top: 9, ..view }),
        (
            "past the",
            AugView {
                out_batch: 3,
                ..view
            },
        ),
    ];
    for (want, v) in bad {
        let err = gpu
            .augment(pixels.dev(), &shape, &[v], out.dev_mut())
            .unwrap_err();
        assert!(err.to_string().contains(want), "{want:?} not in {err}");
    }
    // Short pixel arrays and outputs.
    let short = pixels.dev().slice(0..size.bytes() - 1);
    assert!(gpu.augment(short, &shape, &[view], out.dev_mut()).is_err());
    let small = out.dev_mut().slice_mut(0..3 * 64);
    assert!(gpu.augment(pixels.dev(), &shape, &[view], small).is_err());

    for residency in [Residency::Resident, Residency::Streamed] {
        let mut dstore = DeviceStore::new(&gpu, &store, residency, 2, 0)?;
        assert!(dstore.stage(&store, &[4]).is_err(), "patch out of range");
        assert!(dstore.stage(&other, &[0]).is_err(), "another store");
        let staged = dstore.stage(&store, &[1])?;
        let job = ViewJob {
            patch: 2,
            params: center,
        };
        let err = dstore
            .render(&gpu, staged, &cfg, &[&[job]], out.dev_mut())
            .unwrap_err();
        assert!(err.to_string().contains("not staged"), "{err}");
        if residency == Residency::Streamed {
            assert!(dstore.stage(&store, &[0, 1, 2]).is_err(), "over capacity");
        }
    }
    // Residency that cannot be had is an error that says why.
    let err = match DeviceStore::new(&gpu, &store, Residency::Resident, 2, usize::MAX / 2) {
        Ok(_) => panic!("a store with an impossible reserve was made resident"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("does not fit on the GPU"), "{err}");
    gpu.synchronize()?;
    Ok(())
}
