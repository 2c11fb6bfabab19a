//! `slam eval`: instance-level evaluation of embeddings, no MIL head (see `crate::eval`).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::atomic::write_atomic;
use crate::embed::Embeddings;
use crate::eval::{self, InstanceEvalConfig, InstanceReport};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam eval --train train.embed.safetensors --test test.embed.safetensors
  slam eval --train train.h.safetensors --test cells.h.safetensors --neighbours 20 --out eval.json

Both files come from `slam embed` with the same model and --features. The test cells need
instance truth (instance_labels 0 or 1); cells of unknown truth are left out. Reported:
- probe AUROC: a logistic regression fitted on the training cells of known truth (a
  diagnostic that sees instance labels; n/a when the training cells carry none);
- anomaly AUROC: distance to the cells of the training bags labelled normal (centroid:
  1 - cos to their mean; kNN: 1 - mean cos to the --neighbours most similar);
- top-K: abnormal cells among the K highest kNN scores (K: --top-k, default the number of
  abnormal test cells; ties at the cut shared);
- spread: mean pairwise cosine (1: collapsed) and per-dimension std of the normalized
  embeddings times sqrt(dim) (about 1 when spread out, 0 when collapsed).")]
pub struct EvalArgs {
    /// Embeddings of the training cells: the probe's training set and, from its normal
    /// bags, the anomaly scores' reference.
    #[arg(long)]
    pub train: PathBuf,
    /// Embeddings of the test cells (with instance truth).
    #[arg(long)]
    pub test: PathBuf,
    #[command(flatten)]
    pub config: InstanceEvalConfig,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if let Some(out) = &args.out {
        ensure!(
            args.force || !out.exists(),
            "{} exists; pass --force to replace it",
            out.display()
        );
    }
    let train = Embeddings::load(&args.train)?;
    let test = Embeddings::load(&args.test)?;
    let report = eval::evaluate(&train, &test, &args.config).with_context(|| {
        format!(
            "cannot evaluate {} against {}",
            args.test.display(),
            args.train.display()
        )
    })?;
    print!("{}", render(&report));
    if let Some(out) = &args.out {
        write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("report: {}", out.display());
    }
    Ok(())
}

/// The report as lines for the terminal.
pub fn render(r: &InstanceReport) -> String {
    let probe = r.probe_auroc.map_or_else(
        || "n/a (no training cells of known truth)".into(),
        |a| format!("{a:.3}"),
    );
    format!(
        "{} features, dim {}: {} test cells ({} abnormal), reference {} normal-bag cells\n\
         probe AUROC        {probe}\n\
         anomaly AUROC      centroid {:.3}, kNN {:.3}\n\
         top-{} by kNN       {:.1} abnormal ({:.1}% precision, {:.1}% recall)\n\
         spread             mean pairwise cosine {:.3}, per-dimension std {:.3}\n",
        r.features,
        r.dim,
        r.test_cells,
        r.test_abnormal,
        r.reference_cells,
        r.centroid_auroc,
        r.knn_auroc,
        r.retrieval.k,
        r.retrieval.hits,
        100.0 * r.retrieval.precision,
        100.0 * r.retrieval.recall,
        r.spread.mean_pairwise_cosine,
        r.spread.per_dim_std,
    )
}
