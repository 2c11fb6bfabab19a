//! PAMIL against the reference module (tests/data/pamil_*.safetensors, float64: one
//! forward, every loss, every gradient, one Adam step), its backward against finite
//! differences, the curriculum's freezing, model selection, k-means, the head file, and the
//! command line end to end.

mod common;

use std::path::{Path, PathBuf};

use common::{arg, assert_fails_with, assert_files_exist, assert_succeeds, slam, toy_bags};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use slam_ags::checkpoint::{TensorFile, TensorWriter};
use slam_ags::data::{Bag, BagLabel};
use slam_ags::embed::{Embeddings, FeatureKind};
use slam_ags::mil::kmeans::kmeans;
use slam_ags::mil::{
    Adam, AdamState, BagObjective, EpochLog, HeadSpec, MilBag, MilHead, MilModel, MilTrainConfig,
    Pamil, PamilConfig, PamilLosses, PamilSettings, PamilStart, ProtoInit, Selection, report,
    train,
};

#[derive(Deserialize)]
struct GoldenConfig {
    dim: usize,
    n: usize,
    nproto: usize,
    label: u8,
    proto_pred: bool,
    inst_pred: bool,
    #[serde(default = "default_k_sample")]
    k_sample: usize,
    proto_weight: f64,
    lambda_clst: f64,
    lambda_proto_clst: f64,
    lambda_er: f64,
    lambda_inst: f64,
    adam_lr: f64,
    hidden: usize,
    attention: usize,
}

fn default_k_sample() -> usize {
    PamilSettings::default().losses.k_sample
}

/// A golden tensor as f64 (the reference stores a few in f32: its float32 quirks).
fn golden(file: &TensorFile, name: &str) -> Vec<f64> {
    file.tensor::<f64>(name).map_or_else(
        |_| {
            let (v, _) = file.tensor::<f32>(name).unwrap();
            v.into_iter().map(f64::from).collect()
        },
        |(v, _)| v,
    )
}

/// Largest |got - want| over the largest |want|.
fn relative(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let peak = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    diff / peak
}

fn assert_values(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs() / w.abs().max(1.0)));
    assert_eq!(got.len(), want.len(), "{what}");
    println!("  {what:<50} error {err:.1e}");
    assert!(err <= tol, "{what}: {got:?} vs the reference's {want:?}");
}

