//! `slam mil`: gated-attention MIL on embedded bags, trained and evaluated.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand};

use crate::embed::Embeddings;
use crate::mil::{Adam, Evaluation, MilBag, MilHead, MilTrainConfig, report};

#[derive(Subcommand, Debug)]
pub enum MilCommand {
    /// Train the MIL head on embedded bags (and evaluate it on a test set).
    #[command(after_help = "Examples:
  slam mil train train.embed.safetensors --test test.embed.safetensors --out mil/
  slam mil train train.embed.safetensors --out mil/ --epochs 60 --lr 1e-4 --hidden 256

Writes mil.safetensors (the head) into the output folder, and with --test also
predictions.csv (per bag), attention.csv (per patch: attention and its rank in the bag)
and metrics.json (F1 of the abnormal class, accuracy, AUC, top-K retrieval).")]
    Train(MilTrainArgs),
    /// Evaluate a trained MIL head on embedded bags.
    #[command(after_help = "Example:
  slam mil eval mil/mil.safetensors test.embed.safetensors --out mil-test/")]
    Eval(MilEvalArgs),
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
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,
    #[arg(long, default_value_t = Adam::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = Adam::default().weight_decay)]
    pub weight_decay: f64,
    /// Size of the instance embedding inside the head.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Size of the gated attention branch.
    #[arg(long, default_value_t = 64)]
    pub attention: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub eval: EvalOptions,
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
    ensure!(args.epochs >= 1, "--epochs must be at least 1");
    ensure!(
        args.lr > 0.0 && args.lr.is_finite(),
        "--lr must be positive"
    );
    ensure!(
        args.hidden >= 1 && args.attention >= 1,
        "--hidden and --attention must be at least 1"
    );
    let embeddings = Embeddings::load(&args.train)?;
    let test = args.test.as_deref().map(Embeddings::load).transpose()?;
    if let Some(test) = &test {
        ensure!(
            test.dim == embeddings.dim,
            "the test bags have {}-dimensional features, the training bags {}",
            test.dim,
            embeddings.dim
        );
    }
    prepare_out(&args.out, args.eval.force)?;
    let config = MilTrainConfig {
        epochs: args.epochs,
        adam: Adam {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..Adam::default()
        },
        seed: args.seed,
    };
    let bags = MilBag::from_embeddings(&embeddings);
    let sizes = (args.hidden, args.attention);
    let head = MilHead::train(&bags, embeddings.dim, sizes, &config, |log| {
        if log.epoch % 10 == 9 || log.epoch + 1 == config.epochs {
            eprintln!(
                "epoch {:>4}: loss {:.4}, training accuracy {:.3}",
                log.epoch + 1,
                log.loss,
                log.accuracy
            );
        }
    });
    let path = args.out.join(report::MODEL_FILE);
    report::save_model(&path, &head)?;
    println!("trained on {} bags: {}", bags.len(), path.display());
    if let Some(test) = &test {
        print_evaluation(
            &args.out,
            &report::evaluate(&args.out, &head, test, args.eval.top_k)?,
        );
    }
    Ok(())
}

fn eval(args: &MilEvalArgs) -> Result<()> {
    let head = report::load_model(&args.model)?;
    let embeddings = Embeddings::load(&args.bags)?;
    ensure!(
        embeddings.dim == head.model.config.input_dim,
        "{} has {}-dimensional features; the MIL head takes {}",
        args.bags.display(),
        embeddings.dim,
        head.model.config.input_dim
    );
    prepare_out(&args.out, args.eval.force)?;
    let evaluation = report::evaluate(&args.out, &head, &embeddings, args.eval.top_k)?;
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
