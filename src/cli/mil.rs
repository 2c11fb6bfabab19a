//! `slam mil`: MIL heads (gated attention, or the reference's PAMIL) on embedded bags,
//! trained and evaluated.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::embed::Embeddings;
use crate::mil::{
    Aggregator, Evaluation, HeadSpec, MilBag, MilModel, MilTrainConfig, PamilSettings, PamilStart,
    ProtoInit, Selection, TrainedHead, report,
};

#[derive(Subcommand, Debug)]
pub enum MilCommand {
    /// Train a MIL head on embedded bags (and evaluate it on a test set).
    #[command(after_help = "Examples:
  slam mil train train.embed.safetensors --test test.embed.safetensors --out mil/
  slam mil train train.embed.safetensors --out mil/ --epochs 60 --lr 1e-4 --hidden 256
  slam mil train train.embed.safetensors --test test.embed.safetensors --out pamil/ \\
      --aggregator pamil --prototypes 10 --proto-pred --inst-pred
  slam mil train wr1.embed.safetensors --out pamil-wr1/ --aggregator pamil \\
      --init-head pamil-wr10/mil.safetensors --freeze-epochs 5

Writes mil.safetensors (the head) into the output folder, and with --test also
predictions.csv (per bag), attention.csv (per patch: attention and its rank in the bag),
metrics.json (F1 of the abnormal class, accuracy, AUC, top-K retrieval) and retrieval.png.

The head is ABMIL (gated attention) unless --aggregator pamil: ABMIL stays the default so
that a command keeps meaning what it meant before PAMIL was added, and because it
standardizes its inputs, which makes it indifferent to the scale of the embeddings. PAMIL is
the head of the paper's published code, as that code computes it; use it to compare with
the paper's figures. It keeps the epoch of best training accuracy (the later one on ties) as
the reference does, and writes the last epoch's head as mil-last.safetensors when that is
another one. A PAMIL head is the reference module's state_dict: in PyTorch,
load_state_dict(load_file(\"mil.safetensors\"), strict=True) takes it.")]
    Train(MilTrainArgs),
    /// Evaluate a trained MIL head (ABMIL or PAMIL) on embedded bags.
    #[command(after_help = "Example:
  slam mil eval mil/mil.safetensors test.embed.safetensors --out mil-test/

The kind of head is read from the file; a PAMIL state_dict saved from PyTorch as
safetensors works too.")]
    Eval(MilEvalArgs),
}

/// `--freeze-epochs`' default: the reference's.
const FREEZE_EPOCHS: usize = 5;

/// "`what` [default: X with abmil, Y with pamil]", the defaults read off each head.
fn per_head<T: std::fmt::Display>(what: &str, default: impl Fn(Aggregator) -> T) -> String {
    format!(
        "{what} [default: {} with abmil, {} with pamil]",
        default(Aggregator::Abmil),
        default(Aggregator::Pamil)
    )
}

#[derive(Args, Debug)]
pub struct MilTrainArgs {
    /// Embedded training bags (from `slam embed`).
    pub train: PathBuf,
    /// Embedded test bags to evaluate on after training.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// The head: abmil (gated attention on standardized features) or pamil (the reference's
    /// prototype-based head).
    #[arg(long, value_enum, default_value_t = Aggregator::Abmil)]
    pub aggregator: Aggregator,
    #[arg(long, help = per_head("Training epochs", |a| a.train_defaults().epochs))]
    pub epochs: Option<usize>,
    #[arg(long, help = per_head("Adam's learning rate", |a| a.train_defaults().adam.lr))]
    pub lr: Option<f64>,
    #[arg(long, help = per_head("Adam's L2 weight decay", |a| a.train_defaults().adam.weight_decay))]
    pub weight_decay: Option<f64>,
    #[arg(long, help = per_head("Size of the instance embedding inside the head", |a| a.default_sizes().0))]
    pub hidden: Option<usize>,
    #[arg(long, help = per_head("Size of the gated attention branches", |a| a.default_sizes().1))]
    pub attention: Option<usize>,
    #[arg(long, value_enum, help = per_head(
        "Which epoch's head to keep: best (the latest of best training accuracy) or last",
        |a| a.train_defaults().select.to_possible_value().expect("named").get_name().to_owned()
    ))]
    pub select: Option<Selection>,
    /// Seeds the initialization and the order of the bags.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub eval: EvalOptions,
    #[command(flatten, next_help_heading = "PAMIL (with --aggregator pamil)")]
    pub pamil: PamilSettings,
    /// Start from this PAMIL head (e.g. trained at a higher witness rate), the curriculum of
    /// the reference: its prototypes, fc and prototype classifier stay frozen for
    /// --freeze-epochs.
    #[arg(long, help_heading = "PAMIL (with --aggregator pamil)")]
    pub init_head: Option<PathBuf>,
    /// Epochs the --init-head curriculum keeps proto, fc and proto_pred_classifier frozen.
    #[arg(long, default_value_t = FREEZE_EPOCHS, help_heading = "PAMIL (with --aggregator pamil)")]
    pub freeze_epochs: usize,
}

