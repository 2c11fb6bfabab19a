//! Pretraining runs on the CPU engine: metrics and checkpoints, exact resume, the SimCLR
//! ablation and the divergence guard.

use std::path::{Path, PathBuf};

mod common;

use common::random_store;
use slam_ags::checkpoint;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::model::{NetSpec, StepConfig};
use slam_ags::pretrain::{Objective, PretrainConfig, Quiet, Run};

fn tiny_config(store: PathBuf) -> PretrainConfig {
    PretrainConfig {
        store,
        net: NetSpec {
            arch: "resnet10".into(),
            width: Some(4),
            blocks: None,
            out_dim: Some(8),
        },
        batch: 8,
        epochs: 3,
        warmup_epochs: 1,
        step: StepConfig {
            lr: 0.05,
            ..StepConfig::default()
        },
        crop: 12,
        checkpoint_every: 3,
        seed: 11,
        ..PretrainConfig::default()
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_run_writes_metrics_checkpoints_and_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(random_store(dir.path()));
    let out = dir.path().join("run");
    let mut run = Run::create(&CpuEngine, &out, config).unwrap();
    assert_eq!(run.steps_per_epoch(), 6); // 24 + 24 patches, 4 + 4 per batch
    assert_eq!(run.end_step(), 18);
    let state = run.train(&CpuEngine, &mut Quiet).unwrap();

    let metrics = lines(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 18);
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["step"], i as u64);
        assert_eq!(m["epoch"], i as u64 / 6);
        for key in [
            "loss_contrastive",
            "loss_cohesion",
            "lr",
            "images_per_s",
            "embedding_std",
        ] {
            let v = m[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing: {m}"));
            assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
        }
        let cosine = m["combination"]["cosine"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&cosine));
    }
    // Warm-up epoch 0 at lr/1, then cosine decay from the full rate.
    assert_eq!(metrics[0]["lr"].as_f64().unwrap() as f32, 0.05);
    assert!(metrics[17]["lr"].as_f64().unwrap() < 0.05);
    let epochs = lines(&out.join("epochs.jsonl"));
    assert_eq!(epochs.len(), 3);
    assert_eq!(epochs[2]["steps"], 6);

    let mut kept: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-00000015", "step-00000018"]);
    let model = checkpoint::load(&out.join("model.safetensors")).unwrap();
    assert_eq!(model, state);
    let last = checkpoint::load(&out.join("checkpoints/step-00000018/model.safetensors")).unwrap();
    assert_eq!(last, state);
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(toml.contains("checkpoint_every = 3"), "{toml}");
}

#[test]
fn resuming_gives_bit_identical_parameters() {
    resume_case(Objective::Slam);
}

/// The weak baseline's classifier travels in the checkpoints: a resumed run is the
/// uninterrupted one.
#[test]
fn resuming_the_weak_baseline_gives_bit_identical_parameters() {
    resume_case(Objective::Weak);
}

fn resume_case(objective: Objective) {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let straight = dir.path().join("straight");
    let config = PretrainConfig {
        max_steps: Some(8),
        objective,
        ..tiny_config(store)
    };
    let want = Run::create(&CpuEngine, &straight, config.clone())
        .unwrap()
        .train(&CpuEngine, &mut Quiet)
        .unwrap();

    // Stop after 4 steps (checkpoint at 3 and at the stop), drop the last checkpoint as a
    // crash would, resume from step 3 and go on to 8.
    let split = dir.path().join("split");
    let first = PretrainConfig {
        max_steps: Some(4),
        ..config
    };
    Run::create(&CpuEngine, &split, first)
        .unwrap()
        .train(&CpuEngine, &mut Quiet)
        .unwrap();
    std::fs::remove_dir_all(split.join("checkpoints/step-00000004")).unwrap();
    let mut resumed = Run::resume(&CpuEngine, &split, Some(8)).unwrap();
    assert_eq!(resumed.step(), 3);
    let got = resumed.train(&CpuEngine, &mut Quiet).unwrap();
    assert_eq!(got, want, "resumed parameters differ");

    let strip = |path: &Path| -> Vec<serde_json::Value> {
        let mut lines = lines(path);
        for l in &mut lines {
            l.as_object_mut().unwrap().remove("images_per_s");
        }
        lines
    };
    assert_eq!(
        strip(&split.join("metrics.jsonl")),
        strip(&straight.join("metrics.jsonl")),
        "the resumed run's metrics are not the uninterrupted run's"
    );
}

