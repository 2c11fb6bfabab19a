//! An experiment's summary: per witness rate and variant, the mean, standard deviation and
//! 95% interval of every metric over the seeds; paired differences (same seed, so same data
//! and start) against the baselines; the Markdown table and the charts.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{ExperimentConfig, RunResult, Variant};
use crate::mil::Aggregator;
use crate::plots;

/// The metrics the tables show, with their column names (those no run measured are left
/// out: PAMIL's unless `--mil-heads` names it).
const TABLE: [(&str, &str); 10] = [
    ("h.knn_auroc", "kNN AUROC h"),
    ("h.centroid_auroc", "centroid AUROC h"),
    ("h.probe_auroc", "probe AUROC h"),
    ("z.knn_auroc", "kNN AUROC z"),
    ("h.top_k_precision", "top-K precision h"),
    ("z.mean_cosine", "mean cos z"),
    ("bag.auc", "bag AUC ABMIL"),
    ("bag.f1", "bag F1 ABMIL"),
    ("pamil.auc", "bag AUC PAMIL"),
    ("pamil.f1", "bag F1 PAMIL"),
];

/// The metrics compared pair by pair against the baselines, and charted.
const COMPARED: [(&str, &str); 5] = [
    ("h.knn_auroc", "kNN AUROC h"),
    ("h.probe_auroc", "probe AUROC h"),
    ("z.knn_auroc", "kNN AUROC z"),
    ("bag.auc", "bag AUC ABMIL"),
    ("pamil.auc", "bag AUC PAMIL"),
];

/// The entries of `columns` that some variant of `summary` measured.
fn measured<'a>(summary: &Summary, columns: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    columns
        .iter()
        .copied()
        .filter(|(metric, _)| {
            summary
                .rates
                .iter()
                .flat_map(|r| &r.variants)
                .any(|v| v.metrics.contains_key(*metric))
        })
        .collect()
}

/// The variants every other is compared with, when they ran.
const BASELINES: [&str; 2] = ["simclr", "random-init"];

/// Mean, sample standard deviation and the half-width of the two-sided 95% t interval of
/// the mean (0 for a single value).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    pub ci95: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let ci95 = if n > 1 {
            t95(n - 1) * sd / (n as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { n, mean, sd, ci95 })
    }
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    TABLE.get(df.max(1) - 1).copied().unwrap_or(1.960)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantSummary {
    pub variant: String,
    pub runs: usize,
    /// Runs that warned of collapsing embeddings at least once.
    pub collapsed_runs: usize,
    pub pretrain_seconds: Stat,
    pub metrics: BTreeMap<String, Stat>,
}

/// A variant against a baseline on one metric, over the seeds both ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub variant: String,
    pub baseline: String,
    pub metric: String,
    /// Of `variant - baseline`, seed by seed.
    pub difference: Stat,
    /// Seeds where the variant scored higher.
    pub wins: usize,
}