impl MilTrainArgs {
    /// The training settings: the head's own defaults, overridden by the flags given.
    fn train_config(&self) -> Result<MilTrainConfig> {
        let defaults = self.aggregator.train_defaults();
        let config = MilTrainConfig {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            adam: crate::mil::Adam {
                lr: self.lr.unwrap_or(defaults.adam.lr),
                weight_decay: self.weight_decay.unwrap_or(defaults.adam.weight_decay),
                ..defaults.adam
            },
            seed: self.seed,
            select: self.select.unwrap_or(defaults.select),
            freeze_epochs: if self.init_head.is_some() {
                self.freeze_epochs
            } else {
                0
            },
        };
        ensure!(config.epochs >= 1, "--epochs must be at least 1");
        ensure!(
            config.adam.lr > 0.0 && config.adam.lr.is_finite(),
            "--lr must be positive"
        );
        ensure!(
            config.adam.weight_decay >= 0.0 && config.adam.weight_decay.is_finite(),
            "--weight-decay must be a non-negative number"
        );
        Ok(config)
    }

    /// The head to train over `dim` features (reading --init-head).
    fn head_spec(&self, dim: usize) -> Result<HeadSpec> {
        let (hidden, attention) = self.aggregator.default_sizes();
        let (hidden, attention) = (
            self.hidden.unwrap_or(hidden),
            self.attention.unwrap_or(attention),
        );
        ensure!(
            hidden >= 1 && attention >= 1,
            "--hidden and --attention must be at least 1"
        );
        if self.aggregator == Aggregator::Abmil {
            ensure!(
                self.pamil == PamilSettings::default()
                    && self.init_head.is_none()
                    && self.freeze_epochs == FREEZE_EPOCHS,
                "--prototypes, --proto-pred, --inst-pred, --init-head and the other PAMIL \
                 settings apply to --aggregator pamil only"
            );
            return Ok(HeadSpec::Abmil { hidden, attention });
        }
        self.pamil.validate()?;
        ensure!(
            self.init_head.is_some() || self.freeze_epochs == FREEZE_EPOCHS,
            "--freeze-epochs applies with --init-head only"
        );
        let start = match &self.init_head {
            None => PamilStart::Fresh(self.pamil.proto_init),
            Some(path) => {
                ensure!(
                    self.pamil.proto_init == ProtoInit::Normal,
                    "--proto-init does not apply with --init-head (the prototypes come from the head)"
                );
                let head = report::load_model(path)?;
                match head.model {
                    MilModel::Pamil(model) => PamilStart::Head(model, head.params),
                    MilModel::Abmil { .. } => bail!(
                        "{} is an ABMIL head; --init-head takes a PAMIL head",
                        path.display()
                    ),
                }
            }
        };
        let spec = HeadSpec::Pamil {
            config: self.pamil.config(dim, hidden, attention),
            losses: self.pamil.losses,
            start,
        };
        if let Some(path) = &self.init_head {
            spec.check(dim)
                .with_context(|| format!("--init-head {}", path.display()))?;
        }
        Ok(spec)
    }
}

#[derive(Args, Debug)]
pub struct MilEvalArgs {
    /// A trained head (mil.safetensors from `slam mil train`).
    pub model: PathBuf,
    /// Embedded bags to evaluate.
    pub bags: PathBuf,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub eval: EvalOptions,
}

#[derive(Args, Debug)]
pub struct EvalOptions {
    /// K of the positive-cell retrieval: abnormal cells among each abnormal bag's K
    /// most-attended patches (capped by the bag size).
    #[arg(long, default_value_t = 400)]
    pub top_k: usize,
    /// Write into an output folder that already holds files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: &MilCommand) -> Result<()> {
    match cmd {
        MilCommand::Train(args) => train(args),
        MilCommand::Eval(args) => eval(args),
    }
}

