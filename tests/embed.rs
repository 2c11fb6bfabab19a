//! Embedding a store with a model, the embeddings file, and the embed and mil commands.

mod common;

use common::{
    arg, assert_fails_with, assert_files_exist, assert_succeeds, embed_on_cpu, net, random_store,
    slam,
};
use slam_ags::checkpoint;
use slam_ags::data::PatchStore;
use slam_ags::embed::{
    EmbedSettings, Embeddings, FeatureKind, embed, embed_kinds, recalibrate_batch_norm,
};
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::mil::MilBag;
use slam_ags::model::ModelState;

fn tiny_model() -> ModelState {
    let config = net(4, [1, 1, 1, 1], 8);
    ModelState::init(config, 3).unwrap()
}

#[test]
fn embeddings_do_not_depend_on_the_batching_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = PatchStore::open(&random_store(dir.path())).unwrap();
    let state = tiny_model();
    let mut calls = Vec::new();
    let whole = embed(
        &CpuEngine,
        &state,
        &store,
        EmbedSettings {
            kind: FeatureKind::Projector,
            crop: 12,
            batch: 48,
        },
        |d, t| calls.push((d, t)),
    )
    .unwrap();
    assert_eq!(calls, [(48, 48)]);
    assert_eq!((whole.len(), whole.dim), (48, 8));
    let pieces = embed_on_cpu(&state, &store, FeatureKind::Projector, 5);
    for (a, b) in whole.features.iter().zip(&pieces.features) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
    let encoder = embed_on_cpu(&state, &store, FeatureKind::Encoder, 16);
    assert_eq!(encoder.dim, 32);
    assert_eq!(whole.bags, store.bags());
    assert_eq!(whole.instances[0], Some(true));
    assert_eq!(whole.sources[13], "normal_0/1.png");

    let path = dir.path().join("e.safetensors");
    whole.save(&path).unwrap();
    let back = Embeddings::load(&path).unwrap();
    assert_eq!(back, whole);
    let bags = MilBag::from_embeddings(&back);
    assert_eq!(bags.len(), 4);
    assert!(bags[0].label && !bags[1].label);
    assert_eq!(bags[2].features.len(), 12 * 8);
    assert_eq!(
        bags[2]
            .truth
            .as_ref()
            .unwrap()
            .iter()
            .filter(|&&t| t)
            .count(),
        1
    );
}

/// `embed_kinds` gives h and z from one pass, each equal to its own `embed`.
#[test]
fn both_kinds_from_one_pass_match_each_kind_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = PatchStore::open(&random_store(dir.path())).unwrap();
    let state = tiny_model();
    let settings = EmbedSettings {
        kind: FeatureKind::Projector,
        crop: 12,
        batch: 7,
    };
    let kinds = [FeatureKind::Encoder, FeatureKind::Projector];
    let both = embed_kinds(&CpuEngine, &state, &store, &kinds, settings, |_, _| {}).unwrap();
    for (kind, got) in kinds.into_iter().zip(&both) {
        let alone = embed(
            &CpuEngine,
            &state,
            &store,
            EmbedSettings { kind, ..settings },
            |_, _| {},
        );
        assert_eq!(got, &alone.unwrap(), "{kind:?}");
    }
}

