//! Instance-level evaluation of embeddings, with no MIL head: how well the features of single
//! cells separate abnormal from normal ones, measured on test cells with instance truth.
//!
//! - **Linear probe**: a logistic regression on the training cells with instance truth,
//!   scored on the test cells (AUROC). A diagnostic: it sees instance labels, which the
//!   method never does.
//! - **Anomaly scores**, unsupervised: each test cell's distance to the slide-negative
//!   training cells (cells of normal bags, which are normal by construction). `centroid`:
//!   `1 - cos(x, mean of the reference cells)`; `knn`: one minus the mean cosine similarity
//!   to the `k` most similar reference cells. AUROC of each, and the top-K retrieval of
//!   abnormal cells by the kNN score.
//! - **Spread**: the mean pairwise cosine of the test embeddings (near 1: collapsed to one
//!   direction) and the per-dimension standard deviation of the L2-normalized embeddings
//!   (times `sqrt(dim)`: about 1 when spread out, 0 when collapsed).

mod probe;

use anyhow::{Result, ensure};
use serde::Serialize;

use crate::data::BagLabel;
use crate::embed::{Embeddings, FeatureKind};
use crate::matmul::{Mat, gemm};
use crate::mil::metrics::auc;
pub use probe::LogisticProbe;

/// Settings of the instance-level evaluation.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Serialize)]
pub struct InstanceEvalConfig {
    /// Reference cells averaged by the kNN anomaly score.
    #[arg(long, default_value_t = 10)]
    pub neighbours: usize,
    /// K of the top-K retrieval (default: the number of abnormal test cells, so that a
    /// perfect score retrieves every one).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// L2 penalty of the linear probe, on standardized features.
    #[arg(long, default_value_t = 1.0)]
    pub probe_l2: f64,
}

impl Default for InstanceEvalConfig {
    fn default() -> Self {
        Self {
            neighbours: 10,
            top_k: None,
            probe_l2: 1.0,
        }
    }
}

/// The spread of a set of embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Mean of `cos(x_i, x_j)` over all pairs `i != j`.
    pub mean_pairwise_cosine: f64,
    /// Mean over dimensions of the standard deviation of the L2-normalized embeddings, times
    /// `sqrt(dim)`.
    pub per_dim_std: f64,
}

/// What [`evaluate`] measured for one kind of features.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceReport {
    pub features: FeatureKind,
    pub dim: usize,
    /// Test cells with instance truth, and how many of them are abnormal.
    pub test_cells: usize,
    pub test_abnormal: usize,
    /// Cells of the training bags labelled normal (the anomaly scores' reference).
    pub reference_cells: usize,
    /// Training cells with instance truth the probe was fitted on (0: no probe).
    pub probe_cells: usize,
    /// `None` when the training cells carry no instance truth of both kinds.
    pub probe_auroc: Option<f64>,
    pub centroid_auroc: f64,
    pub knn_auroc: f64,
    /// Abnormal cells among the K highest kNN anomaly scores.
    pub retrieval: TopK,
    pub spread: Spread,
}

