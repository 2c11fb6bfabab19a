//! Files a MIL run writes: the trained head (safetensors, f64), per-bag predictions and
//! per-patch attention (CSV), and the metrics (JSON).

use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::{
    AbMil, BagPrediction, Evaluation, MilBag, MilConfig, MilHead, MilModel, Pamil, PamilSettings,
    Standardizer,
};
use crate::atomic::write_atomic;
use crate::checkpoint::{TensorFile, TensorWriter};
use crate::embed::Embeddings;
use crate::plots;

pub const MODEL_FILE: &str = "mil.safetensors";
/// The last epoch's head, written beside [`MODEL_FILE`] when training kept an earlier epoch.
pub const LAST_MODEL_FILE: &str = "mil-last.safetensors";
pub const PREDICTIONS_FILE: &str = "predictions.csv";
pub const ATTENTION_FILE: &str = "attention.csv";
pub const METRICS_FILE: &str = "metrics.json";
pub const RETRIEVAL_PLOT: &str = "retrieval.png";

/// Writes the head. ABMIL: its parameters under the names of
/// [`super::abmil::MilLayout::tensors`], its input standardization as `input.mean` and
/// `input.std`, its sizes as the `mil` info. PAMIL: exactly the reference module's
/// `state_dict` (so PyTorch's `load_state_dict(strict=True)` takes it), its configuration as
/// the `pamil` info.
pub fn save_model(path: &Path, head: &MilHead) -> Result<()> {
    let mut w = TensorWriter::new();
    for t in head.tensors() {
        w.tensor(t.name, &t.shape, &head.params[t.range]);
    }
    match &head.model {
        MilModel::Abmil {
            model,
            standardizer,
        } => {
            let dim = model.config.input_dim;
            w.tensor("input.mean", &[dim], &standardizer.mean);
            w.tensor("input.std", &[dim], &standardizer.std);
            w.info("mil", model.config)?;
        }
        MilModel::Pamil(model) => w.info("pamil", model.config)?,
    }
    w.write(path)
}

/// Reads a head written by [`save_model`], of either kind (told apart by the file: ABMIL's
/// `mil` info, PAMIL's `proto` tensor), or a PAMIL `state_dict` saved from PyTorch as
/// safetensors (f32 or f64; its prototype weight then the reference's default).
pub fn load_model(path: &Path) -> Result<MilHead> {
    let file = TensorFile::open(path)?;
    if file.info("mil").is_some() {
        return load_abmil(path, &file);
    }
    ensure!(
        file.names().iter().any(|n| n == "proto"),
        "{} is not a MIL model: neither an ABMIL nor a PAMIL head (write one with `slam mil \
         train`)",
        path.display()
    );
    let proto_weight = file
        .info("pamil")
        .and_then(|v| v.get("proto_weight")?.as_f64())
        .unwrap_or(PamilSettings::default().proto_weight);
    let (model, params) = Pamil::read(&file, "", proto_weight)
        .with_context(|| format!("{} is not a usable PAMIL head", path.display()))?;
    Ok(MilHead {
        model: MilModel::Pamil(Box::new(model)),
        params,
    })
}

fn load_abmil(path: &Path, file: &TensorFile) -> Result<MilHead> {
    let config: MilConfig = file
        .info("mil")
        .and_then(|v| serde_json::from_value(v).ok())
        .with_context(|| format!("{}: unreadable ABMIL sizes", path.display()))?;
    ensure!(
        [config.input_dim, config.hidden, config.attention]
            .iter()
            .all(|&d| (1..=1 << 16).contains(&d)),
        "{}: implausible MIL sizes {config:?}",
        path.display()
    );
    let model = AbMil::new(config);
    let mut params = vec![0.0; model.param_len()];
    for t in model.layout.tensors(config) {
        params[t.range].copy_from_slice(&file.tensor_shaped::<f64>(&t.name, &t.shape)?);
    }
    let dim = [config.input_dim];
    let standardizer = Standardizer {
        mean: file.tensor_shaped("input.mean", &dim)?,
        std: file.tensor_shaped("input.std", &dim)?,
    };
    Ok(MilHead {
        model: MilModel::Abmil {
            model,
            standardizer,
        },
        params,
    })
}

/// Predicts every bag of `embeddings` with `head`, evaluates the predictions (retrieval in the
/// top `top_k`) and writes the reports into `dir`.
pub fn evaluate(
    dir: &Path,
    head: &MilHead,
    embeddings: &Embeddings,
    top_k: usize,
) -> Result<Evaluation> {
    let bags = MilBag::from_embeddings(embeddings);
    let predictions: Vec<_> = bags.iter().map(|b| head.predict(b)).collect();
    let evaluation = super::evaluate(&bags, &predictions, top_k);
    write_evaluation(dir, embeddings, &predictions, &evaluation)?;
    Ok(evaluation)
}

/// Writes predictions, attention and metrics of `embeddings` into `dir`.
pub fn write_evaluation(
    dir: &Path,
    embeddings: &Embeddings,
    predictions: &[BagPrediction],
    evaluation: &Evaluation,
) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["bag", "label", "probability", "predicted"])?;
    for (bag, p) in embeddings.bags.iter().zip(predictions) {
        let predicted = if p.probability >= 0.5 {
            "abnormal"
        } else {
            "normal"
        };
        w.write_record([
            &bag.name,
            &bag.label.to_string(),
            &format!("{:.6}", p.probability),
            predicted,
        ])?;
    }
    write_csv(&dir.join(PREDICTIONS_FILE), w)?;

    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["bag", "patch", "source", "attention", "rank", "instance"])?;
    for (bag, p) in embeddings.bags.iter().zip(predictions) {
        let mut order: Vec<usize> = (0..p.attention.len()).collect();
        order.sort_by(|&a, &b| p.attention[b].total_cmp(&p.attention[a]));
        let mut rank = vec![0; order.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r + 1;
        }
        for (i, &a) in p.attention.iter().enumerate() {
            let patch = bag.patches.start + i;
            let instance = match embeddings.instances[patch] {
                None => "",
                Some(true) => "abnormal",
                Some(false) => "normal",
            };
            w.write_record([
                bag.name.as_str(),
                &patch.to_string(),
                &embeddings.sources[patch],
                &format!("{a:.6e}"),
                &rank[i].to_string(),
                instance,
            ])?;
        }
    }
    write_csv(&dir.join(ATTENTION_FILE), w)?;

    let metrics = serde_json::json!({
        "metrics": evaluation.metrics,
        "top_k": evaluation.k,
        "retrieval_mean_hits": evaluation.mean_hits(),
        "retrieval_mean_fraction": evaluation.mean_fraction(),
        "retrieval": evaluation.retrieval,
    });
    let json = serde_json::to_string_pretty(&metrics)?;
    write_atomic(&dir.join(METRICS_FILE), json.as_bytes())?;
    if !evaluation.retrieval.is_empty() {
        let bars: Vec<(String, f64)> = evaluation
            .retrieval
            .iter()
            .map(|(name, r)| (name.clone(), r.fraction()))
            .collect();
        let title = format!(
            "Abnormal cells among the top {} attention scores, per abnormal bag",
            evaluation.k
        );
        plots::bar_chart(
            &dir.join(RETRIEVAL_PLOT),
            &title,
            "share of the bag's abnormal cells",
            &bars,
        )?;
    }
    Ok(())
}

fn write_csv(path: &Path, w: csv::Writer<Vec<u8>>) -> Result<()> {
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write CSV: {e}"))?;
    write_atomic(path, &bytes)
}