/// Recomputed batch-norm statistics: over two passes they are the mean of the passes'
/// statistics (the stem's running mean then equals one pass over every patch), and with them
/// a random network's eval-mode features are its training-mode features on the same batch
/// (up to the unbiased variance), which the initial statistics are far from.
#[test]
fn batch_norm_recalibration_gives_the_data_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let store = PatchStore::open(&random_store(dir.path())).unwrap();
    let state = tiny_model();
    let net = slam_ags::model::Network::new(state.config);
    let settings = |batch| EmbedSettings {
        kind: FeatureKind::Encoder,
        crop: 12,
        batch,
    };
    let one = recalibrate_batch_norm(&CpuEngine, &state, &store, settings(48)).unwrap();
    let two = recalibrate_batch_norm(&CpuEngine, &state, &store, settings(24)).unwrap();
    assert_eq!(two.params, state.params, "no weight changes");
    assert!(
        two.batches_tracked
            .iter()
            .all(|&c| c == state.batches_tracked[0] + 2)
    );
    let stem = net.bns().next().unwrap();
    let mean = stem.running.start..stem.running.start + stem.channels;
    for (a, b) in one.running[mean.clone()]
        .iter()
        .zip(&two.running[mean.clone()])
    {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-2), "{a} vs {b}");
    }
    assert!(
        one.running[mean].iter().any(|&m| m.abs() > 1e-3),
        "the mean moved"
    );

    let eval = |s: &ModelState| embed_on_cpu(s, &store, FeatureKind::Encoder, 48).features;
    // Training-mode features of the whole store as one batch.
    let mut running = state.running.clone();
    let crops = embed_on_cpu(&state, &store, FeatureKind::Encoder, 48);
    let input = {
        use slam_ags::data::input::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
        let augment = AugmentConfig {
            crop: 12,
            ..AugmentConfig::default()
        };
        let center = ViewParams::center(&augment, store.patch_size()).unwrap();
        let jobs: Vec<ViewJob> = (0..48)
            .map(|patch| ViewJob {
                patch,
                params: center,
            })
            .collect();
        let mut images = vec![0.0; 48 * 3 * 12 * 12];
        render_batch(
            store.pixels(),
            store.patch_size(),
            &jobs,
            &augment,
            &mut images,
        )
        .unwrap();
        slam_ags::engine::nchw_to_cnhw(&images, 48, 3, 12 * 12)
    };
    let acts = net
        .forward_train(&CpuEngine, &state.params, &mut running, &input, 48, 12)
        .unwrap();
    let dim = crops.dim;
    let train: Vec<f32> = (0..48)
        .flat_map(|i| (0..dim).map(move |d| (i, d)))
        .map(|(i, d)| acts.features[d * 48 + i])
        .collect();
    let err = |f: &[f32]| {
        let num: f64 = f
            .iter()
            .zip(&train)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = train.iter().map(|b| (*b as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let (calibrated, initial) = (err(&eval(&one)), err(&eval(&state)));
    // The deepest batch norms see 48 values per channel here: the unbiased variance then
    // scales each by sqrt(48/47), a few percent in all.
    println!("eval against train features: recalibrated {calibrated:.4}, initial {initial:.4}");
    assert!(
        calibrated < 0.08,
        "recalibrated eval features off by {calibrated:.3}"
    );
    assert!(
        initial > 5.0 * calibrated,
        "initial {initial:.3} vs {calibrated:.3}"
    );
}

#[test]
fn embeddings_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    checkpoint::save(&model, &tiny_model()).unwrap();
    let err = format!("{:#}", Embeddings::load(&model).unwrap_err());
    assert!(err.contains("is not an embeddings file"), "{err}");
}

#[test]
fn embed_then_mil_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let model = dir.path().join("m.safetensors");
    checkpoint::save(&model, &tiny_model()).unwrap();
    let emb = dir.path().join("e.safetensors");
    let embed_into = |out| {
        [
            "embed",
            arg(&model),
            arg(&store),
            "--out",
            out,
            "--crop",
            "12",
        ]
    };
    let command = embed_into(arg(&emb));
    let text = assert_succeeds(&slam(&command));
    assert!(text.contains("embedded 48 patches in 4 bags"), "{text}");
    assert_fails_with(&slam(&command), &["exists; pass --force"]);
    assert_fails_with(
        &slam(&[
            "embed",
            arg(&store),
            arg(&store),
            "--out",
            arg(&dir.path().join("x")),
        ]),
        &["not a valid safetensors file"],
    );
    assert_fails_with(
        &slam(&[
            "embed",
            arg(&model),
            arg(&model),
            "--out",
            arg(&dir.path().join("x")),
        ]),
        &["not a usable patch store"],
    );
    assert!(!dir.path().join("x").exists());

    let mil = dir.path().join("mil");
    let out = slam(&[
        "mil",
        "train",
        arg(&emb),
        "--test",
        arg(&emb),
        "--out",
        arg(&mil),
        "--epochs",
        "3",
        "--top-k",
        "2",
    ]);
    let text = assert_succeeds(&out);
    assert!(text.contains("4 bags: F1"), "{text}");
    assert!(text.contains("in the top 2 per abnormal bag"), "{text}");
    let files = [
        "mil.safetensors",
        "predictions.csv",
        "attention.csv",
        "metrics.json",
    ];
    assert_files_exist(&mil, &files);
    let predictions = std::fs::read_to_string(mil.join("predictions.csv")).unwrap();
    assert_eq!(predictions.lines().count(), 5, "{predictions}");
    assert!(predictions.starts_with("bag,label,probability,predicted\nabnormal_0,abnormal,"));
    let attention = std::fs::read_to_string(mil.join("attention.csv")).unwrap();
    assert_eq!(attention.lines().count(), 49);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mil.join("metrics.json")).unwrap()).unwrap();
    let accuracy = metrics["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    assert_eq!(metrics["retrieval"].as_array().unwrap().len(), 2);

    let again = dir.path().join("eval");
    let model_file = mil.join("mil.safetensors");
    let eval = [
        "mil",
        "eval",
        arg(&model_file),
        arg(&emb),
        "--out",
        arg(&again),
    ];
    let text = assert_succeeds(&slam(&eval));
    assert!(text.contains("4 bags: F1"), "{text}");
    assert_eq!(
        std::fs::read_to_string(again.join("predictions.csv")).unwrap(),
        predictions,
        "eval of the saved head differs from the evaluation after training"
    );
    assert_fails_with(&slam(&eval), &["is not empty; pass --force"]);
    assert_fails_with(
        &slam(&[
            "mil",
            "eval",
            arg(&emb),
            arg(&emb),
            "--out",
            arg(&dir.path().join("y")),
        ]),
        &["is not a MIL model"],
    );
    // Encoder features (32-dimensional) into a head trained on projector features (8).
    let enc = dir.path().join("enc.safetensors");
    let args = embed_into(arg(&enc));
    assert_succeeds(&slam(&[&args[..], &["--features", "encoder"]].concat()));
    let (y, z) = (dir.path().join("y"), dir.path().join("z"));
    assert_fails_with(
        &slam(&["mil", "eval", arg(&model_file), arg(&enc), "--out", arg(&z)]),
        &["has 32-dimensional features; the MIL head takes 8"],
    );
    assert_fails_with(
        &slam(&[
            "mil",
            "train",
            arg(&emb),
            "--test",
            arg(&enc),
            "--out",
            arg(&z),
        ]),
        &["the test bags have 32-dimensional features, the training bags 8"],
    );
    assert!(
        !y.exists() && !z.exists(),
        "a refused command left its output folder"
    );
}