/// Evaluates the test embeddings' cells against the training embeddings (see the module).
pub fn evaluate(
    train: &Embeddings,
    test: &Embeddings,
    config: &InstanceEvalConfig,
) -> Result<InstanceReport> {
    ensure!(
        train.kind == test.kind && train.dim == test.dim,
        "the training embeddings hold {} features of {} values, the test embeddings {} of {}: \
         embed both with the same model and --features",
        train.kind,
        train.dim,
        test.kind,
        test.dim
    );
    ensure!(config.neighbours >= 1, "--neighbours must be at least 1");
    let dim = test.dim;
    let (test_rows, truth) = cells_with_truth(test);
    let test_abnormal = truth.iter().filter(|&&t| t).count();
    ensure!(
        test_abnormal > 0 && test_abnormal < truth.len(),
        "the test embeddings need cells of known truth of both kinds (abnormal and normal); \
         they hold {} abnormal and {} normal",
        test_abnormal,
        truth.len() - test_abnormal
    );
    let reference: Vec<f32> = train
        .bags
        .iter()
        .filter(|b| b.label == BagLabel::Normal)
        .flat_map(|b| &train.features[b.patches.start * dim..b.patches.end * dim])
        .copied()
        .collect();
    let reference_cells = reference.len() / dim;
    ensure!(
        reference_cells > 0,
        "the training embeddings hold no cells of normal bags, the anomaly scores' reference"
    );

    let (probe_rows, probe_truth) = cells_with_truth(train);
    let probe_abnormal = probe_truth.iter().filter(|&&t| t).count();
    let probe = (probe_abnormal > 0 && probe_abnormal < probe_truth.len())
        .then(|| LogisticProbe::fit(&probe_rows, dim, &probe_truth, config.probe_l2))
        .transpose()?;
    let probe_auroc = probe
        .as_ref()
        .map(|p| auc(&p.scores(&test_rows), &truth).expect("both kinds are present"));

    let knn = knn_scores(&reference, &test_rows, dim, config.neighbours);
    let top_k = config.top_k.unwrap_or(test_abnormal);
    Ok(InstanceReport {
        features: test.kind,
        dim,
        test_cells: truth.len(),
        test_abnormal,
        reference_cells,
        probe_cells: if probe.is_some() {
            probe_truth.len()
        } else {
            0
        },
        probe_auroc,
        centroid_auroc: auc(&centroid_scores(&reference, &test_rows, dim), &truth)
            .expect("both kinds are present"),
        knn_auroc: auc(&knn, &truth).expect("both kinds are present"),
        retrieval: top_k_hits(&knn, &truth, top_k),
        spread: spread(&test_rows, dim),
    })
}

/// How many abnormal cells the K highest scores hold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TopK {
    /// K, capped by the number of cells.
    pub k: usize,
    /// Abnormal cells among the top K; cells tied at the K-th score count by the share of
    /// abnormal ones among them (the expectation over every order of the ties), so that the
    /// order of the cells in the file cannot matter.
    pub hits: f64,
    /// `hits / k`.
    pub precision: f64,
    /// `hits` over all abnormal cells (or over K when there are more).
    pub recall: f64,
}

/// [`TopK`] of `scores` (higher: more likely abnormal) against `truth`.
pub fn top_k_hits(scores: &[f64], truth: &[bool], k: usize) -> TopK {
    assert_eq!(scores.len(), truth.len());
    let k = k.min(scores.len());
    let abnormal = truth.iter().filter(|&&t| t).count();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let hits = if k == 0 {
        0.0
    } else {
        let threshold = scores[order[k - 1]];
        let above = order.iter().take_while(|&&i| scores[i] > threshold);
        let (above_n, above_hits) = above.fold((0, 0), |(n, h), &i| (n + 1, h + truth[i] as usize));
        let tied: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| scores[i] == threshold)
            .collect();
        let tied_hits = tied.iter().filter(|&&i| truth[i]).count();
        above_hits as f64 + (k - above_n) as f64 * tied_hits as f64 / tied.len() as f64
    };
    TopK {
        k,
        hits,
        precision: if k == 0 { 0.0 } else { hits / k as f64 },
        recall: hits / abnormal.min(k).max(1) as f64,
    }
}

/// The rows of the cells whose instance truth is known, and that truth.
fn cells_with_truth(e: &Embeddings) -> (Vec<f32>, Vec<bool>) {
    let mut rows = Vec::new();
    let mut truth = Vec::new();
    for (row, instance) in e.features.chunks_exact(e.dim).zip(&e.instances) {
        if let Some(abnormal) = instance {
            rows.extend_from_slice(row);
            truth.push(*abnormal);
        }
    }
    (rows, truth)
}

