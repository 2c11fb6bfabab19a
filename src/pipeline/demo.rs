//! The whole method on synthetic data, no download (`slam demo`): synthesize bags, pretrain,
//! embed, train and evaluate the MIL head, and write a results table; with `compare`, the
//! paper's ablations side by side on the same data and seeds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::{Args, FromArgMatches};
use serde::Serialize;

use crate::atomic::write_atomic;
use crate::checkpoint;
use crate::data::PatchStore;
use crate::data::build::plan::BagPlanConfig;
use crate::data::build::synth::{SynthConfig, SynthDataset, write_dataset};
use crate::embed::{self, EmbedSettings, Embeddings, FeatureKind};
use crate::feed::{Feed, ViewSettings};
use crate::mil::{
    Aggregator, Evaluation, HeadSpec, MilBag, PamilSettings, PamilStart, ProtoInit, report,
};
use crate::model::{ModelState, NetSpec, Surgery};
use crate::plots;
use crate::pretrain::{Objective, Observer, PretrainConfig, Run};

/// The demo's settings: every pretraining setting (at the demo's small defaults), the bags,
/// and the MIL head's training.
#[derive(Args, Clone, Debug)]
#[command(
    mut_arg("arch", |a| a.default_value("resnet10")),
    mut_arg("width", |a| a.default_value("16")),
    mut_arg("out_dim", |a| a.default_value("64")),
    mut_arg("batch", |a| a.default_value("64")),
    mut_arg("epochs", |a| a.default_value("15")),
    mut_arg("warmup_epochs", |a| a.default_value("1")),
    mut_arg("lr", |a| a.default_value("0.0005")),
    mut_arg("crop", |a| a.default_value("48")),
    mut_arg("checkpoint_every", |a| a.default_value("18446744073709551615").hide(true)),
    mut_arg("bags", |a| a.default_value("96")),
    mut_arg("bag_size", |a| a.default_value("50"))
)]
pub struct DemoConfig {
    /// Output folder.
    #[arg(long, default_value = "slam-demo")]
    pub out: PathBuf,
    /// Run the ablations too (random init, SimCLR, SLAM without surgery, SLAM-AGS), each
    /// evaluated with both MIL heads (ABMIL and PAMIL).
    #[arg(long)]
    pub compare: bool,
    /// Side of the synthetic patches.
    #[arg(long, default_value_t = 64)]
    pub patch_size: usize,
    #[command(flatten)]
    pub plan: BagPlanConfig,
    /// The pretraining of the main variant (its --objective and --surgery name it); --seed
    /// also seeds the data and the MIL head.
    #[command(flatten)]
    pub pretrain: PretrainConfig,
    /// MIL training epochs (of each head).
    #[arg(long, default_value_t = 40)]
    pub mil_epochs: usize,
    /// Replace the output folder's previous results.
    #[arg(long)]
    pub force: bool,
}

impl Default for DemoConfig {
    /// The defaults of `slam demo` with no flags.
    fn default() -> Self {
        let command = Self::augment_args(clap::Command::new("demo"));
        let matches = command.get_matches_from(["demo"]);
        Self::from_arg_matches(&matches).expect("the demo's defaults parse")
    }
}

/// A pretraining variant of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    /// `None`: the network stays at its random initialization.
    pub pretrain: Option<(Objective, Surgery)>,
}

impl Variant {
    /// The variant that pretrains with `objective` and `surgery`.
    fn pretrained(objective: Objective, surgery: Surgery) -> Self {
        let name = match (objective, surgery) {
            (Objective::Simclr, _) => "simclr",
            (Objective::Slam, Surgery::None) => "slam-no-surgery",
            (Objective::Slam, Surgery::Ags) => "slam-ags",
            (Objective::Slam, Surgery::Pcgrad) => "slam-pcgrad",
        };
        Self {
            name,
            pretrain: Some((objective, surgery)),
        }
    }
}

/// One row of the results table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub variant: &'static str,
    /// The MIL head: "ABMIL" or "PAMIL".
    pub head: &'static str,
    pub pretrain_seconds: f64,
    pub f1: f64,
    pub accuracy: f64,
    pub auc: Option<f64>,
    pub retrieval_hits: Option<f64>,
    pub retrieval_fraction: Option<f64>,
}

/// A bar chart of one column of the results, one bar per variant.
struct Chart {
    file: &'static str,
    title: &'static str,
    axis: &'static str,
    value: fn(&Row) -> Option<f64>,
}

const CHARTS: [Chart; 2] = [
    Chart {
        file: "auc.png",
        title: "Bag classification: AUC on the test bags",
        axis: "AUC",
        value: |r| r.auc,
    },
    Chart {
        file: "retrieval.png",
        title: "Abnormal cells among the top-K attention scores (K = abnormal cells per bag)",
        axis: "share found",
        value: |r| r.retrieval_fraction,
    },
];

