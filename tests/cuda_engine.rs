//! The CUDA engine against the CPU engine: the convolution and linear ops on their own, then
//! whole training steps and evaluation passes from the same parameters and inputs. Without a
//! GPU every test prints why it skips and passes (SLAM_REQUIRE_GPU=1 makes that a failure).
//!
//! Tolerances: with exact f32 products the two engines differ only in summation order, so
//! single ops agree to about 1e-6 (relative L2 error). A whole step agrees to about 1e-5,
//! except where a ReLU input lies closer to zero than f32's rounding noise at that depth:
//! then its sign, and every gradient upstream of it, can differ between any two f32
//! implementations (PyTorch included) by 4e-4 to 1.4e-2 (bench/torch/README.md, "ReLU
//! flips"). So whole steps get 1e-4 on the losses, 1e-4 on the running statistics (forward
//! only), and 3e-2 on the gradients and updates: a wiring or kernel error gives O(1). TF32
//! rounds the products' inputs to 10 mantissa bits (about 5e-4 relative per product), so it
//! is checked to 1e-2 on single ops.

mod common;

use common::{conv, cuda_engine, rel_err, uniform};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::{CudaEngine, MatmulMode};
use slam_ags::engine::{Conv2d, Engine, Linear};
use slam_ags::model::optim::Sgd;
use slam_ags::model::{HostBatch, ModelState, NetConfig, Network, StepConfig, Surgery, Trainer};

/// Largest absolute difference relative to the largest magnitude of `want`.
fn max_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0f64, |m, &w| m.max(w.abs() as f64))
        .max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()))
        / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let (l2, max) = (rel_err(got, want), max_err(got, want));
    println!("{what}: relative L2 error {l2:.2e}, max error {max:.2e}");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite values"
    );
    assert!(
        l2 < tol && max < 10.0 * tol,
        "{what}: error {l2:e} / {max:e} above {tol:e}"
    );
}

/// Forward and backward of `s` on both engines; `dw` and `dx` start from random values, so
/// that accumulation (`+=`) is checked too.
fn conv_case(gpu: &CudaEngine, s: &Conv2d, seed: u64, tol: f64) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (x, w) = (
        uniform(&mut rng, s.in_len()),
        uniform(&mut rng, s.weight_len()),
    );
    let dy = uniform(&mut rng, s.out_len());
    let (dw0, dx0) = (
        uniform(&mut rng, s.weight_len()),
        uniform(&mut rng, s.in_len()),
    );
    let cpu = CpuEngine;

    let mut y = vec![0.0; s.out_len()];
    cpu.conv2d_forward(s, &x, &w, &mut y)?;
    let (mut dw, mut dx) = (dw0.clone(), dx0.clone());
    cpu.conv2d_backward(s, &x, &w, &dy, &mut dw, Some(&mut dx))?;

    let (gx, gw, gdy) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&dy)?);
    let mut gy = gpu.upload(&vec![f32::NAN; s.out_len()])?;
    gpu.conv2d_forward(s, gpu.all(&gx), gpu.all(&gw), gpu.all_mut(&mut gy))?;
    let (mut gdw, mut gdx) = (gpu.upload(&dw0)?, gpu.upload(&dx0)?);
    let dx_view = gpu.all_mut(&mut gdx);
    gpu.conv2d_backward(
        s,
        gpu.all(&gx),
        gpu.all(&gw),
        gpu.all(&gdy),
        gpu.all_mut(&mut gdw),
        Some(dx_view),
    )?;
    let name = format!("conv {s:?}");
    check(&format!("{name} y"), &gpu.download(gpu.all(&gy))?, &y, tol);
    check(
        &format!("{name} dw"),
        &gpu.download(gpu.all(&gdw))?,
        &dw,
        tol,
    );
    check(
        &format!("{name} dx"),
        &gpu.download(gpu.all(&gdx))?,
        &dx,
        tol,
    );

    // Without dx, only dw moves.
    let mut gdw = gpu.upload(&dw0)?;
    gpu.conv2d_backward(
        s,
        gpu.all(&gx),
        gpu.all(&gw),
        gpu.all(&gdy),
        gpu.all_mut(&mut gdw),
        None,
    )?;
    check(
        &format!("{name} dw (no dx)"),
        &gpu.download(gpu.all(&gdw))?,
        &dw,
        tol,
    );
    Ok(())
}