fn run_golden(name: &str) {
    let path = format!(
        "{}/tests/data/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let file = TensorFile::open(path.as_ref()).unwrap();
    let cfg: GoldenConfig = serde_json::from_str(&file.metadata("config").unwrap()).unwrap();
    let (model, params) = Pamil::read(&file, "before.", cfg.proto_weight).unwrap();
    assert_eq!(
        model.config,
        PamilConfig {
            input_dim: cfg.dim,
            hidden: cfg.hidden,
            attention: cfg.attention,
            prototypes: cfg.nproto,
            proto_pred: cfg.proto_pred,
            inst_pred: cfg.inst_pred,
            proto_weight: cfg.proto_weight,
        }
    );
    let losses = PamilLosses {
        k_sample: cfg.k_sample,
        lambda_clst: cfg.lambda_clst,
        lambda_proto_clst: cfg.lambda_proto_clst,
        lambda_er: cfg.lambda_er,
        lambda_inst: cfg.lambda_inst,
    };
    let x = golden(&file, "input.features");
    assert_eq!(x.len(), cfg.n * cfg.dim);
    assert_eq!(golden(&file, "input.label"), [cfg.label as f64]);
    let abnormal = cfg.label == 1;

    let forward = model.forward(&params, &x);
    assert_values(
        "out.logits",
        &forward.logits,
        &golden(&file, "out.logits"),
        1e-7,
    );
    assert_values(
        "out.y_prob",
        &forward.probabilities(),
        &golden(&file, "out.y_prob"),
        1e-7,
    );
    assert_values(
        "out.a_raw",
        &forward.a_raw,
        &golden(&file, "out.a_raw"),
        1e-7,
    );
    assert_values(
        "out.proto_a",
        &forward.proto_a,
        &golden(&file, "out.proto_a"),
        1e-7,
    );

    let mut grads = vec![0.0; model.param_len()];
    let values = model.backward(&params, &x, &forward, abnormal, &losses, &mut grads);
    let mut checked = vec![
        ("loss.ce", values.ce),
        ("loss.clst", values.clst),
        ("loss.proto_clst", values.proto_clst),
        ("loss.total", values.total),
    ];
    assert_eq!(values.er.is_some(), cfg.proto_pred);
    assert_eq!(values.inst.is_some(), cfg.inst_pred);
    checked.extend(values.er.map(|v| ("loss.er", v)));
    checked.extend(values.inst.map(|v| ("loss.inst", v)));
    for (key, got) in checked {
        assert_values(key, &[got], &golden(&file, key), 1e-7);
    }

    // Each gradient within 1e-6 of its largest entry; a gradient that is zero in exact
    // arithmetic (attention_c's bias: the softmax over instances ignores a shift) within
    // 1e-12 absolute.
    for t in &model.layout.tensors {
        let want = golden(&file, &format!("grad.{}", t.name));
        let got = &grads[t.range.clone()];
        let peak = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        if peak < 1e-12 {
            let worst = got.iter().fold(0f64, |m, g| m.max(g.abs()));
            println!("  grad.{:<45} zero; largest here {worst:.1e}", t.name);
            assert!(worst <= 1e-12, "grad.{}: {got:?}", t.name);
        } else {
            let err = relative(got, &want);
            println!("  grad.{:<45} relative error {err:.1e}", t.name);
            assert!(err <= 1e-6, "grad.{}: relative error {err:.2e}", t.name);
        }
    }

    // One Adam step as PyTorch's: lr from the case, no weight decay.
    let adam = Adam {
        lr: cfg.adam_lr,
        weight_decay: 0.0,
        ..Adam::default()
    };
    let mut after = params.clone();
    adam.step(&mut after, &grads, &mut AdamState::new(params.len()));
    for t in &model.layout.tensors {
        let want = golden(&file, &format!("after.{}", t.name));
        let got = &after[t.range.clone()];
        let err = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
        println!(
            "  after.{:<44} error {err:.1e} (lr {})",
            t.name, cfg.adam_lr
        );
        assert!(err <= 1e-6, "after.{}: error {err:.2e}", t.name);
    }
}

#[test]
fn golden_default_head_on_an_abnormal_bag() {
    run_golden("pamil_default_abnormal");
}

#[test]
fn golden_full_head_on_an_abnormal_bag() {
    run_golden("pamil_full_abnormal");
}

#[test]
fn golden_full_head_on_a_normal_bag() {
    run_golden("pamil_full_normal");
}

#[test]
fn golden_full_head_on_a_bag_smaller_than_k() {
    run_golden("pamil_full_small_bag");
}

/// A head of 5 features, 6 hidden and 4 attention units and 3 prototypes, its parameters
/// drawn as the reference draws them and then moved at random (so that no structure of the
/// initialization hides a wrong term), and losses weighted heavily enough to matter.
fn small_head(proto_pred: bool, inst_pred: bool, seed: u64) -> (Pamil, Vec<f64>, PamilLosses) {
    let model = Pamil::new(PamilConfig {
        input_dim: 5,
        hidden: 6,
        attention: 4,
        prototypes: 3,
        proto_pred,
        inst_pred,
        proto_weight: 0.4,
    });
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 50);
    let params = model
        .init(seed)
        .into_iter()
        .map(|p| p + rng.random_range(-0.5..0.5))
        .collect();
    let losses = PamilLosses {
        k_sample: 3,
        lambda_clst: 0.3,
        lambda_proto_clst: 0.4,
        lambda_er: 0.5,
        lambda_inst: 0.7,
    };
    (model, params, losses)
}

fn softmax2(z: [f64; 2]) -> [f64; 2] {
    let m = z[0].max(z[1]);
    let e = z.map(|v| (v - m).exp());
    e.map(|v| v / (e[0] + e[1]))
}