/// `slam eval` on embeddings from `slam embed`: the report and its JSON, and clear refusals
/// of embeddings that cannot be compared or carry no truth.
#[test]
fn eval_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let model = dir.path().join("m.safetensors");
    checkpoint::save(&model, &tiny_model()).unwrap();
    let embed_as = |name: &str, features: &str| {
        let out = dir.path().join(name);
        let command = [
            "embed",
            arg(&model),
            arg(&store),
            "--out",
            arg(&out),
            "--crop",
            "12",
            "--features",
            features,
        ];
        assert_succeeds(&slam(&command));
        out
    };
    let h = embed_as("h.safetensors", "encoder");
    let z = embed_as("z.safetensors", "projector");
    let json = dir.path().join("eval.json");
    let text = assert_succeeds(&slam(&[
        "eval",
        "--train",
        arg(&h),
        "--test",
        arg(&h),
        "--neighbours",
        "3",
        "--out",
        arg(&json),
    ]));
    // random_store: 4 bags of 12, one abnormal cell in each abnormal bag.
    assert!(text.contains("48 test cells (2 abnormal)"), "{text}");
    assert!(
        text.contains("probe AUROC") && text.contains("kNN"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["retrieval"]["k"], 2);
    let auroc = report["knn_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc));

    assert_fails_with(
        &slam(&["eval", "--train", arg(&h), "--test", arg(&z)]),
        &["same model and --features"],
    );
    assert_fails_with(
        &slam(&["eval", "--train", arg(&h), "--test", arg(&store)]),
        &["not a valid safetensors file"],
    );
    assert_fails_with(
        &slam(&[
            "eval",
            "--train",
            arg(&h),
            "--test",
            arg(&h),
            "--out",
            arg(&json),
        ]),
        &["exists; pass --force"],
    );
}
