//! The CPU engine against PyTorch: two consecutive training steps of four small networks
//! (tests/data, computed with PyTorch 2.15 in float32; see tests/data/README.md).
//!
//! Each step starts from PyTorch's own state before it (parameters, running statistics and,
//! for step 2, the momentum PyTorch's SGD holds after step 1: `buf = g_combined + wd p`).
//! Chaining our step 1 into our step 2 would not test more: these tiny networks, with three
//! images per batch norm and a nearly collapsed embedding at step 2, amplify float32
//! rounding so much that one ulp of input noise moves step 1's gradient by 3e-5 and step 2's
//! by 1e-2. Anchored, every step is held to the tolerances of tests/data/README.md.

mod common;

use common::metrics::rel_l2_error;
use serde::Deserialize;
use slam_ags::checkpoint::TensorFile;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{SgdBuffers, SgdUpdate, nchw_to_cnhw};
use slam_ags::model::{ModelState, Network, StepBatch, StepConfig, Surgery, Trainer};

#[derive(Deserialize)]
struct GoldenStep {
    surgery_fired: bool,
    cos_g1_g2: f64,
}

#[derive(Deserialize)]
struct GoldenConfig {
    width: usize,
    blocks: [usize; 4],
    out_dim: usize,
    crop: usize,
    batch_pos: usize,
    batch_neg: usize,
    surgery: Surgery,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    temperature: f32,
    steps: Vec<GoldenStep>,
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_l2_error(got, want);
    println!("  {what:<28} relative error {err:.2e} (tolerance {tol:.0e})");
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} exceeds {tol:.0e}"
    );
}

/// Within 1e-4 relative, or 1e-6 absolute: the cohesion loss of a collapsed embedding is
/// `(1 - mean cos) / T` with `mean cos` near 1, and float32's rounding of the cosines
/// bounds how well any two implementations can agree on it.
fn assert_loss(what: &str, got: f32, want: f32) {
    let err = (got as f64 - want as f64).abs();
    println!("  {what:<28} {got:.7} vs {want:.7} (error {err:.1e})");
    assert!(
        err <= 1e-4 * (want as f64).abs() || err <= 1e-6,
        "{what}: {got} vs PyTorch {want}"
    );
}

struct Case {
    file: TensorFile,
    cfg: GoldenConfig,
    net: Network,
}

impl Case {
    fn open(name: &str) -> Self {
        let path = format!(
            "{}/tests/data/{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let file = TensorFile::open(path.as_ref()).unwrap();
        let cfg: GoldenConfig = serde_json::from_str(&file.metadata("config").unwrap()).unwrap();
        let config = file.infer_config("before.").unwrap();
        assert_eq!(
            (config.width, config.blocks, config.out_dim),
            (cfg.width, cfg.blocks, cfg.out_dim)
        );
        Self {
            net: Network::new(config),
            file,
            cfg,
        }
    }

    fn state(&self, prefix: &str) -> ModelState {
        self.file.model_state(prefix).unwrap()
    }

    fn flat(&self, name: &str) -> Vec<f32> {
        self.file.f32_shaped(name, &[self.net.param_len()]).unwrap()
    }

    fn input(&self, name: &str, n: usize) -> Vec<f32> {
        let crop = self.cfg.crop;
        let data = self
            .file
            .f32_shaped(&format!("input.{name}"), &[n, 3, crop, crop])
            .unwrap();
        nchw_to_cnhw(&data, n, 3, crop * crop)
    }

    /// PyTorch's momentum buffer after `step` (1-based); zero before the first.
    fn momentum_after(&self, step: usize) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.net.param_len()];
        let mut params = self.state("before.").params;
        for s in 1..=step {
            let g = self.flat(&format!("step{s}.grad.combined"));
            for ((b, &g), &p) in buf.iter_mut().zip(&g).zip(&params) {
                *b = self.cfg.momentum * *b + (g + self.cfg.weight_decay * p);
            }
            params = self.state(&format!("step{s}.after.")).params;
        }
        buf
    }
}

