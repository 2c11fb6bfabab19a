//! Embedding a store with a model, the embeddings file, and the embed and mil commands.

mod common;

use common::{
    arg, assert_fails_with, assert_files_exist, assert_succeeds, embed_on_cpu, net, random_store,
    slam,
};
use slam_ags::checkpoint;
use slam_ags::data::PatchStore;
use slam_ags::embed::{EmbedSettings, Embeddings, FeatureKind, embed};
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