/// What a demo wrote, for the caller to show.
pub struct DemoResults {
    pub rows: Vec<Row>,
    /// The results table (markdown), as written to `results.md`.
    pub table: String,
    pub data: SynthDataset,
    pub seconds: f64,
}

/// What the demo tells its caller while it runs.
pub trait DemoObserver {
    /// A stage begins (a line for the user).
    fn stage(&mut self, message: &str);
    /// The observer of one variant's pretraining run.
    fn pretraining(&mut self, variant: &str) -> Box<dyn Observer>;
    /// A variant's test bags were evaluated (its reports are in `dir`).
    fn evaluated(&mut self, variant: &str, dir: &Path, evaluation: &Evaluation);
}

impl DemoConfig {
    /// The variants to run: the configured one, and with `compare` the paper's ablations
    /// (random init, SimCLR, SLAM without surgery, SLAM-AGS) before it.
    pub fn variants(&self) -> Vec<Variant> {
        let main = Variant::pretrained(self.pretrain.objective, self.pretrain.step.surgery);
        if !self.compare {
            return vec![main];
        }
        let mut variants = vec![
            Variant {
                name: "random-init",
                pretrain: None,
            },
            Variant::pretrained(Objective::Simclr, Surgery::None),
            Variant::pretrained(Objective::Slam, Surgery::None),
            Variant::pretrained(Objective::Slam, Surgery::Ags),
        ];
        if !variants.iter().any(|v| v.name == main.name) {
            variants.push(main);
        }
        variants
    }

    /// The bag plan, seeded with the demo's seed.
    fn plan(&self) -> BagPlanConfig {
        BagPlanConfig {
            seed: self.pretrain.seed,
            ..self.plan.clone()
        }
    }

