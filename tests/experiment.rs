//! The experiment's bookkeeping: variant names, the statistics of its summary (hand-computed),
//! the pairing of runs by seed, and the MIL heads in its settings and tables. (The whole
//! pipeline runs in tests/cli.rs.)

use std::collections::BTreeMap;
use std::path::Path;

use slam_ags::mil::Aggregator;
use slam_ags::pipeline::demo::DemoConfig;
use slam_ags::pipeline::experiment::{
    ExperimentConfig, RunResult, Stat, Variant, render_markdown, summarize, write_charts,
};

#[test]
fn variants_parse_and_print_as_their_names() {
    for name in [
        "random-init",
        "simclr",
        "weak",
        "slam-ags",
        "slam-pcgrad",
        "slam-none",
        "slam-ags@0.1",
        "slam-none@0.03",
    ] {
        let v: Variant = name.parse().unwrap();
        assert_eq!(v.to_string(), name);
    }
    for (bad, needle) in [
        ("slam", "unknown variant"),
        ("weak@0.5", "only the slam variants"),
        ("slam-ags@-1", "must be a number >= 0"),
        ("slam-ags@x", "must be a number >= 0"),
    ] {
        let err = bad.parse::<Variant>().unwrap_err().to_string();
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn stat_by_hand() {
    let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!((s.n, s.mean), (4, 2.5));
    let sd = (5.0f64 / 3.0).sqrt();
    assert!((s.sd - sd).abs() < 1e-12);
    // t(0.975, 3) = 3.182.
    assert!((s.ci95 - 3.182 * sd / 2.0).abs() < 1e-12);
    let one = Stat::of(&[0.7]).unwrap();
    assert_eq!((one.sd, one.ci95), (0.0, 0.0));
    assert_eq!(Stat::of(&[]), None);
}

fn result(variant: &str, seed: u64, auroc: f64) -> RunResult {
    RunResult {
        witness_rate: 0.1,
        seed,
        variant: variant.into(),
        pretrain_seconds: 1.0,
        collapse_warnings: (variant == "slam-ags" && seed == 0) as usize,
        metrics: BTreeMap::from([("h.knn_auroc".to_owned(), auroc)]),
    }
}

/// Differences pair runs by seed: a seed one variant lacks is left out of its pairs.
#[test]
fn comparisons_pair_runs_by_seed() {
    let runs = vec![
        result("simclr", 0, 0.60),
        result("simclr", 1, 0.70),
        result("simclr", 2, 0.65),
        result("slam-ags", 0, 0.62),
        result("slam-ags", 1, 0.69),
        result("slam-ags", 2, 0.70),
        result("weak", 0, 0.80),
        result("weak", 2, 0.75),
    ];
    let variants: Vec<Variant> = ["simclr", "slam-ags", "weak"]
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let summary = summarize(&runs, &variants, &[0.1]);
    let rate = &summary.rates[0];
    let ags = &rate.variants[1];
    assert_eq!(
        (ags.variant.as_str(), ags.runs, ags.collapsed_runs),
        ("slam-ags", 3, 1)
    );
    let mean = ags.metrics["h.knn_auroc"].mean;
    assert!((mean - 0.67).abs() < 1e-12);
    let against = |v: &str| {
        rate.comparisons
            .iter()
            .find(|c| c.variant == v && c.baseline == "simclr" && c.metric == "h.knn_auroc")
            .unwrap()
    };
    let ags = against("slam-ags");
    // Differences +0.02, -0.01, +0.05.
    assert_eq!((ags.difference.n, ags.wins), (3, 2));
    assert!((ags.difference.mean - 0.02).abs() < 1e-12);
    let weak = against("weak");
    // Seeds 0 and 2 only: +0.20, +0.10.
    assert_eq!((weak.difference.n, weak.wins), (2, 2));
    assert!((weak.difference.mean - 0.15).abs() < 1e-12);
    // No baseline is compared with itself, and random init did not run.
    assert!(rate.comparisons.iter().all(|c| c.variant != c.baseline));
    assert!(rate.comparisons.iter().all(|c| c.baseline == "simclr"));
}

/// `slam experiment` trains ABMIL alone unless told (so that an experiment begun before PAMIL
/// was added resumes with the same settings); the demo trains both heads, PAMIL for fewer
/// epochs than the reference's 100.
#[test]
fn the_demo_trains_both_mil_heads_and_experiments_abmil_unless_told() {
    let experiment = ExperimentConfig::with_defaults(Path::new("out"), "simclr");
    assert_eq!(experiment.mil_heads, [Aggregator::Abmil]);
    assert_eq!(experiment.pamil_epochs, 100);
    for compare in [false, true] {
        let demo = DemoConfig {
            compare,
            ..DemoConfig::default()
        }
        .experiment()
        .unwrap();
        assert_eq!(demo.mil_heads, [Aggregator::Abmil, Aggregator::Pamil]);
        assert!(demo.pamil_epochs < 100, "{}", demo.pamil_epochs);
    }
    let twice = ExperimentConfig {
        mil_heads: vec![Aggregator::Pamil, Aggregator::Abmil, Aggregator::Pamil],
        ..experiment
    };
    let err = twice.validate().unwrap_err().to_string();
    assert!(err.contains("--mil-heads names PAMIL twice"), "{err}");
}

/// A run with both heads: ABMIL's figures under `bag.*`, PAMIL's under `pamil.*`.
fn run_with_heads(variant: &str, seed: u64, abmil_auc: f64, pamil_auc: Option<f64>) -> RunResult {
    let mut run = result(variant, seed, 0.6);
    run.metrics.insert("bag.auc".into(), abmil_auc);
    run.metrics.insert("bag.f1".into(), 0.5);
    if let Some(auc) = pamil_auc {
        run.metrics.insert("pamil.auc".into(), auc);
        run.metrics.insert("pamil.f1".into(), 0.25);
    }
    run
}

/// The tables show PAMIL's columns beside ABMIL's, in the variants' table and the paired
/// differences, and chart them, when the runs measured them; and leave them out when not.
#[test]
fn the_report_shows_both_mil_heads_side_by_side() {
    let variants: Vec<Variant> = ["simclr", "slam-ags"]
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let config = ExperimentConfig {
        mil_heads: vec![Aggregator::Abmil, Aggregator::Pamil],
        ..ExperimentConfig::with_defaults(Path::new("out"), "simclr,slam-ags")
    };
    let runs: Vec<RunResult> = (0..3)
        .flat_map(|seed| {
            [
                run_with_heads("simclr", seed, 0.5, Some(0.625)),
                run_with_heads("slam-ags", seed, 0.75, Some(0.8 + 0.05 * seed as f64)),
            ]
        })
        .collect();
    let summary = summarize(&runs, &variants, &[0.1]);
    let md = render_markdown(&config, &summary);
    let header = md
        .lines()
        .find(|l| l.starts_with("| variant | runs |"))
        .unwrap();
    for column in [
        "bag AUC ABMIL",
        "bag F1 ABMIL",
        "bag AUC PAMIL",
        "bag F1 PAMIL",
    ] {
        assert!(header.contains(column), "{column}: {header}");
    }
    // slam-ags: ABMIL 0.750, then PAMIL's mean 0.85 with sd 0.05, F1 0.250.
    let row = md
        .lines()
        .find(|l| l.starts_with("| slam-ags | 3 |"))
        .unwrap();
    assert!(
        row.ends_with("| 0.750 ± 0.000 | 0.500 ± 0.000 | 0.850 ± 0.050 | 0.250 ± 0.000 |"),
        "{row}"
    );
    // Against SimCLR, seed by seed: ABMIL +0.25, PAMIL +0.175, +0.225, +0.275.
    let paired = md
        .lines()
        .skip_while(|l| !l.starts_with("Paired differences against simclr"))
        .find(|l| l.starts_with("| slam-ags |"))
        .unwrap();
    assert!(
        paired.contains("+0.250") && paired.contains("+0.225 ["),
        "{paired}"
    );
    assert!(
        md.contains("PAMIL at the reference's defaults for 100 epochs"),
        "{md}"
    );
    let dir = tempfile::tempdir().unwrap();
    write_charts(dir.path(), &summary).unwrap();
    for chart in ["bag_auc_w0.1.png", "pamil_auc_w0.1.png"] {
        assert!(dir.path().join(chart).exists(), "{chart}");
    }

    // Runs of ABMIL alone (an experiment begun before PAMIL was added): no PAMIL column.
    let abmil_only: Vec<RunResult> = (0..3)
        .map(|seed| run_with_heads("slam-ags", seed, 0.75, None))
        .collect();
    let md = render_markdown(
        &ExperimentConfig::with_defaults(Path::new("out"), "slam-ags"),
        &summarize(&abmil_only, &variants[1..], &[0.1]),
    );
    assert!(
        md.contains("bag AUC ABMIL") && !md.contains("PAMIL"),
        "{md}"
    );
}