/// Each row scaled to unit length, in f64 (a zero row stays zero).
fn normalized(rows: &[f32], dim: usize) -> Vec<f64> {
    rows.chunks_exact(dim)
        .flat_map(|row| {
            let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            row.iter().map(move |&v| v as f64 * scale)
        })
        .collect()
}

/// `1 - cos(x, c)` for every test row `x`, with `c` the mean of the reference rows.
pub fn centroid_scores(reference: &[f32], test: &[f32], dim: usize) -> Vec<f64> {
    let n = (reference.len() / dim).max(1) as f64;
    let mut centroid = vec![0.0f64; dim];
    for row in reference.chunks_exact(dim) {
        centroid
            .iter_mut()
            .zip(row)
            .for_each(|(c, &v)| *c += v as f64 / n);
    }
    let norm = centroid.iter().map(|c| c * c).sum::<f64>().sqrt();
    let unit: Vec<f64> = centroid
        .iter()
        .map(|c| c / norm.max(f64::MIN_POSITIVE))
        .collect();
    normalized(test, dim)
        .chunks_exact(dim)
        .map(|x| 1.0 - x.iter().zip(&unit).map(|(a, b)| a * b).sum::<f64>())
        .collect()
}

/// One minus the mean cosine similarity of every test row to its `k` most similar reference
/// rows (all of them when there are fewer).
pub fn knn_scores(reference: &[f32], test: &[f32], dim: usize, k: usize) -> Vec<f64> {
    let reference = normalized(reference, dim);
    let test = normalized(test, dim);
    let n_ref = reference.len() / dim;
    let k = k.clamp(1, n_ref.max(1));
    // Blocks of test rows bound the similarity matrix's memory.
    const BLOCK: usize = 512;
    let mut scores = Vec::with_capacity(test.len() / dim);
    let mut similarity = vec![0.0f64; BLOCK * n_ref];
    for block in test.chunks(BLOCK * dim) {
        let rows = block.len() / dim;
        let sim = &mut similarity[..rows * n_ref];
        gemm(
            sim,
            n_ref,
            false,
            Mat::rows(block, rows, dim),
            Mat::rows(&reference, n_ref, dim).t(),
        );
        for row in sim.chunks_exact_mut(n_ref) {
            // The k largest similarities sit after position n_ref - k once partitioned.
            row.select_nth_unstable_by(n_ref - k, f64::total_cmp);
            let mean = row[n_ref - k..].iter().sum::<f64>() / k as f64;
            scores.push(1.0 - mean);
        }
    }
    scores
}

/// The spread of `rows` (see [`Spread`]). The mean pairwise cosine comes from the sum of
/// the unit vectors, `|sum u|^2 = n + sum_{i != j} cos(u_i, u_j)`: exact, in one pass.
pub fn spread(rows: &[f32], dim: usize) -> Spread {
    let unit = normalized(rows, dim);
    let n = unit.len() / dim;
    let mut sum = vec![0.0f64; dim];
    for u in unit.chunks_exact(dim) {
        sum.iter_mut().zip(u).for_each(|(s, v)| *s += v);
    }
    let sum_sq = sum.iter().map(|s| s * s).sum::<f64>();
    let pairs = n as f64 * (n as f64 - 1.0);
    let mean_pairwise_cosine = if n > 1 {
        (sum_sq - n as f64) / pairs
    } else {
        0.0
    };
    let per_dim_std = if n > 0 {
        let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
        let mut var = vec![0.0f64; dim];
        for u in unit.chunks_exact(dim) {
            for ((v, x), m) in var.iter_mut().zip(u).zip(&mean) {
                *v += (x - m) * (x - m) / n as f64;
            }
        }
        var.iter().map(|v| v.sqrt()).sum::<f64>() / dim as f64 * (dim as f64).sqrt()
    } else {
        0.0
    };
    Spread {
        mean_pairwise_cosine,
        per_dim_std,
    }
}
