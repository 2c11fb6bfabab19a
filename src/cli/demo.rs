//! `slam demo`: the whole method on synthetic data, no download: synthesize bags, pretrain,
//! embed, train and evaluate the MIL head, and print a results table; with `--compare`, the
//! paper's ablations side by side on the same data and seeds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde::Serialize;

use super::args::{EngineArgs, Matmul, with_engine};
use super::pretrain::Progress;
use crate::atomic::write_atomic;
use crate::checkpoint;
use crate::data::PatchStore;
use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SynthConfig, write_dataset};
use crate::embed::{self, Embeddings, FeatureKind};
use crate::engine::Engine;
use crate::mil::{Adam, MilHead, MilTrainConfig, report};
use crate::model::{ModelState, Surgery};
use crate::plots;
use crate::pretrain::{Objective, PretrainConfig, Run};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  slam demo                                  SLAM-AGS end to end into ./slam-demo
  slam demo --compare --out demo-compare     random init, SimCLR, SLAM without surgery, SLAM-AGS
  slam demo --epochs 20 --bags 40            longer and bigger

Everything is written under --out: data/ (the synthetic stores and a contact sheet of the
cells), one folder per variant (the pretraining run, the embeddings, the MIL reports) and
results.md / results.json with the table, auc.png and retrieval.png. Retrieval counts abnormal cells among the K most
attended patches of each abnormal bag, with K the number of abnormal cells per bag.")]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "slam-demo")]
    pub out: PathBuf,
    /// Run the ablations too: random init, SimCLR, SLAM without surgery, SLAM-AGS.
    #[arg(long)]
    pub compare: bool,
    /// Seed of the data, the initialization and the training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the synthetic patches.
    #[arg(long, default_value_t = 64)]
    pub patch_size: usize,
    /// Side of the crops fed to the network.
    #[arg(long, default_value_t = 48)]
    pub crop: usize,
    /// Bags in all, half for training and half for testing, half of each abnormal.
    #[arg(long, default_value_t = 96)]
    pub bags: usize,
    /// Cells per bag.
    #[arg(long, default_value_t = 50)]
    pub bag_size: usize,
    /// Abnormal cells per cell of an abnormal bag.
    #[arg(long, default_value_t = 0.1)]
    pub witness_rate: f64,
    /// Pretraining epochs.
    #[arg(long, default_value_t = 15)]
    pub epochs: u32,
    /// Pretraining learning rate (peak, after one warm-up epoch).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f32,
    /// Pretraining batch (patches per step).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Channels of the network's first stage (a ResNet-10 with projector output 64).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// MIL training epochs.
    #[arg(long, default_value_t = 40)]
    pub mil_epochs: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Replace the output folder's previous results.
    #[arg(long)]
    pub force: bool,
}

/// A pretraining variant of the comparison.
#[derive(Clone, Copy, Debug)]
struct Variant {
    name: &'static str,
    /// `None`: the network stays at its random initialization.
    pretrain: Option<(Objective, Surgery)>,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "random-init",
        pretrain: None,
    },
    Variant {
        name: "simclr",
        pretrain: Some((Objective::Simclr, Surgery::None)),
    },
    Variant {
        name: "slam-no-surgery",
        pretrain: Some((Objective::Slam, Surgery::None)),
    },
    Variant {
        name: "slam-ags",
        pretrain: Some((Objective::Slam, Surgery::Ags)),
    },
];