#[test]
fn simclr_trains_the_contrastive_task_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = PretrainConfig {
        objective: Objective::Simclr,
        max_steps: Some(2),
        ..tiny_config(random_store(dir.path()))
    };
    let out = dir.path().join("run");
    Run::create(&CpuEngine, &out, config)
        .unwrap()
        .train(&CpuEngine, &mut Quiet)
        .unwrap();
    for m in lines(&out.join("metrics.jsonl")) {
        assert_eq!(m["loss_cohesion"], 0.0);
        assert_eq!(m["combination"]["norm_g2"], 0.0);
        assert_eq!(m["combination"]["fired"], false);
        assert!(m["loss_contrastive"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn the_weak_baseline_trains_the_encoder_on_slide_labels() {
    let dir = tempfile::tempdir().unwrap();
    let config = PretrainConfig {
        objective: Objective::Weak,
        max_steps: Some(3),
        ..tiny_config(random_store(dir.path()))
    };
    let out = dir.path().join("run");
    let start = config.initial_state().unwrap().0;
    let end = Run::create(&CpuEngine, &out, config)
        .unwrap()
        .train(&CpuEngine, &mut Quiet)
        .unwrap();
    for m in lines(&out.join("metrics.jsonl")) {
        assert_eq!(
            (m["loss_contrastive"].as_f64(), m["loss_cohesion"].as_f64()),
            (Some(0.0), Some(0.0))
        );
        assert_eq!(m["combination"]["norm_g2"], 0.0);
        assert!(m["loss"].as_f64().unwrap() > 0.0, "{m}");
    }
    let net = slam_ags::model::Network::new(end.config);
    let moved = |name: &str| {
        let r = net.param(name).unwrap().range();
        end.params[r.clone()] != start.params[r]
    };
    assert!(moved("encoder.0.weight"), "the encoder was not trained");
    let checkpoint = out.join("checkpoints/step-00000003/state.safetensors");
    let file = checkpoint::TensorFile::open(&checkpoint).unwrap();
    assert!(file.names().contains(&"weak_head.weights".to_owned()));
}

/// `init` starts a run from given weights, recorded in its config (and so on resume).
#[test]
fn a_run_starts_from_init_weights() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_config(random_store(dir.path()));
    let mut weights = slam_ags::model::ModelState::init(base.net().unwrap(), 77).unwrap();
    weights.params.iter_mut().for_each(|p| *p *= 0.5);
    let file = dir.path().join("init.safetensors");
    checkpoint::save(&file, &weights).unwrap();
    let config = PretrainConfig {
        init: Some(file.clone()),
        max_steps: Some(1),
        ..base
    };
    let out = dir.path().join("run");
    let run = Run::create(&CpuEngine, &out, config.clone()).unwrap();
    // Every parameter and running-statistics tensor of the network came from the file.
    let net = slam_ags::model::Network::new(weights.config);
    let loaded = run.init_report.as_ref().unwrap().loaded;
    assert_eq!(loaded, net.params.len() + net.running.len());
    assert_eq!(config.initial_state().unwrap().0, weights);
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(toml.contains("init = "), "{toml}");
}

/// Counts what the collapse guard reports.
#[derive(Default)]
struct Collapses(Vec<u64>);

impl slam_ags::pretrain::Observer for Collapses {
    fn collapsing(&mut self, step: u64, message: &str) {
        assert!(message.contains("--cohesion-weight"), "{message}");
        self.0.push(step);
    }
}

/// A cohesion task weighted far above the contrastive one pulls every embedding to one point:
/// the guard says so, at most once per epoch, and names the remedy; the same run at a small
/// cohesion weight stays spread out far longer.
#[test]
fn the_collapse_guard_names_the_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let run = |name: &str, cohesion_weight: f32| {
        let mut config = PretrainConfig {
            epochs: 4,
            ..tiny_config(store.clone())
        };
        config.step.cohesion_weight = cohesion_weight;
        let mut seen = Collapses::default();
        Run::create(&CpuEngine, &dir.path().join(name), config)
            .unwrap()
            .train(&CpuEngine, &mut seen)
            .unwrap();
        seen.0
    };
    let collapsed = run("heavy", 100.0);
    assert!(!collapsed.is_empty(), "no collapse reported");
    let epochs: Vec<u64> = collapsed.iter().map(|s| s / 6).collect();
    let mut distinct = epochs.clone();
    distinct.dedup();
    assert_eq!(
        epochs, distinct,
        "more than one report in an epoch: {collapsed:?}"
    );
    // This tiny network on noise collapses in the end whatever the weights; the heavy
    // cohesion task gets it there in the first epoch, the light one not in the first three.
    let light = run("light", 0.01);
    println!("collapse reported at steps {collapsed:?} (heavy), {light:?} (light)");
    assert!(collapsed[0] < 6, "heavy: {collapsed:?}");
    assert!(light.iter().all(|&s| s >= 18), "light: {light:?}");
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PretrainConfig {
        warmup_epochs: 0,
        checkpoint_every: 1,
        ..tiny_config(random_store(dir.path()))
    };
    config.step.lr = 1e30;
    let out = dir.path().join("run");
    let err = Run::create(&CpuEngine, &out, config)
        .unwrap()
        .train(&CpuEngine, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("training diverged at step"), "{err}");
    assert!(err.contains("the last good checkpoint is"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn runs_refuse_bad_folders_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let err = |r: anyhow::Result<Run>| format!("{:#}", r.err().expect("accepted"));
    // A non-empty folder that is not a run.
    assert!(
        err(Run::create(
            &CpuEngine,
            dir.path(),
            tiny_config(store.clone())
        ))
        .contains("is not empty")
    );
    assert!(
        err(Run::resume(&CpuEngine, dir.path(), None)).contains("not a pretraining run folder")
    );
    let huge = PretrainConfig {
        batch: 1000,
        ..tiny_config(store.clone())
    };
    let e = err(Run::create(&CpuEngine, &dir.path().join("a"), huge));
    assert!(e.contains("more than the pools hold"), "{e}");
    let big_crop = PretrainConfig {
        crop: 17,
        ..tiny_config(store)
    };
    let e = err(Run::create(&CpuEngine, &dir.path().join("b"), big_crop));
    assert!(e.contains("crop"), "{e}");
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
}

#[test]
fn runs_are_bit_identical_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let train = |threads: usize| {
        let out = dir.path().join(format!("run{threads}"));
        // Wide enough that the convolutions' products are split between threads.
        let mut config = PretrainConfig {
            batch: 16,
            max_steps: Some(3),
            ..tiny_config(store.clone())
        };
        (config.net.width, config.net.out_dim) = (Some(16), Some(32));
        common::in_pool(threads, || {
            Run::create(&CpuEngine, &out, config)
                .unwrap()
                .train(&CpuEngine, &mut Quiet)
                .unwrap()
        })
    };
    let one = train(1);
    assert!(train(2) == one, "2 threads differ from 1");
    assert!(train(3) == one, "3 threads differ from 1");
}