fn prepare_out(dir: &Path, force: bool) -> Result<()> {
    let occupied = dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some();
    ensure!(
        force || !occupied,
        "{} is not empty; pass --force to write into it",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn train(args: &MilTrainArgs) -> Result<()> {
    let config = args.train_config()?;
    let embeddings = Embeddings::load(&args.train)?;
    ensure!(
        !embeddings.bags.is_empty(),
        "{} holds no bags to train on",
        args.train.display()
    );
    let test = args.test.as_deref().map(Embeddings::load).transpose()?;
    if let Some(test) = &test {
        ensure!(
            test.dim == embeddings.dim,
            "the test bags have {}-dimensional features, the training bags {}",
            test.dim,
            embeddings.dim
        );
    }
    let spec = args.head_spec(embeddings.dim)?;
    prepare_out(&args.out, args.eval.force)?;
    let bags = MilBag::from_embeddings(&embeddings);
    let bar = ProgressBar::new(config.epochs as u64).with_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:25}] {pos}/{len} epochs {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} on {} bags", args.aggregator.name(), bags.len()));
    let trained = spec.train(&bags, embeddings.dim, &config, |log| {
        bar.set_message(format!(
            "loss {:.4}, training accuracy {:.3}",
            log.loss, log.accuracy
        ));
        bar.inc(1);
        if log.epoch % 10 == 9 || log.epoch + 1 == config.epochs {
            bar.suspend(|| {
                eprintln!(
                    "epoch {:>4}: loss {:.4}, training accuracy {:.3}",
                    log.epoch + 1,
                    log.loss,
                    log.accuracy
                )
            });
        }
    })?;
    bar.finish_and_clear();
    let path = args.out.join(report::MODEL_FILE);
    save_heads(&args.out, &trained, config.epochs)?;
    println!(
        "trained {} on {} bags: {} (epoch {}, training accuracy {:.3})",
        args.aggregator.name(),
        bags.len(),
        path.display(),
        trained.selected_epoch + 1,
        trained.selected_accuracy
    );
    if let Some(test) = &test {
        print_evaluation(
            &args.out,
            &report::evaluate(&args.out, &trained.selected, test, args.eval.top_k)?,
        );
    }
    Ok(())
}

/// Writes the kept head, and the last epoch's beside it when that is another.
fn save_heads(dir: &Path, trained: &TrainedHead, epochs: usize) -> Result<()> {
    report::save_model(&dir.join(report::MODEL_FILE), &trained.selected)?;
    if trained.selected_epoch + 1 < epochs {
        report::save_model(&dir.join(report::LAST_MODEL_FILE), &trained.last)?;
    }
    Ok(())
}

fn eval(args: &MilEvalArgs) -> Result<()> {
    let head = report::load_model(&args.model)?;
    let embeddings = Embeddings::load(&args.bags)?;
    ensure!(
        embeddings.dim == head.input_dim(),
        "{} has {}-dimensional features; the MIL head takes {}",
        args.bags.display(),
        embeddings.dim,
        head.input_dim()
    );
    prepare_out(&args.out, args.eval.force)?;
    let evaluation = report::evaluate(&args.out, &head, &embeddings, args.eval.top_k)?;
    println!("{} head {}", head.aggregator().name(), args.model.display());
    print_evaluation(&args.out, &evaluation);
    Ok(())
}

/// Prints the metrics of an evaluation whose reports are in `dir`.
pub fn print_evaluation(dir: &Path, evaluation: &Evaluation) {
    let m = &evaluation.metrics;
    let auc = m
        .auc
        .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.3}"));
    println!(
        "{} bags: F1 {:.3}, accuracy {:.3}, AUC {auc}, precision {:.3}, recall {:.3}",
        m.bags, m.f1, m.accuracy, m.precision, m.recall
    );
    if let (Some(hits), Some(fraction)) = (evaluation.mean_hits(), evaluation.mean_fraction()) {
        println!(
            "retrieval: {hits:.1} abnormal cells in the top {} per abnormal bag ({:.1}% of them)",
            evaluation.k,
            100.0 * fraction
        );
    }
    println!("reports: {}", dir.display());
}