impl Comparison {
    /// Whether the 95% interval of the difference excludes zero (with 3 seeds or more: two
    /// equal differences make an interval of width zero, which says little).
    pub fn separated(&self) -> bool {
        self.difference.n >= 3 && self.difference.mean.abs() > self.difference.ci95
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateSummary {
    pub witness_rate: f64,
    pub variants: Vec<VariantSummary>,
    pub comparisons: Vec<Comparison>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub rates: Vec<RateSummary>,
}

/// Summarizes `runs` per witness rate, the variants in the given order.
pub fn summarize(runs: &[RunResult], variants: &[Variant], rates: &[f64]) -> Summary {
    let rates = rates
        .iter()
        .map(|&rate| {
            let of_variant = |name: &str| -> Vec<&RunResult> {
                runs.iter()
                    .filter(|r| r.witness_rate == rate && r.variant == name)
                    .collect()
            };
            let summaries = variants
                .iter()
                .map(|v| {
                    let name = v.to_string();
                    let runs = of_variant(&name);
                    let mut names: Vec<&String> =
                        runs.iter().flat_map(|r| r.metrics.keys()).collect();
                    names.sort();
                    names.dedup();
                    let metrics = names
                        .into_iter()
                        .filter_map(|m| {
                            let values: Vec<f64> = runs
                                .iter()
                                .filter_map(|r| r.metrics.get(m).copied())
                                .collect();
                            Some((m.clone(), Stat::of(&values)?))
                        })
                        .collect();
                    let seconds: Vec<f64> = runs.iter().map(|r| r.pretrain_seconds).collect();
                    VariantSummary {
                        variant: name,
                        runs: runs.len(),
                        collapsed_runs: runs.iter().filter(|r| r.collapse_warnings > 0).count(),
                        pretrain_seconds: Stat::of(&seconds).unwrap_or(Stat {
                            n: 0,
                            mean: 0.0,
                            sd: 0.0,
                            ci95: 0.0,
                        }),
                        metrics,
                    }
                })
                .collect();
            let mut comparisons = Vec::new();
            for baseline in BASELINES {
                let base = of_variant(baseline);
                if base.is_empty() {
                    continue;
                }
                for v in variants
                    .iter()
                    .map(Variant::to_string)
                    .filter(|v| v != baseline)
                {
                    for (metric, _) in COMPARED {
                        let pairs: Vec<(f64, f64)> = of_variant(&v)
                            .iter()
                            .filter_map(|r| {
                                let b = base.iter().find(|b| b.seed == r.seed)?;
                                Some((*r.metrics.get(metric)?, *b.metrics.get(metric)?))
                            })
                            .collect();
                        let diffs: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
                        if let Some(difference) = Stat::of(&diffs) {
                            comparisons.push(Comparison {
                                variant: v.clone(),
                                baseline: baseline.to_owned(),
                                metric: metric.to_owned(),
                                difference,
                                wins: pairs.iter().filter(|(a, b)| a > b).count(),
                            });
                        }
                    }
                }
            }
            RateSummary {
                witness_rate: rate,
                variants: summaries,
                comparisons,
            }
        })
        .collect();
    Summary { rates }
}

/// The summary as Markdown: the settings, then per witness rate the table of every variant
/// and the paired differences against each baseline.
pub fn render_markdown(config: &ExperimentConfig, summary: &Summary) -> String {
    let p = &config.pretrain;
    let net = p
        .net()
        .map_or_else(|_| p.net.arch.clone(), |n| n.to_string());
    let mut md = format!(
        "# Experiment: {} seed(s) from {}\n\n\
         Pretraining: {net}, crop {}, batch {}, {} epochs ({} warm-up), lr {}, temperature {}, \
         task weights {} and {} (unless the variant names its cohesion weight).\n\
         Data per witness rate and seed: {} synthetic bags of {} cells at {}x{} (a share of {} \
         for training), and {} held-out cells of each class for the cell-level metrics. Bag \
         level, on z: {}.\n\n\
         Cell level (on the held-out cells): AUROC of abnormal against normal cells by the \
         kNN and centroid distance to the normal bags' training cells (unsupervised), and by a \
         linear probe fitted on the training cells' truth (a diagnostic); top-K precision of \
         the kNN score with K the number of abnormal cells; mean cos z = mean pairwise cosine \
         of z (1: collapsed). Entries: mean ± standard deviation over the seeds.\n",
        config.seeds,
        p.seed,
        p.crop,
        p.batch,
        p.epochs,
        p.warmup_epochs,
        p.step.lr,
        p.step.temperature,
        p.step.contrastive_weight,
        p.step.cohesion_weight,
        config.plan.bags,
        config.plan.bag_size,
        config.patch_size,
        config.patch_size,
        config.plan.train_fraction,
        config.eval_cells,
        config
            .mil_heads
            .iter()
            .map(|h| match h {
                Aggregator::Abmil => format!(
                    "gated-attention MIL (ABMIL) for {} epochs, the last kept",
                    config.mil_epochs
                ),
                Aggregator::Pamil => format!(
                    "PAMIL at the reference's defaults for {} epochs, the epoch of best \
                     training accuracy kept",
                    config.pamil_epochs
                ),
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    let (table, compared) = (measured(summary, &TABLE), measured(summary, &COMPARED));
    for rate in &summary.rates {
        md.push_str(&format!("\n## Witness rate {}\n\n", rate.witness_rate));
        md.push_str("| variant | runs | collapse warned |");
        for (_, column) in &table {
            md.push_str(&format!(" {column} |"));
        }
        md.push_str("\n|---|---:|---:|");
        md.push_str(&"---:|".repeat(table.len()));
        md.push('\n');
        for v in &rate.variants {
            md.push_str(&format!(
                "| {} | {} | {} |",
                v.variant, v.runs, v.collapsed_runs
            ));
            for (metric, _) in &table {
                let cell = v.metrics.get(*metric).map_or_else(
                    || "n/a".to_owned(),
                    |s| match s.n {
                        1 => format!("{:.3}", s.mean),
                        _ => format!("{:.3} ± {:.3}", s.mean, s.sd),
                    },
                );
                md.push_str(&format!(" {cell} |"));
            }
            md.push('\n');
        }
        for baseline in BASELINES {
            let rows: Vec<&Comparison> = rate
                .comparisons
                .iter()
                .filter(|c| c.baseline == baseline)
                .collect();
            if rows.is_empty() {
                continue;
            }
            md.push_str(&format!(
                "\nPaired differences against {baseline} (same seeds): mean [95% interval], \
                 seeds won; **bold** where the interval excludes 0.\n\n| variant |"
            ));
            for (_, column) in &compared {
                md.push_str(&format!(" {column} |"));
            }
            md.push_str("\n|---|");
            md.push_str(&"---:|".repeat(compared.len()));
            md.push('\n');
            let mut variants: Vec<&str> = rows.iter().map(|c| c.variant.as_str()).collect();
            variants.dedup();
            for v in variants {
                md.push_str(&format!("| {v} |"));
                for (metric, _) in &compared {
                    let cell = rows
                        .iter()
                        .find(|c| c.variant == v && c.metric == *metric)
                        .map_or_else(
                            || "n/a".to_owned(),
                            |c| {
                                let d = &c.difference;
                                let text = match d.n {
                                    1 => format!("{:+.3} (1 seed)", d.mean),
                                    _ => format!(
                                        "{:+.3} [{:+.3}, {:+.3}] {}/{}",
                                        d.mean,
                                        d.mean - d.ci95,
                                        d.mean + d.ci95,
                                        c.wins,
                                        d.n
                                    ),
                                };
                                if c.separated() {
                                    format!("**{text}**")
                                } else {
                                    text
                                }
                            },
                        );
                    md.push_str(&format!(" {cell} |"));
                }
                md.push('\n');
            }
        }
    }
    md
}

/// One chart per compared metric and witness rate: the mean per variant, the standard
/// deviation as whiskers.
pub fn write_charts(dir: &Path, summary: &Summary) -> Result<()> {
    for rate in &summary.rates {
        for (metric, title) in COMPARED {
            let bars: Vec<(String, f64, f64)> = rate
                .variants
                .iter()
                .filter_map(|v| {
                    let s = v.metrics.get(metric)?;
                    Some((v.variant.clone(), s.mean, s.sd))
                })
                .collect();
            if bars.is_empty() {
                continue;
            }
            let file = format!("{}_w{}.png", metric.replace('.', "_"), rate.witness_rate);
            plots::bar_chart_with_errors(
                &dir.join(file),
                &format!(
                    "{title} at witness rate {} (mean, sd over seeds)",
                    rate.witness_rate
                ),
                title,
                &bars,
            )?;
        }
    }
    Ok(())
}
