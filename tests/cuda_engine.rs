//! The CUDA engine against the CPU engine on whole passes: training steps and evaluation
//! passes from the same parameters and inputs (through the twin harness, tests/common/twin.rs),
//! then the step's views rendered on the GPU and pretraining runs. The single ops are
//! tests/cuda_ops.rs. Without a GPU every test prints why it skips and passes
//! (SLAM_REQUIRE_GPU=1 makes that a failure).
//!
//! Tolerances: a whole step agrees to about 1e-5, except where a ReLU input lies closer to
//! zero than f32's rounding noise at that depth: then its sign, and every gradient upstream of
//! it, can differ between any two f32 implementations (PyTorch included) by 4e-4 to 1.4e-2
//! (pytorch/README.md, "ReLU flips"). So whole steps get 1e-4 on the losses, 1e-4 on the
//! running statistics (forward only), and 3e-2 on the gradients and updates: a wiring or
//! kernel error gives O(1).

mod common;

use common::net;

use anyhow::Result;
use common::twin::{Case, Output, Tolerance, Twin};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::input::batch::HostBatch;
use slam_ags::engine::Engine;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::MatmulMode;
use slam_ags::engine::prelude::Backend;
use slam_ags::model::{ModelState, NetConfig, Network, StepBatch, StepConfig, Surgery, Trainer};

/// One training step from `state` on `batch`: both losses, g1, g2, the combined gradient, the
/// update, the running statistics (and the batch-norm step counts, bit for bit).
struct StepCase {
    config: NetConfig,
    n: usize,
    crop: usize,
    surgery: Surgery,
}

impl Case for StepCase {
    fn name(&self) -> String {
        let n = self.n;
        format!(
            "{} crop {} {n}+{n} {}",
            self.config, self.crop, self.surgery
        )
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let state = ModelState::init(self.config, 11)?;
        let batch = HostBatch::random(self.n, self.n, self.crop, 12);
        let cfg = StepConfig {
            surgery: self.surgery,
            temperature: 0.1,
            ..StepConfig::default()
        };
        let mut trainer = Trainer::new(eng, &state)?;
        let mut combined = eng.zeros(trainer.net.param_len())?;
        let report = trainer.step(
            eng,
            &StepBatch::upload(eng, &batch)?,
            &cfg,
            0.05,
            Some(&mut combined),
        )?;
        let after = trainer.state(eng)?;
        let moved: Vec<f32> = after
            .params
            .iter()
            .zip(&state.params)
            .map(|(a, b)| a - b)
            .collect();
        let counts: Vec<f64> = after.batches_tracked.iter().map(|&c| c as f64).collect();
        let loss = Tolerance::Relative {
            floor: 1e-3,
            tol: 1e-4,
        };
        let grad = Tolerance::RelL2(2e-3);
        Ok(vec![
            Output::new("contrastive loss", &[report.loss_contrastive], loss),
            Output::new("cohesion loss", &[report.loss_cohesion], loss),
            Output::new("g1", &eng.download(eng.all(&trainer.g1))?, grad),
            Output::new("g2", &eng.download(eng.all(&trainer.g2))?, grad),
            Output::new("combined", &eng.download(eng.all(&combined))?, grad),
            Output::new("update", &moved, grad),
            Output::new("running statistics", &after.running, Tolerance::RelL2(1e-4)),
            Output::f64("batches tracked", counts, Tolerance::Bits),
        ])
    }
}

#[test]
fn step_matches_cpu_engine_on_a_small_network() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    let small = net(8, [1, 1, 1, 1], 16);
    twin.check(&StepCase {
        config: small,
        n: 4,
        crop: 32,
        surgery: Surgery::Ags,
    })?;
    let uneven = net(4, [2, 1, 1, 2], 8);
    twin.check(&StepCase {
        config: uneven,
        n: 3,
        crop: 20,
        surgery: Surgery::Pcgrad,
    })
}

#[test]
fn step_matches_cpu_engine_on_resnet18_at_a_reduced_crop() -> Result<()> {
    Twin::new(MatmulMode::Exact).check(&StepCase {
        config: NetConfig::named("resnet18")?,
        n: 8,
        crop: 64,
        surgery: Surgery::Ags,
    })
}

/// The embeddings of an evaluation pass (running statistics away from (0, 1), so that using
/// them shows).
struct EvalCase;

impl Case for EvalCase {
    fn name(&self) -> String {
        "eval forward".into()
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let config = net(8, [2, 2, 2, 2], 16);
        let mut state = ModelState::init(config, 3)?;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for v in state.running.iter_mut() {
            *v += 0.5 * rng.random_range(0.0f32..1.0);
        }
        let (n, crop) = (5, 40);
        let input = HostBatch::random(n, 1, crop, 5).pos_i;
        let net = Network::new(state.config);
        let (p, r, x) = (
            eng.upload(&state.params)?,
            eng.upload(&state.running)?,
            eng.upload(&input)?,
        );
        let acts = net.forward_eval(eng, &p, &r, &x, n, crop)?;
        let z = eng.download(eng.all(&acts.z))?;
        Ok(vec![Output::new("z", &z, Tolerance::RelL2(1e-4))])
    }
}

#[test]
fn eval_forward_matches_cpu_engine() -> Result<()> {
    Twin::new(MatmulMode::Exact).check(&EvalCase)
}

/// The GPU-rendered views of a training step are the CPU augmentation's, bit for bit, in
/// both residency modes and for both objectives' view sets.
#[test]
fn device_views_match_host_views() -> Result<()> {
    use slam_ags::data::input::augment::AugmentConfig;
    use slam_ags::data::input::batch::{Augmenter, Views};
    use slam_ags::data::input::sampler::{BalancedSampler, SamplerMode};
    use slam_ags::data::{BagLabel, PatchStore};
    use slam_ags::feed::{DeviceViews, Residency};
    use slam_ags::feed::{HostViews, StepInput, ViewSource};

    let Some(gpu) = common::cuda(MatmulMode::Exact) else {
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
                let input = StepInput {
                    augmenter: &augmenter,
                    store: &store,
                    sampled: &sampled,
                    step,
                    views,
                };
                let want = HostViews.render(&gpu, &input)?;
                let got = device.render(&gpu, &input)?;
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
        net: slam_ags::model::NetSpec {
            arch: "resnet10".into(),
            width: Some(4),
            blocks: None,
            out_dim: Some(8),
        },
        batch: 8,
        epochs: 2,
        warmup_epochs: 1,
        step: StepConfig {
            lr: 0.05,
            ..StepConfig::default()
        },
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
fn gpu_pretraining_follows_the_cpu_run_and_resumes_exactly() -> Result<()> {
    use slam_ags::feed::{DeviceViews, Residency};
    use slam_ags::pretrain::{Quiet, Run};

    let Some(gpu) = common::cuda(MatmulMode::Exact) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let store = common::random_store(dir.path());
    let gpu_train = |run: &mut Run| -> Result<ModelState> {
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
