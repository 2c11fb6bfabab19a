//! A run's logs: one JSON line per step (`metrics.jsonl`) and per epoch (`epochs.jsonl`),
//! cut back to a checkpoint on resume, and the plots drawn from them.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{METRICS_FILE, PLOTS_DIR};
use crate::atomic::AtomicFile;
use crate::model::StepReport;
use crate::plots;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    /// Images through the network per second (two views of every patch), including the
    /// augmentation.
    pub images_per_s: f64,
    #[serde(flatten)]
    pub report: StepReport,
}

/// One line of `epochs.jsonl`: means over the epoch's steps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochLog {
    pub epoch: u64,
    pub steps: u64,
    /// The objective descended (see `StepReport::loss`).
    pub loss: f64,
    pub loss_contrastive: f64,
    pub loss_cohesion: f64,
    pub cosine: f64,
    /// Share of steps where the gradients conflicted and surgery projected them.
    pub fired: f64,
    pub images_per_s: f64,
}

impl EpochLog {
    pub(super) fn add(&mut self, log: &StepLog) {
        let r = &log.report;
        self.steps += 1;
        self.loss += r.loss as f64;
        self.loss_contrastive += r.loss_contrastive as f64;
        self.loss_cohesion += r.loss_cohesion as f64;
        self.cosine += r.combination.cosine;
        self.fired += r.combination.fired as u8 as f64;
        self.images_per_s += log.images_per_s;
    }

    /// The means of the epoch so far; resets for the next.
    pub(super) fn finish(&mut self, epoch: u64) -> EpochLog {
        let n = self.steps.max(1) as f64;
        let done = std::mem::take(self);
        EpochLog {
            epoch,
            steps: done.steps,
            loss: done.loss / n,
            loss_contrastive: done.loss_contrastive / n,
            loss_cohesion: done.loss_cohesion / n,
            cosine: done.cosine / n,
            fired: done.fired / n,
            images_per_s: done.images_per_s / n,
        }
    }
}

/// Draws `plots/losses.png` (both task losses and the objective per step) and `plots/conflict.png` (the cosine of
/// the two task gradients per step) from the run's `metrics.jsonl`.
pub fn write_plots(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join(METRICS_FILE))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |name, get: &dyn Fn(&serde_json::Value) -> Option<f64>| plots::Series {
        name,
        points: lines
            .iter()
            .filter_map(|l| Some((l["step"].as_f64()?, get(l)?)))
            .collect(),
    };
    let plots_dir = dir.join(PLOTS_DIR);
    std::fs::create_dir_all(&plots_dir)?;
    let contrastive = series("contrastive (NT-Xent, positives)", &|l| {
        l["loss_contrastive"].as_f64()
    });
    let cohesion = series("cohesion (negatives)", &|l| l["loss_cohesion"].as_f64());
    let objective = series("objective (weighted sum, or the weak baseline's)", &|l| {
        l["loss"].as_f64()
    });
    plots::line_chart(
        &plots_dir.join("losses.png"),
        "Losses",
        "step",
        "loss",
        &[contrastive, cohesion, objective],
    )?;
    let cosine = series("cos(g1, g2)", &|l| l["combination"]["cosine"].as_f64());
    plots::line_chart(
        &plots_dir.join("conflict.png"),
        "Gradient conflict: cosine of the two task gradients (surgery fires below 0)",
        "step",
        "cosine",
        &[cosine],
    )
}

pub(super) fn open_log(path: &Path) -> Result<std::io::BufWriter<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(std::io::BufWriter::new(file))
}

/// Keeps the lines of a JSON-lines log for which `keep` holds (and that parse), atomically.
pub(super) fn truncate_log(path: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut file = AtomicFile::create(path)?;
    for line in text.lines().filter(|l| keep(l)) {
        writeln!(file, "{line}")?;
    }
    file.commit()
}

pub(super) fn line_field(line: &str, key: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get(key)?
        .as_u64()
}