fn run_case(name: &str) {
    let case = Case::open(name);
    let cfg = &case.cfg;
    let eng = CpuEngine;
    let batch = StepBatch::<CpuEngine> {
        pos_i: case.input("pos_i", cfg.batch_pos),
        pos_j: case.input("pos_j", cfg.batch_pos),
        neg_i: case.input("neg_i", cfg.batch_neg),
        neg_j: case.input("neg_j", cfg.batch_neg),
        n_pos: cfg.batch_pos,
        n_neg: cfg.batch_neg,
        crop: cfg.crop,
    };
    let step_cfg = StepConfig {
        surgery: cfg.surgery,
        lr: cfg.lr,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        temperature: cfg.temperature,
        // The reference weighs both tasks 1.
        ..StepConfig::default()
    };
    for (s, golden) in (1..=2).zip(&cfg.steps) {
        println!("{name} step {s}");
        let before_prefix = if s == 1 {
            "before.".to_owned()
        } else {
            format!("step{}.after.", s - 1)
        };
        let before = case.state(&before_prefix);
        let mut trainer = Trainer::new(&eng, &before).unwrap();
        trainer.momentum = case.momentum_after(s - 1);
        let mut combined = eng.zeros(case.net.param_len()).unwrap();
        let report = trainer
            .step(&eng, &batch, &step_cfg, cfg.lr as f64, Some(&mut combined))
            .unwrap();

        let loss = |n: &str| {
            case.file
                .f32_shaped(&format!("step{s}.loss.{n}"), &[1])
                .unwrap()[0]
        };
        assert_loss(
            "loss.contrastive",
            report.loss_contrastive,
            loss("contrastive"),
        );
        assert_loss("loss.cohesion", report.loss_cohesion, loss("cohesion"));
        let want_combined = case.flat(&format!("step{s}.grad.combined"));
        assert_close(
            "grad.contrastive",
            &trainer.g1,
            &case.flat(&format!("step{s}.grad.contrastive")),
            2e-3,
        );
        assert_close(
            "grad.cohesion",
            &trainer.g2,
            &case.flat(&format!("step{s}.grad.cohesion")),
            2e-3,
        );
        assert_close("grad.combined", &combined, &want_combined, 2e-3);
        let c = report.combination;
        println!(
            "  cosine {:+.6} (PyTorch {:+.6}), surgery fired: {}",
            c.cosine, golden.cos_g1_g2, c.fired
        );
        assert!(
            (c.cosine - golden.cos_g1_g2).abs() < 1e-4,
            "gradient cosine"
        );
        assert_eq!(c.fired, golden.surgery_fired, "whether surgery fired");

        let want = case.state(&format!("step{s}.after."));
        let got = trainer.state(&eng).unwrap();
        // Our update is our gradient's: every tensor's change within the gradients' 2e-3.
        for e in &case.net.params {
            let delta = |st: &ModelState| -> Vec<f32> {
                st.params[e.range()]
                    .iter()
                    .zip(&before.params[e.range()])
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let err = rel_l2_error(&delta(&got), &delta(&want));
            assert!(
                err <= 2e-3,
                "update of {}: relative error {err:.3e}",
                e.name
            );
        }
        assert_close("running statistics", &got.running, &want.running, 1e-4);
        assert_eq!(
            got.batches_tracked, want.batches_tracked,
            "num_batches_tracked"
        );
        // The optimizer itself, applied to PyTorch's combined gradient: 1e-5.
        let mut params = before.params.clone();
        let mut momentum = case.momentum_after(s - 1);
        let update = SgdUpdate {
            alpha: 1.0,
            beta: 0.0,
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
        };
        eng.sgd_step(
            &update,
            SgdBuffers {
                g1: &want_combined,
                g2: &want_combined,
                params: &mut params,
                momentum: &mut momentum,
            },
        )
        .unwrap();
        assert_close("parameters (SGD)", &params, &want.params, 1e-5);
    }
}

#[test]
fn golden_tiny_ags_conflict() {
    run_case("tiny_ags_conflict");
}

#[test]
fn golden_tiny_ags_aligned() {
    run_case("tiny_ags_aligned");
}

#[test]
fn golden_small_pcgrad() {
    run_case("small_pcgrad");
}

#[test]
fn golden_small_none() {
    run_case("small_none");
}