/// Shapes of ResNet-18's convolutions at small sizes, odd sides, and one large enough to be
/// cut into several chunks of images (64 channels, 3x3 at 56x56, 40 images).
fn conv_shapes() -> Vec<Conv2d> {
    vec![
        conv(2, 3, 8, (13, 11), 7, 2, 3),
        conv(3, 8, 8, (9, 9), 3, 1, 1),
        conv(3, 8, 16, (9, 7), 3, 2, 1),
        conv(3, 8, 16, (9, 9), 1, 2, 0),
        conv(4, 16, 8, (5, 5), 1, 1, 0),
        conv(1, 1, 1, (1, 1), 1, 1, 0),
        conv(2, 4, 4, (2, 2), 3, 1, 1),
        conv(40, 64, 64, (56, 56), 3, 1, 1),
    ]
}

#[test]
fn conv2d_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    for (i, s) in conv_shapes().iter().enumerate() {
        conv_case(&gpu, s, 100 + i as u64, 1e-5)?;
    }
    Ok(())
}

#[test]
fn conv2d_tf32_and_bf16_stay_close() -> anyhow::Result<()> {
    for (mode, tol) in [(MatmulMode::Tf32, 1e-2), (MatmulMode::Bf16, 5e-2)] {
        let Some(gpu) = cuda_engine(mode) else {
            return Ok(());
        };
        conv_case(&gpu, &conv(8, 32, 64, (28, 28), 3, 1, 1), 7, tol)?;
    }
    Ok(())
}

fn linear_case(gpu: &CudaEngine, s: &Linear, relu: bool, seed: u64) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = uniform(&mut rng, s.in_features * s.batch);
    let wb = uniform(&mut rng, s.param_len());
    let dy = uniform(&mut rng, s.out_features * s.batch);
    let (dwb0, dx0) = (uniform(&mut rng, s.param_len()), uniform(&mut rng, x.len()));
    let cpu = CpuEngine;
    let mut y = vec![0.0; dy.len()];
    cpu.linear_forward(s, &x, &wb, relu, &mut y)?;
    let (mut cdy, mut dwb, mut dx) = (dy.clone(), dwb0.clone(), dx0.clone());
    cpu.linear_backward(
        s,
        &x,
        &wb,
        relu.then_some(&y[..]),
        &mut cdy,
        &mut dwb,
        Some(&mut dx),
    )?;

    let (gx, gwb) = (gpu.upload(&x)?, gpu.upload(&wb)?);
    let mut gy = gpu.upload(&vec![f32::NAN; y.len()])?;
    gpu.linear_forward(s, gpu.all(&gx), gpu.all(&gwb), relu, gpu.all_mut(&mut gy))?;
    let got_y = gpu.download(gpu.all(&gy))?;
    let (mut gdy, mut gdwb, mut gdx) = (gpu.upload(&dy)?, gpu.upload(&dwb0)?, gpu.upload(&dx0)?);
    let relu_out = relu.then(|| gpu.all(&gy));
    let dx_view = gpu.all_mut(&mut gdx);
    gpu.linear_backward(
        s,
        gpu.all(&gx),
        gpu.all(&gwb),
        relu_out,
        gpu.all_mut(&mut gdy),
        gpu.all_mut(&mut gdwb),
        Some(dx_view),
    )?;
    let name = format!("linear {s:?} relu={relu}");
    check(&format!("{name} y"), &got_y, &y, 1e-5);
    check(
        &format!("{name} masked dy"),
        &gpu.download(gpu.all(&gdy))?,
        &cdy,
        1e-7,
    );
    check(
        &format!("{name} dwb"),
        &gpu.download(gpu.all(&gdwb))?,
        &dwb,
        1e-5,
    );
    check(
        &format!("{name} dx"),
        &gpu.download(gpu.all(&gdx))?,
        &dx,
        1e-5,
    );
    Ok(())
}

#[test]
fn linear_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    let shapes = [
        (6, 10, 7),
        (1, 1, 1),
        (33, 5, 70),
        (256, 512, 512),
        (128, 512, 128),
    ];
    for (i, &(batch, in_features, out_features)) in shapes.iter().enumerate() {
        let s = Linear {
            batch,
            in_features,
            out_features,
        };
        for relu in [false, true] {
            linear_case(&gpu, &s, relu, 200 + i as u64)?;
        }
    }
    Ok(())
}

/// One step's results on an engine, downloaded.
struct StepResult {
    losses: [f32; 2],
    g1: Vec<f32>,
    g2: Vec<f32>,
    combined: Vec<f32>,
    after: ModelState,
}

fn step_on<E: Engine>(
    eng: &E,
    state: &ModelState,
    batch: &HostBatch,
    cfg: &StepConfig,
) -> anyhow::Result<StepResult> {
    let mut trainer = Trainer::new(eng, state)?;
    let mut combined = eng.zeros(trainer.net.param_len())?;
    let report = trainer.step(eng, &batch.upload(eng)?, cfg, 0.05, Some(&mut combined))?;
    Ok(StepResult {
        losses: [report.loss_contrastive, report.loss_cohesion],
        g1: eng.download(eng.all(&trainer.g1))?,
        g2: eng.download(eng.all(&trainer.g2))?,
        combined: eng.download(eng.all(&combined))?,
        after: trainer.state(eng)?,
    })
}

