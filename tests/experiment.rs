//! The experiment's bookkeeping: variant names, the statistics of its summary (hand-computed)
//! and the pairing of runs by seed. (The whole pipeline runs in tests/cli.rs.)

use std::collections::BTreeMap;

use slam_ags::pipeline::experiment::{RunResult, Stat, Variant, summarize};

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