fn random_bag(n: usize, dim: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * dim).map(|_| rng.random_range(-1.5..1.5)).collect()
}

#[test]
fn backward_matches_finite_differences_for_every_parameter() {
    // (proto_pred, inst_pred, instances, label): both options on for an abnormal and a
    // normal bag, a bag smaller than k (top and bottom sets overlap), the plain head.
    let cases = [
        (true, true, 7, true),
        (true, true, 7, false),
        (true, true, 2, true),
        (false, false, 6, false),
    ];
    for (seed, &(proto_pred, inst_pred, n, label)) in cases.iter().enumerate() {
        let (model, params, losses) = small_head(proto_pred, inst_pred, seed as u64);
        let x = random_bag(n, 5, 100 + seed as u64);
        // The reference holds the KL loss's target softmax(proto_logits) constant (detached),
        // so the gradient is that of the loss with the target fixed at its value here.
        let forward = model.forward(&params, &x);
        let w = model.config.proto_weight;
        let target =
            softmax2([0, 1].map(|c| (forward.logits[c] - (1.0 - w) * forward.bag_logits[c]) / w));
        let total = |p: &[f64]| {
            let forward = model.forward(p, &x);
            let mut scratch = vec![0.0; p.len()];
            let v = model.backward(p, &x, &forward, label, &losses, &mut scratch);
            let Some(er) = v.er else { return v.total };
            let bag = softmax2(forward.bag_logits);
            let er_fixed: f64 = (0..2)
                .map(|c| target[c] * (target[c].ln() - (bag[c] + 1e-8).ln()))
                .sum();
            v.total + losses.lambda_er * (er_fixed - er)
        };
        let mut grads = vec![0.0; params.len()];
        let values = model.backward(&params, &x, &forward, label, &losses, &mut grads);
        assert_eq!(
            (values.er.is_some(), values.inst.is_some()),
            (proto_pred, inst_pred)
        );
        let h = 1e-5;
        for t in &model.layout.tensors {
            let mut worst: f64 = 0.0;
            for i in t.range.clone() {
                let mut p = params.clone();
                p[i] += h;
                let up = total(&p);
                p[i] -= 2.0 * h;
                let numeric = (up - total(&p)) / (2.0 * h);
                let err = (numeric - grads[i]).abs() / (1e-4 + numeric.abs().max(grads[i].abs()));
                worst = worst.max(err);
            }
            println!(
                "case {seed}: {:<50} worst relative error {worst:.1e}",
                t.name
            );
            assert!(worst < 1e-5, "case {seed}, {}: {worst:.2e}", t.name);
        }
    }
}

#[test]
fn the_curriculum_freezes_what_the_reference_freezes_and_thaws_with_a_fresh_adam() {
    let (model, start, losses) = small_head(true, true, 3);
    // The reference freezes every parameter whose name contains "proto" or "fc".
    for t in &model.layout.tensors {
        let frozen = t.range.end <= model.layout.frozen;
        assert_eq!(
            frozen,
            t.name.contains("proto") || t.name.contains("fc"),
            "{}",
            t.name
        );
    }
    let bags = vec![MilBag {
        name: "b".into(),
        label: true,
        features: random_bag(6, 5, 9),
        truth: None,
    }];
    let spec = HeadSpec::Pamil {
        config: model.config,
        losses,
        start: PamilStart::Head(Box::new(model.clone()), start.clone()),
    };
    let config = |epochs| MilTrainConfig {
        epochs,
        freeze_epochs: 1,
        select: Selection::Last,
        ..slam_ags::mil::Aggregator::Pamil.train_defaults()
    };
    let frozen = 0..model.layout.frozen;
    let one = spec
        .train(&bags, 5, &config(1), |_| {})
        .unwrap()
        .last
        .params;
    assert_eq!(
        one[frozen.clone()],
        start[frozen.clone()],
        "frozen for epoch 1"
    );
    assert_ne!(one[frozen.end..], start[frozen.end..]);
    // Epoch 2 thaws them: their first Adam step, from zero moments with step count 1, is
    // -lr g / (|g| + eps) with g their gradient after epoch 1.
    let two = spec
        .train(&bags, 5, &config(2), |_| {})
        .unwrap()
        .last
        .params;
    let forward = model.forward(&one, &bags[0].features);
    let mut g = vec![0.0; one.len()];
    model.backward(&one, &bags[0].features, &forward, true, &losses, &mut g);
    let adam = config(2).adam;
    for i in frozen {
        let want = one[i] - adam.lr * g[i] / (g[i].abs() + adam.eps);
        assert!((two[i] - want).abs() <= 1e-15, "{i}: {} vs {want}", two[i]);
    }
}