fn delta(after: &[f32], before: &[f32]) -> Vec<f32> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// One training step on both engines from the same state and inputs.
fn step_parity(config: NetConfig, n: usize, crop: usize, surgery: Surgery) -> anyhow::Result<()> {
    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    let state = ModelState::init(config, 11)?;
    let batch = HostBatch::random(n, n, crop, 12);
    let cfg = StepConfig {
        surgery,
        sgd: Sgd::default(),
        temperature: 0.1,
    };
    let want = step_on(&CpuEngine, &state, &batch, &cfg)?;
    let got = step_on(&gpu, &state, &batch, &cfg)?;
    let name = format!("{config} crop {crop} {n}+{n} {surgery}");
    for (i, task) in ["contrastive", "cohesion"].iter().enumerate() {
        let err = (got.losses[i] as f64 - want.losses[i] as f64).abs()
            / (want.losses[i].abs() as f64).max(1e-3);
        println!(
            "{name}: {task} loss {} (cpu {}), relative error {err:.2e}",
            got.losses[i], want.losses[i]
        );
        assert!(err < 1e-4, "{name}: {task} loss differs by {err:e}");
    }
    check(&format!("{name} g1"), &got.g1, &want.g1, 2e-3);
    check(&format!("{name} g2"), &got.g2, &want.g2, 2e-3);
    check(
        &format!("{name} combined"),
        &got.combined,
        &want.combined,
        2e-3,
    );
    let moved = |r: &StepResult| delta(&r.after.params, &state.params);
    check(&format!("{name} update"), &moved(&got), &moved(&want), 2e-3);
    check(
        &format!("{name} running statistics"),
        &got.after.running,
        &want.after.running,
        1e-4,
    );
    assert_eq!(got.after.batches_tracked, want.after.batches_tracked);

    // The same step again on the GPU: bit for bit.
    let again = step_on(&gpu, &state, &batch, &cfg)?;
    assert_eq!(again.g1, got.g1, "{name}: two GPU runs differ (g1)");
    assert_eq!(
        again.after.params, got.after.params,
        "{name}: two GPU runs differ (params)"
    );
    Ok(())
}

#[test]
fn step_matches_cpu_engine_on_a_small_network() -> anyhow::Result<()> {
    let config = NetConfig {
        width: 8,
        blocks: [1, 1, 1, 1],
        out_dim: 16,
    };
    step_parity(config, 4, 32, Surgery::Ags)?;
    step_parity(
        NetConfig {
            width: 4,
            blocks: [2, 1, 1, 2],
            out_dim: 8,
        },
        3,
        20,
        Surgery::Pcgrad,
    )
}

#[test]
fn step_matches_cpu_engine_on_resnet18_at_a_reduced_crop() -> anyhow::Result<()> {
    step_parity(NetConfig::named("resnet18")?, 8, 64, Surgery::Ags)
}

/// The embeddings of an evaluation pass (running statistics) over `input`.
fn eval_z<E: Engine>(
    eng: &E,
    state: &ModelState,
    input: &[f32],
    n: usize,
    crop: usize,
) -> anyhow::Result<Vec<f32>> {
    let net = Network::new(state.config);
    let (p, r, x) = (
        eng.upload(&state.params)?,
        eng.upload(&state.running)?,
        eng.upload(input)?,
    );
    let acts = net.forward_eval(eng, &p, &r, &x, n, crop)?;
    eng.download(eng.all(&acts.z))
}

#[test]
fn eval_forward_matches_cpu_engine() -> anyhow::Result<()> {
    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    let config = NetConfig {
        width: 8,
        blocks: [2, 2, 2, 2],
        out_dim: 16,
    };
    let mut state = ModelState::init(config, 3)?;
    // Running statistics away from (0, 1), so that using them shows.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for v in state.running.iter_mut() {
        *v += 0.5 * rng.random_range(0.0f32..1.0);
    }
    let (n, crop) = (5, 40);
    let input = HostBatch::random(n, 1, crop, 5).pos_i;
    let want = eval_z(&CpuEngine, &state, &input, n, crop)?;
    let got = eval_z(&gpu, &state, &input, n, crop)?;
    check("eval forward z", &got, &want, 1e-4);
    Ok(())
}