/// One row of the results table.
#[derive(Debug, Serialize)]
struct Row {
    variant: &'static str,
    pretrain_seconds: f64,
    f1: f64,
    accuracy: f64,
    auc: Option<f64>,
    retrieval_hits: Option<f64>,
    retrieval_fraction: Option<f64>,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let out = &args.out;
    ensure!(
        args.force || !out.join("results.json").exists(),
        "{} already holds demo results; pass --force to run again there",
        out.display()
    );
    let plan = BagPlanConfig {
        bags: args.bags,
        bag_size: args.bag_size,
        witness_rate: args.witness_rate,
        abnormal_fraction: 0.5,
        train_fraction: 0.5,
        seed: args.seed,
    };
    plan.validate()?;
    let synth = SynthConfig {
        patch_size: args.patch_size,
        seed: args.seed,
    };
    let data_dir = out.join("data");
    eprintln!(
        "synthesizing {} bags of {} cells ({} abnormal cells per abnormal bag) at {}x{} ...",
        plan.bags,
        plan.bag_size,
        plan.witnesses_per_bag(),
        args.patch_size,
        args.patch_size
    );
    let data = write_dataset(&synth, &plan, &data_dir, false, &mut |_| {})?;
    let variants: Vec<Variant> = if args.compare {
        VARIANTS.to_vec()
    } else {
        vec![VARIANTS[3]]
    };
    let mut rows = Vec::new();
    with_engine!(args.engine, Matmul::Tf32, |eng| {
        for variant in variants {
            eprintln!("== {}", variant.name);
            rows.push(run_variant(
                eng,
                args,
                variant,
                &data.paths.train,
                &data.paths.test,
                plan.witnesses_per_bag(),
            )?);
        }
    });
    let table = render_table(&rows, args, &plan);
    println!("\n{table}");
    println!(
        "total {:.0} s; contact sheet of the cells: {}",
        started.elapsed().as_secs_f64(),
        data.paths.contact_sheet.display()
    );
    write_atomic(&out.join("results.md"), table.as_bytes())?;
    let bars = |get: &dyn Fn(&Row) -> Option<f64>| -> Vec<(String, f64)> {
        rows.iter()
            .map(|r| (r.variant.to_owned(), get(r).unwrap_or(0.0)))
            .collect()
    };
    plots::bar_chart(
        &out.join("auc.png"),
        "Bag classification: AUC on the test bags",
        "AUC",
        &bars(&|r| r.auc),
    )?;
    plots::bar_chart(
        &out.join("retrieval.png"),
        "Abnormal cells among the top-K attention scores (K = abnormal cells per bag)",
        "share found",
        &bars(&|r| r.retrieval_fraction),
    )?;
    let json = serde_json::json!({ "seed": args.seed, "plan": plan, "rows": rows });
    write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

fn run_variant<E: Engine>(
    eng: &E,
    args: &DemoArgs,
    variant: Variant,
    train_store: &Path,
    test_store: &Path,
    top_k: usize,
) -> Result<Row> {
    let dir = args.out.join(variant.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = PretrainConfig {
        store: train_store.to_path_buf(),
        arch: "resnet10".into(),
        width: Some(args.width),
        out_dim: Some(64),
        batch: args.batch,
        epochs: args.epochs,
        warmup_epochs: 1.min(args.epochs),
        lr: args.lr,
        crop: args.crop,
        seed: args.seed,
        checkpoint_every: u64::MAX,
        ..PretrainConfig::default()
    };
    let start = Instant::now();
    let state = match variant.pretrain {
        None => ModelState::init(config.net()?, config.seed)?,
        Some((objective, surgery)) => {
            let config = PretrainConfig {
                objective,
                surgery,
                ..config.clone()
            };
            let mut progress = Progress::new();
            let state = Run::create(eng, &dir.join("run"), config)?.train(eng, &mut progress)?;
            progress.bar.finish_and_clear();
            state
        }
    };
    let pretrain_seconds = start.elapsed().as_secs_f64();
    checkpoint::save(&dir.join("model.safetensors"), &state)?;

    let embed_store = |store: &Path, name: &str| -> Result<Embeddings> {
        let store = PatchStore::open(store)?;
        let e = embed::embed(
            eng,
            &state,
            &store,
            FeatureKind::Projector,
            args.crop,
            128,
            |_, _| {},
        )?;
        e.save(&dir.join(name))?;
        Ok(e)
    };
    let train = embed_store(train_store, "train.embed.safetensors")?;
    let test = embed_store(test_store, "test.embed.safetensors")?;

    let mil_config = MilTrainConfig {
        epochs: args.mil_epochs,
        adam: Adam::default(),
        seed: args.seed,
    };
    let head = MilHead::train(&train.mil_bags(), train.dim, (64, 32), &mil_config, |_| {});
    let mil_dir = dir.join("mil");
    std::fs::create_dir_all(&mil_dir)?;
    report::save_model(&mil_dir.join(report::MODEL_FILE), &head)?;
    let evaluation = super::mil::evaluate_into(&mil_dir, &head, &test, top_k)?;
    let m = evaluation.metrics;
    Ok(Row {
        variant: variant.name,
        pretrain_seconds,
        f1: m.f1,
        accuracy: m.accuracy,
        auc: m.auc,
        retrieval_hits: evaluation.mean_hits(),
        retrieval_fraction: evaluation.mean_fraction(),
    })
}

fn render_table(rows: &[Row], args: &DemoArgs, plan: &BagPlanConfig) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "n/a".into(), f);
    let mut table = format!(
        "SLAM-AGS demo (seed {}): {} bags of {} synthetic cells, witness rate {}, \
         {}x{} patches, ResNet-10 width {} for {} epochs, test bags: {}\n\n",
        args.seed,
        plan.bags,
        plan.bag_size,
        plan.witness_rate,
        args.patch_size,
        args.patch_size,
        args.width,
        args.epochs,
        plan.bags - (plan.bags / 2)
    );
    table.push_str("| variant | pretrain s | bag F1 | accuracy | AUC | retrieval (top K) |\n");
    table.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        table.push_str(&format!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} |\n",
            r.variant,
            r.pretrain_seconds,
            r.f1,
            r.accuracy,
            opt(r.auc, &|a| format!("{a:.3}")),
            opt(r.retrieval_fraction, &|f| format!("{:.1}%", 100.0 * f)),
        ));
    }
    table
}