/// One parameter that rises by lr each step (a constant gradient under Adam); every bag is
/// predicted right while it is below 0.45 and wrong after.
struct Scripted;

impl BagObjective for Scripted {
    fn param_len(&self) -> usize {
        1
    }

    fn bag_step(&self, params: &[f64], bag: &MilBag, grads: &mut [f64]) -> (f64, bool) {
        grads[0] = -1.0;
        (0.0, (params[0] < 0.45) == bag.label)
    }

    fn freezable(&self) -> usize {
        0
    }
}

#[test]
fn selection_keeps_the_last_epoch_of_best_training_accuracy() {
    let bags: Vec<MilBag> = [true, false]
        .map(|label| MilBag {
            name: String::new(),
            label,
            features: vec![0.0],
            truth: None,
        })
        .into();
    let config = |select| MilTrainConfig {
        epochs: 4,
        adam: Adam {
            lr: 0.1,
            weight_decay: 0.0,
            ..Adam::default()
        },
        seed: 0,
        select,
        freeze_epochs: 0,
    };
    // Two steps per epoch from 0: epochs 1 and 2 see 0..0.3 (accuracy 1), epoch 3 sees 0.4
    // and 0.5 (1/2), epoch 4 none right.
    let mut accuracies = Vec::new();
    let best = train(
        &Scripted,
        vec![0.0],
        &bags,
        &config(Selection::Best),
        |l: &EpochLog| accuracies.push(l.accuracy),
    );
    assert_eq!(accuracies, [1.0, 1.0, 0.5, 0.0]);
    assert_eq!((best.selected_epoch, best.selected_accuracy), (1, 1.0));
    assert!((best.selected[0] - 0.4).abs() < 1e-6, "{:?}", best.selected);
    assert!((best.last[0] - 0.8).abs() < 1e-6, "{:?}", best.last);
    let last = train(
        &Scripted,
        vec![0.0],
        &bags,
        &config(Selection::Last),
        |_| {},
    );
    assert_eq!((last.selected_epoch, last.selected_accuracy), (3, 0.0));
    assert_eq!(last.selected, last.last);
}

#[test]
fn kmeans_finds_separated_clusters() {
    let centres = [[5.0, 0.0], [-5.0, 1.0], [0.0, -6.0]];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let points: Vec<f64> = (0..90)
        .flat_map(|i| {
            let c = centres[i % 3];
            [
                c[0] + rng.random_range(-1.0..1.0),
                c[1] + rng.random_range(-1.0..1.0),
            ]
        })
        .collect();
    let found = kmeans(&points, 2, 3, 4);
    for c in centres {
        let nearest = found
            .chunks(2)
            .map(|f| ((f[0] - c[0]).powi(2) + (f[1] - c[1]).powi(2)).sqrt())
            .fold(f64::INFINITY, f64::min);
        assert!(nearest < 0.5, "{c:?} not found in {found:?}");
    }
    assert_eq!(kmeans(&points, 2, 3, 4), found, "deterministic per seed");
    // More clusters than distinct points still gives k centres.
    assert_eq!(kmeans(&[1.0, 1.0], 2, 3, 0), [1.0; 6]);
}