/// The GPU-rendered views of a training step are the CPU augmentation's, bit for bit, in
/// both residency modes and for both objectives' view sets.
#[test]
fn device_views_match_host_views() -> anyhow::Result<()> {
    use slam_ags::data::input::augment::AugmentConfig;
    use slam_ags::data::input::batch::{Augmenter, Views};
    use slam_ags::data::input::sampler::{BalancedSampler, SamplerMode};
    use slam_ags::data::{BagLabel, PatchStore};
    use slam_ags::gpu_data::{DeviceViews, Residency};
    use slam_ags::pretrain::{HostViews, ViewSource};

    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let store = PatchStore::open(&common::random_store(dir.path()))?;
    let (pos, neg) = (store.pool(BagLabel::Abnormal), store.pool(BagLabel::Normal));
    let mut sampler = BalancedSampler::new(pos, neg, 8, SamplerMode::Disjoint, 3)?;
    let config = AugmentConfig {
        crop: 12,
        ..AugmentConfig::default()
    };
    let augmenter = Augmenter::new(config, 9);
    for residency in [Residency::Resident, Residency::Streamed] {
        let mut device = DeviceViews::new(&gpu, &store, residency, 8, 0)?;
        for step in 0..3 {
            let sampled = sampler.next_batch();
            for views in [Views::Slam, Views::ContrastiveOnly] {
                let want = HostViews.render(&gpu, &augmenter, &store, &sampled, step, views)?;
                let got = device.render(&gpu, &augmenter, &store, &sampled, step, views)?;
                assert_eq!((got.n_pos, got.n_neg), (want.n_pos, want.n_neg));
                for (name, g, w) in [
                    ("pos_i", &got.pos_i, &want.pos_i),
                    ("pos_j", &got.pos_j, &want.pos_j),
                    ("neg_i", &got.neg_i, &want.neg_i),
                    ("neg_j", &got.neg_j, &want.neg_j),
                ] {
                    let (g, w) = (gpu.download(gpu.all(g))?, gpu.download(gpu.all(w))?);
                    assert!(
                        g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits())
                            && g.len() == w.len(),
                        "{residency:?} step {step} {views:?} {name}: device views differ"
                    );
                }
            }
        }
        println!(
            "{residency:?}: device views equal the host's ({})",
            device.summary()
        );
    }
    Ok(())
}

fn tiny_run(
    store: std::path::PathBuf,
    max_steps: Option<u64>,
) -> slam_ags::pretrain::PretrainConfig {
    slam_ags::pretrain::PretrainConfig {
        store,
        arch: "resnet10".into(),
        width: Some(4),
        out_dim: Some(8),
        batch: 8,
        epochs: 2,
        warmup_epochs: 1,
        lr: 0.05,
        crop: 12,
        checkpoint_every: 2,
        seed: 11,
        max_steps,
        ..Default::default()
    }
}

fn losses(run: &std::path::Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss_contrastive"].as_f64().unwrap(),
                v["loss_cohesion"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Pretraining on the GPU, views rendered there: the losses follow the CPU run's step by
/// step (the same views, the same start), and a run stopped and resumed on the GPU ends
/// bit-identical to an uninterrupted GPU run.
#[test]
fn gpu_pretraining_follows_the_cpu_run_and_resumes_exactly() -> anyhow::Result<()> {
    use slam_ags::gpu_data::{DeviceViews, Residency};
    use slam_ags::pretrain::{Quiet, Run};

    let Some(gpu) = cuda_engine(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let store = common::random_store(dir.path());
    let gpu_train = |run: &mut Run| -> anyhow::Result<ModelState> {
        let mut views = DeviceViews::new(&gpu, run.store(), Residency::Auto, 8, 0)?;
        run.train_with(&gpu, &mut Quiet, &mut views)
    };

    let cpu_dir = dir.path().join("cpu");
    Run::create(&CpuEngine, &cpu_dir, tiny_run(store.clone(), None))?
        .train(&CpuEngine, &mut Quiet)?;
    let gpu_dir = dir.path().join("gpu");
    let straight = gpu_train(&mut Run::create(
        &gpu,
        &gpu_dir,
        tiny_run(store.clone(), None),
    )?)?;
    let (want, got) = (losses(&cpu_dir), losses(&gpu_dir));
    assert_eq!(got.len(), want.len());
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        println!("step {step}: losses {g:?} on the GPU, {w:?} on the CPU");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1e-2);
        assert!(
            close(g.0, w.0) && close(g.1, w.1),
            "step {step}: {g:?} vs {w:?}"
        );
    }

    let split_dir = dir.path().join("split");
    gpu_train(&mut Run::create(
        &gpu,
        &split_dir,
        tiny_run(store, Some(2)),
    )?)?;
    let resumed = gpu_train(&mut Run::resume(&gpu, &split_dir, Some(want.len() as u64))?)?;
    assert_eq!(
        resumed, straight,
        "a resumed GPU run differs from an uninterrupted one"
    );
    assert_eq!(
        losses(&split_dir),
        got,
        "a resumed GPU run logged other losses"
    );
    Ok(())
}
