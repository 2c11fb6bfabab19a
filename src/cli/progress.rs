//! Progress bars for long work: a pretraining run's steps, with a line per epoch and
//! checkpoint; SIGINT and SIGTERM ask the run to stop cleanly.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

use crate::mil::Aggregator;
use crate::pipeline::experiment::bag_head_names;
use crate::pretrain::{EpochLog, Observer, StepLog};

/// The progress bar: losses, gradient cosine and speed; a line per epoch and checkpoint.
/// With [`Progress::stop_on_signals`], SIGINT and SIGTERM ask the run to stop cleanly.
pub struct Progress {
    pub bar: ProgressBar,
    stop: Arc<AtomicBool>,
}

impl Progress {
    /// Makes SIGINT (Ctrl-C) and SIGTERM request a clean stop (checkpoint, then exit)
    /// instead of killing the process.
    pub fn stop_on_signals(&mut self) -> Result<()> {
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&self.stop))
                .context("cannot install the signal handlers")?;
        }
        Ok(())
    }

    pub fn new() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:25}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        Self {
            bar: ProgressBar::new(0).with_style(style),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Progress {
    fn started(&mut self, first_step: u64, end_step: u64, steps_per_epoch: u64) {
        self.bar.set_length(end_step);
        self.bar.set_position(first_step);
        self.bar.reset_eta();
        self.bar
            .set_prefix(format!("pretrain ({steps_per_epoch} steps/epoch)"));
    }

    fn step(&mut self, log: &StepLog) {
        let r = &log.report;
        self.bar.set_message(format!(
            "epoch {} | loss {:.4}: contrastive {:.4} cohesion {:.4} | cos {:+.3}{} | {:.1} img/s",
            log.epoch,
            r.loss,
            r.loss_contrastive,
            r.loss_cohesion,
            r.combination.cosine,
            if r.combination.fired {
                " (surgery)"
            } else {
                ""
            },
            log.images_per_s
        ));
        self.bar.inc(1);
    }

    fn epoch(&mut self, log: &EpochLog) {
        // println is dropped when the bar is hidden (stderr not a terminal); suspend is not.
        self.bar.suspend(|| eprintln!(
            "epoch {:>4}: loss {:.4} (contrastive {:.4}, cohesion {:.4}), mean cosine {:+.3}, surgery on {:.0}% of steps, {:.1} img/s",
            log.epoch,
            log.loss,
            log.loss_contrastive,
            log.loss_cohesion,
            log.cosine,
            100.0 * log.fired,
            log.images_per_s
        ));
    }

    fn checkpoint(&mut self, step: u64, path: &Path) {
        self.bar
            .suspend(|| eprintln!("step {step}: checkpoint {}", path.display()));
    }

    fn warn(&mut self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

impl Drop for Progress {
    /// A run's bar leaves no trace behind when its observer goes (the demo runs several).
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The console of an experiment (and of the demo): a bar over the whole grid of runs, each
/// run's pretraining bar under it, and each run's results as it finishes.
pub struct GridConsole {
    multi: indicatif::MultiProgress,
    grid: ProgressBar,
}

impl GridConsole {
    pub fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:25}] {pos}/{len} runs {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        let grid = multi.add(
            ProgressBar::new(0)
                .with_style(style)
                .with_prefix("experiment"),
        );
        Self { multi, grid }
    }

    /// Prints a line above the bars.
    fn line(&self, text: &str) {
        self.multi.suspend(|| eprintln!("{text}"));
    }
}

impl Default for GridConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::pipeline::experiment::ExperimentObserver for GridConsole {
    fn started(&mut self, runs: usize, done: usize) {
        self.grid.set_length(runs as u64);
        self.grid.set_position(done as u64);
        self.grid.reset_eta();
        if done > 0 {
            self.line(&format!(
                "{done} of {runs} runs were done before: continuing"
            ));
        }
    }

    fn stage(&mut self, message: &str) {
        self.grid
            .set_message(message.trim_start_matches("== ").to_owned());
        self.line(message);
    }

    fn pretraining(&mut self, _label: &str) -> Box<dyn Observer> {
        let progress = Progress::new();
        self.multi.add(progress.bar.clone());
        Box::new(progress)
    }

    fn finished(
        &mut self,
        result: &crate::pipeline::experiment::RunResult,
        dir: &Path,
        instance: &[crate::eval::InstanceReport],
    ) {
        let mut text = String::new();
        for report in instance {
            text.push_str(&super::eval::render(report));
        }
        let m = &result.metrics;
        let get = |k: &str| {
            m.get(k)
                .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3}"))
        };
        for head in Aggregator::value_variants() {
            let (_, prefix) = bag_head_names(*head);
            if m.contains_key(&format!("{prefix}.f1")) {
                let get = |name: &str| get(&format!("{prefix}.{name}"));
                text.push_str(&format!(
                    "bags ({} on z): F1 {}, accuracy {}, AUC {}, retrieval {}\n",
                    head.name(),
                    get("f1"),
                    get("accuracy"),
                    get("auc"),
                    get("retrieval")
                ));
            }
        }
        text.push_str(&format!(
            "pretraining {:.0} s{}; files: {}",
            result.pretrain_seconds,
            if result.collapse_warnings > 0 {
                format!(", COLLAPSE warned {} times", result.collapse_warnings)
            } else {
                String::new()
            },
            dir.display()
        ));
        self.line(&text);
        self.grid.inc(1);
    }
}

impl Drop for GridConsole {
    fn drop(&mut self) {
        self.grid.finish_and_clear();
    }
}