#[test]
fn a_pamil_head_is_the_reference_state_dict_and_reads_back() {
    let (model, params, _) = small_head(true, true, 1);
    let head = MilHead {
        model: MilModel::Pamil(Box::new(model.clone())),
        params: params.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.safetensors");
    report::save_model(&path, &head).unwrap();
    let mut names = TensorFile::open(&path).unwrap().names();
    names.sort();
    let mut want = vec![
        "proto",
        "fc.0.weight",
        "fc.0.bias",
        "attention_net.attention_a.0.weight",
        "attention_net.attention_a.0.bias",
        "attention_net.attention_b.0.weight",
        "attention_net.attention_b.0.bias",
        "attention_net.attention_c.weight",
        "attention_net.attention_c.bias",
        "classifiers.0.bias",
        "classifiers.0.parametrizations.weight.original0",
        "classifiers.0.parametrizations.weight.original1",
        "classifiers.1.bias",
        "classifiers.1.parametrizations.weight.original0",
        "classifiers.1.parametrizations.weight.original1",
        "proto_pred_classifier.0.weight",
        "proto_pred_classifier.0.bias",
        "instance_classifiers.0.weight",
        "instance_classifiers.0.bias",
        "instance_classifiers.1.weight",
        "instance_classifiers.1.bias",
    ];
    want.sort();
    assert_eq!(
        names, want,
        "exactly the reference module's state_dict keys"
    );
    let back = report::load_model(&path).unwrap();
    let MilModel::Pamil(read) = &back.model else {
        panic!("read back as another kind of head")
    };
    assert_eq!(read.config, model.config);
    assert_eq!(back.params, params);
    let bag = MilBag {
        name: "b".into(),
        label: true,
        features: random_bag(4, 5, 2),
        truth: None,
    };
    assert_eq!(back.predict(&bag).attention, head.predict(&bag).attention);

    // As PyTorch would save the state_dict: f32, no metadata (the prototype weight is then
    // the reference's default).
    let mut w = TensorWriter::new();
    for t in &model.layout.tensors {
        let values: Vec<f32> = params[t.range.clone()].iter().map(|&v| v as f32).collect();
        w.f32(t.name.clone(), &t.shape, &values);
    }
    let torch = dir.path().join("torch.safetensors");
    w.write(&torch).unwrap();
    let back = report::load_model(&torch).unwrap();
    let MilModel::Pamil(read) = &back.model else {
        panic!("read back as another kind of head")
    };
    assert_eq!(read.config.proto_weight, 0.5);
    assert!(
        back.params
            .iter()
            .zip(&params)
            .all(|(a, b)| (a - b).abs() < 1e-6)
    );

    // A tensor missing, or one too many, is refused.
    let mut w = TensorWriter::new();
    for t in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.name != "fc.0.bias")
    {
        w.tensor(t.name.clone(), &t.shape, &params[t.range.clone()]);
    }
    w.write(&torch).unwrap();
    let err = format!("{:#}", report::load_model(&torch).unwrap_err());
    assert!(err.contains("fc.0.bias"), "{err}");
    let mut w = TensorWriter::new();
    for t in &model.layout.tensors {
        w.tensor(t.name.clone(), &t.shape, &params[t.range.clone()]);
    }
    w.tensor("extra", &[1], &[0.0f64]);
    w.write(&torch).unwrap();
    let err = format!("{:#}", report::load_model(&torch).unwrap_err());
    assert!(err.contains("22 tensors where a PAMIL head"), "{err}");
}

#[test]
fn learns_a_toy_task_and_finds_the_witnesses() {
    let settings = PamilSettings {
        prototypes: 4,
        proto_pred: true,
        inst_pred: true,
        ..PamilSettings::default()
    };
    let spec = HeadSpec::Pamil {
        config: settings.config(6, 64, 32),
        losses: settings.losses,
        start: PamilStart::Fresh(ProtoInit::Kmeans),
    };
    let config = MilTrainConfig {
        seed: 1,
        ..slam_ags::mil::Aggregator::Pamil.train_defaults()
    };
    common::assert_learns_toy_task(&spec, &config, 0.5);
}