    /// Runs the demo on `eng` (views rendered as `views` says), writing everything under
    /// `out`.
    pub fn run<E: Feed>(
        &self,
        eng: &E,
        views: &ViewSettings,
        observer: &mut dyn DemoObserver,
    ) -> Result<DemoResults> {
        let started = Instant::now();
        let out = &self.out;
        ensure!(
            self.force || !out.join("results.json").exists(),
            "{} already holds demo results; pass --force to run again there",
            out.display()
        );
        let plan = self.plan();
        plan.validate()?;
        let synth = SynthConfig {
            patch_size: self.patch_size,
            seed: self.pretrain.seed,
        };
        observer.stage(&format!(
            "synthesizing {} bags of {} cells ({} abnormal cells per abnormal bag) at {}x{} ...",
            plan.bags,
            plan.bag_size,
            plan.witnesses_per_bag(),
            self.patch_size,
            self.patch_size
        ));
        let data = write_dataset(&synth, &plan, &out.join("data"), false, &mut |_| {})?;
        let mut rows = Vec::new();
        for variant in self.variants() {
            observer.stage(&format!("== {}", variant.name));
            rows.extend(self.run_variant(eng, views, variant, &data, observer)?);
        }
        let table = self.render_table(&rows, &data);
        write_atomic(&out.join("results.md"), table.as_bytes())?;
        for chart in CHARTS {
            let bars: Vec<(String, f64)> = rows
                .iter()
                .map(|r| (self.row_label(r), (chart.value)(r).unwrap_or(0.0)))
                .collect();
            plots::bar_chart(&out.join(chart.file), chart.title, chart.axis, &bars)?;
        }
        let json = serde_json::json!({ "seed": self.pretrain.seed, "plan": plan, "rows": rows });
        write_atomic(
            &out.join("results.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        Ok(DemoResults {
            rows,
            table,
            data,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn run_variant<E: Feed>(
        &self,
        eng: &E,
        views: &ViewSettings,
        variant: Variant,
        data: &SynthDataset,
        observer: &mut dyn DemoObserver,
    ) -> Result<Vec<Row>> {
        let dir = self.out.join(variant.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config = PretrainConfig {
            store: data.paths.train.clone(),
            ..self.pretrain.clone()
        };
        let start = Instant::now();
        let state = match variant.pretrain {
            None => ModelState::init(config.net()?, config.seed)?,
            Some((objective, surgery)) => {
                let mut config = PretrainConfig {
                    objective,
                    ..config
                };
                config.step.surgery = surgery;
                let mut run = Run::create(eng, &dir.join("run"), config)?;
                run.train_fed(eng, views, &mut *observer.pretraining(variant.name))?
            }
        };
        let pretrain_seconds = start.elapsed().as_secs_f64();
        checkpoint::save(&dir.join("model.safetensors"), &state)?;

        let embed_store = |store: &Path, name: &str| -> Result<Embeddings> {
            let store = PatchStore::open(store)?;
            let crop = self.pretrain.crop;
            let e = embed::embed(
                eng,
                &state,
                &store,
                EmbedSettings {
                    kind: FeatureKind::Projector,
                    crop,
                    batch: 128,
                },
                |_, _| {},
            )?;
            e.save(&dir.join(name))?;
            Ok(e)
        };
        let train = embed_store(&data.paths.train, "train.embed.safetensors")?;
        let test = embed_store(&data.paths.test, "test.embed.safetensors")?;

        let bags = MilBag::from_embeddings(&train);
        let mut rows = Vec::new();
        for head in self.heads() {
            let (spec, mil_dir) = match head {
                Aggregator::Abmil => (
                    HeadSpec::Abmil {
                        hidden: 64,
                        attention: 32,
                    },
                    dir.join("mil"),
                ),
                Aggregator::Pamil => {
                    let (hidden, attention) = head.default_sizes();
                    let settings = PamilSettings::default();
                    let spec = HeadSpec::Pamil {
                        config: settings.config(train.dim, hidden, attention),
                        losses: settings.losses,
                        start: PamilStart::Fresh(ProtoInit::Normal),
                    };
                    (spec, dir.join("mil-pamil"))
                }
            };
            let mil_config = crate::mil::MilTrainConfig {
                epochs: self.mil_epochs,
                seed: self.pretrain.seed,
                ..head.train_defaults()
            };
            let trained = spec.train(&bags, train.dim, &mil_config, |_| {})?;
            std::fs::create_dir_all(&mil_dir)?;
            report::save_model(&mil_dir.join(report::MODEL_FILE), &trained.selected)?;
            let evaluation =
                report::evaluate(&mil_dir, &trained.selected, &test, data.witnesses_per_bag)?;
            observer.evaluated(variant.name, &mil_dir, &evaluation);
            let m = evaluation.metrics;
            rows.push(Row {
                variant: variant.name,
                head: head.name(),
                pretrain_seconds,
                f1: m.f1,
                accuracy: m.accuracy,
                auc: m.auc,
                retrieval_hits: evaluation.mean_hits(),
                retrieval_fraction: evaluation.mean_fraction(),
            });
        }
        Ok(rows)
    }

    /// The MIL heads each variant is evaluated with: ABMIL, and PAMIL beside it with
    /// `compare`.
    fn heads(&self) -> Vec<Aggregator> {
        if self.compare {
            vec![Aggregator::Abmil, Aggregator::Pamil]
        } else {
            vec![Aggregator::Abmil]
        }
    }

    /// A row's name in the charts: the variant, and its head when there are two.
    fn row_label(&self, r: &Row) -> String {
        if self.compare {
            format!("{} {}", r.variant, r.head)
        } else {
            r.variant.to_owned()
        }
    }

    fn render_table(&self, rows: &[Row], data: &SynthDataset) -> String {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "n/a".into(), f);
        let plan = &self.plan;
        let mut table = format!(
            "SLAM-AGS demo (seed {}): {} bags of {} synthetic cells, witness rate {}, \
             {}x{} patches, {} for {} epochs, test bags: {}\n\n",
            self.pretrain.seed,
            plan.bags,
            plan.bag_size,
            plan.witness_rate,
            self.patch_size,
            self.patch_size,
            network_label(&self.pretrain.net),
            self.pretrain.epochs,
            data.test.bags
        );
        table.push_str(
            "| variant | MIL head | pretrain s | bag F1 | accuracy | AUC | retrieval (top K) |\n",
        );
        table.push_str("|---|---|---:|---:|---:|---:|---:|\n");
        for r in rows {
            table.push_str(&format!(
                "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} |\n",
                r.variant,
                r.head,
                r.pretrain_seconds,
                r.f1,
                r.accuracy,
                opt(r.auc, &|a| format!("{a:.3}")),
                opt(r.retrieval_fraction, &|f| format!("{:.1}%", 100.0 * f)),
            ));
        }
        table
    }
}

/// The network as the results table names it, e.g. "ResNet-10 width 16".
fn network_label(spec: &NetSpec) -> String {
    let Ok(net) = spec.resolve() else {
        return spec.arch.clone();
    };
    let name = match spec.arch.as_str() {
        "resnet10" => "ResNet-10",
        "resnet18" => "ResNet-18",
        "resnet34" => "ResNet-34",
        other => other,
    };
    match &spec.blocks {
        Some(_) => format!("{name} width {} blocks {:?}", net.width, net.blocks),
        None => format!("{name} width {}", net.width),
    }
}