/// `bags` as an embeddings file's content (features of `dim`, f32).
fn embeddings_of(bags: &[MilBag], dim: usize) -> Embeddings {
    let mut e = Embeddings {
        kind: FeatureKind::Projector,
        dim,
        features: Vec::new(),
        bags: Vec::new(),
        instances: Vec::new(),
        sources: Vec::new(),
    };
    for bag in bags {
        let start = e.instances.len();
        e.features.extend(bag.features.iter().map(|&v| v as f32));
        let truth = bag.truth.as_ref().unwrap();
        e.instances.extend(truth.iter().map(|&t| Some(t)));
        e.sources
            .extend((0..truth.len()).map(|i| format!("{}/{i}.png", bag.name)));
        e.bags.push(Bag {
            name: bag.name.clone(),
            label: if bag.label {
                BagLabel::Abnormal
            } else {
                BagLabel::Normal
            },
            patches: start..e.instances.len(),
        });
    }
    e
}

/// The toy bags of `common::toy_bags` written as an embeddings file.
fn toy_embeddings(dir: &Path, name: &str, count: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    embeddings_of(&toy_bags(count, seed), 6)
        .save(&path)
        .unwrap();
    path
}

/// A small PAMIL head: 32 hidden and 16 attention units, 4 prototypes.
const SMALL_PAMIL: [&str; 8] = [
    "--aggregator",
    "pamil",
    "--hidden",
    "32",
    "--attention",
    "16",
    "--prototypes",
    "4",
];

#[test]
fn pamil_from_the_command_line_trains_saves_and_evaluates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let train = toy_embeddings(dir.path(), "train.safetensors", 24, 2);
    let test = toy_embeddings(dir.path(), "test.safetensors", 10, 3);
    let out = dir.path().join("pamil");
    let first = [
        "mil",
        "train",
        arg(&train),
        "--test",
        arg(&test),
        "--out",
        arg(&out),
        "--proto-pred",
        "--inst-pred",
        "--proto-init",
        "kmeans",
        "--top-k",
        "2",
    ];
    let text = assert_succeeds(&slam(&[&first[..], &SMALL_PAMIL].concat()));
    assert!(text.contains("trained PAMIL on 24 bags"), "{text}");
    assert!(text.contains("10 bags: F1"), "{text}");
    let reports = [
        "predictions.csv",
        "attention.csv",
        "metrics.json",
        "retrieval.png",
    ];
    assert_files_exist(&out, &reports);
    let head_path = out.join("mil.safetensors");
    let names = TensorFile::open(&head_path).unwrap().names();
    assert_eq!(names.len(), 21, "{names:?}");
    // The last epoch's head (of the reference's 100) is written when an earlier one was kept.
    let kept_last = text.contains("(epoch 100,");
    assert_eq!(
        out.join("mil-last.safetensors").exists(),
        !kept_last,
        "{text}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(
        metrics["metrics"]["auc"].as_f64().unwrap() > 0.9,
        "{metrics}"
    );
    assert!(
        metrics["retrieval_mean_fraction"].as_f64().unwrap() > 0.9,
        "{metrics}"
    );

    let again = dir.path().join("eval");
    let text = assert_succeeds(&slam(&[
        "mil",
        "eval",
        arg(&head_path),
        arg(&test),
        "--out",
        arg(&again),
        "--top-k",
        "2",
    ]));
    assert!(text.contains("PAMIL head"), "{text}");
    for file in ["predictions.csv", "attention.csv", "metrics.json"] {
        assert_eq!(
            std::fs::read(again.join(file)).unwrap(),
            std::fs::read(out.join(file)).unwrap(),
            "{file} of `mil eval` differs from the evaluation after training"
        );
    }

    // The curriculum: start from that head, prototypes and fc frozen for 2 of 3 epochs.
    let next = dir.path().join("next");
    let curriculum = [
        "mil",
        "train",
        arg(&train),
        "--out",
        arg(&next),
        "--init-head",
        arg(&head_path),
        "--freeze-epochs",
        "2",
        "--epochs",
        "3",
    ];
    let text = assert_succeeds(&slam(&[&curriculum[..], &SMALL_PAMIL].concat()));
    assert!(text.contains("trained PAMIL"), "{text}");
    let proto = |path: &Path| {
        TensorFile::open(path)
            .unwrap()
            .tensor::<f64>("proto")
            .unwrap()
    };
    let grown = proto(&next.join("mil.safetensors"));
    assert_eq!(grown.1, [4, 6]);
    assert_ne!(grown.0, proto(&head_path).0, "thawed for the last epoch");
}

#[test]
fn pamil_refuses_bad_input_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let train = toy_embeddings(dir.path(), "train.safetensors", 4, 2);
    let out = dir.path().join("out");
    let train_with = |extra: &[&str]| {
        let base = ["mil", "train", arg(&train), "--out", arg(&out)];
        slam(&[&base[..], extra].concat())
    };
    let pamil = ["--aggregator", "pamil"];
    assert_fails_with(
        &train_with(&[&pamil[..], &["--prototypes", "0"]].concat()),
        &["--prototypes must be at least 1"],
    );
    assert_fails_with(
        &train_with(&["--prototypes", "5"]),
        &["apply to --aggregator pamil only"],
    );

    // An embeddings file with an empty bag.
    let mut empty = embeddings_of(&toy_bags(2, 1), 6);
    let end = empty.bags[1].patches.end;
    empty.bags.push(Bag {
        name: "empty".into(),
        label: BagLabel::Normal,
        patches: end..end,
    });
    let empty_path = dir.path().join("empty.safetensors");
    empty.save(&empty_path).unwrap();
    assert_fails_with(
        &slam(
            &[
                &["mil", "train", arg(&empty_path), "--out", arg(&out)][..],
                &pamil,
            ]
            .concat(),
        ),
        &["empty.safetensors", "each bag non-empty"],
    );

    // Heads: a PAMIL head over 6 features (3 prototypes), an ABMIL head.
    let bags = toy_bags(4, 2);
    let settings = PamilSettings {
        prototypes: 3,
        ..PamilSettings::default()
    };
    let specs = [
        HeadSpec::Pamil {
            config: settings.config(6, 8, 4),
            losses: settings.losses,
            start: PamilStart::Fresh(ProtoInit::Normal),
        },
        HeadSpec::Abmil {
            hidden: 8,
            attention: 4,
        },
    ];
    let [pamil_head, abmil_head] = specs.map(|spec| {
        let config = MilTrainConfig {
            epochs: 1,
            ..slam_ags::mil::Aggregator::Pamil.train_defaults()
        };
        let trained = spec.train(&bags, 6, &config, |_| {}).unwrap();
        let path = dir
            .path()
            .join(format!("{:?}.safetensors", trained.selected.aggregator()));
        report::save_model(&path, &trained.selected).unwrap();
        path
    });

    // Embeddings of another feature size than the head.
    let narrow: Vec<MilBag> = bags
        .iter()
        .map(|b| MilBag {
            features: b.features.chunks(6).flat_map(|r| r[..4].to_vec()).collect(),
            ..b.clone()
        })
        .collect();
    let narrow_path = dir.path().join("narrow.safetensors");
    embeddings_of(&narrow, 4).save(&narrow_path).unwrap();
    let eval = |model: &Path, bags: &Path| {
        slam(&["mil", "eval", arg(model), arg(bags), "--out", arg(&out)])
    };
    assert_fails_with(
        &eval(&pamil_head, &narrow_path),
        &["has 4-dimensional features; the MIL head takes 6"],
    );
    // Files that are not heads, and heads of another kind or shape.
    assert_fails_with(&eval(&train, &train), &["is not a MIL model"]);
    assert_fails_with(
        &train_with(&[&pamil[..], &["--init-head", arg(&abmil_head)]].concat()),
        &["is an ABMIL head; --init-head takes a PAMIL head"],
    );
    assert_fails_with(
        &train_with(&[&pamil[..], &["--init-head", arg(&pamil_head)]].concat()),
        &["the starting head has", "3 prototypes", "10"],
    );
    assert_fails_with(
        &train_with(&[&pamil[..], &["--init-head", arg(&train)]].concat()),
        &["is not a MIL model"],
    );
    assert!(!out.exists(), "a refused command left {}", out.display());
}
