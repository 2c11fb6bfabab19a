//! Instance-level evaluation (`slam_ags::eval`) against cases computed by hand: AUROC with
//! ties, the anomaly scores, top-K retrieval with ties at the cut, the spread, the linear
//! probe's optimality, and the refusals of unusable embeddings.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::{Bag, BagLabel};
use slam_ags::embed::{Embeddings, FeatureKind};
use slam_ags::eval::{
    InstanceEvalConfig, LogisticProbe, centroid_scores, evaluate, knn_scores, spread, top_k_hits,
};
use slam_ags::mil::metrics::auc;

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-12, "{what}: {a} vs {b}");
}

#[test]
fn auroc_counts_ties_as_half() {
    // Positives 0.4 and 0.8 against negatives 0.1 and 0.4: 1 + 0.5 + 1 + 1 of 4 pairs.
    let got = auc(&[0.1, 0.4, 0.4, 0.8], &[false, true, false, true]).unwrap();
    close(got, 3.5 / 4.0, "auroc");
    // Everything tied: chance.
    close(
        auc(&[2.0; 6], &[true, false, true, false, false, false]).unwrap(),
        0.5,
        "all tied",
    );
    assert_eq!(auc(&[1.0, 2.0], &[true, true]), None);
}

#[test]
fn anomaly_scores_by_hand() {
    let s = std::f64::consts::FRAC_1_SQRT_2;
    // Reference (1,0), (0,1), (2,2); their mean (1, 1) points along (1,1)/sqrt 2.
    let reference = [1.0f32, 0.0, 0.0, 1.0, 2.0, 2.0];
    let test = [1.0f32, 0.0, 3.0, 3.0];
    let centroid = centroid_scores(&reference, &test, 2);
    close(centroid[0], 1.0 - s, "centroid, (1,0)");
    close(centroid[1], 0.0, "centroid, (3,3)");
    // (1,0) has similarities 1, 0, 1/sqrt 2; (3,3) has 1/sqrt 2, 1/sqrt 2, 1.
    let knn1 = knn_scores(&reference, &test, 2, 1);
    close(knn1[0], 0.0, "k=1, (1,0)");
    close(knn1[1], 0.0, "k=1, (3,3)");
    let knn2 = knn_scores(&reference, &test, 2, 2);
    close(knn2[0], 1.0 - (1.0 + s) / 2.0, "k=2, (1,0)");
    close(knn2[1], 1.0 - (1.0 + s) / 2.0, "k=2, (3,3)");
    // k beyond the reference: all of it.
    let knn9 = knn_scores(&reference, &test, 2, 9);
    close(knn9[0], 1.0 - (1.0 + s) / 3.0, "k=9, (1,0)");
    close(knn9[1], 1.0 - (1.0 + 2.0 * s) / 3.0, "k=9, (3,3)");
}

#[test]
fn knn_scores_match_brute_force_across_blocks() {
    // More test rows than one block of the similarity matrix.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let dim = 5;
    let reference: Vec<f32> = (0..40 * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let test: Vec<f32> = (0..1100 * dim)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let got = knn_scores(&reference, &test, dim, 3);
    let unit = |r: &[f32]| -> Vec<f64> {
        let n = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        r.iter().map(|&v| v as f64 / n).collect()
    };
    for (t, score) in test.chunks_exact(dim).zip(&got) {
        let t = unit(t);
        let mut sims: Vec<f64> = reference
            .chunks_exact(dim)
            .map(|r| unit(r).iter().zip(&t).map(|(a, b)| a * b).sum())
            .collect();
        sims.sort_by(|a, b| b.total_cmp(a));
        let want = 1.0 - sims[..3].iter().sum::<f64>() / 3.0;
        assert!((score - want).abs() < 1e-12, "{score} vs {want}");
    }
}

#[test]
fn top_k_shares_ties_at_the_cut() {
    let truth = [false, false, true, true];
    // 0.9 is in; 0.5 is tied between an abnormal and a normal cell for the last place.
    let got = top_k_hits(&[0.9, 0.5, 0.5, 0.1], &truth, 2);
    close(got.hits, 0.5, "hits");
    close(got.precision, 0.25, "precision");
    close(got.recall, 0.25, "recall");
    // The order of the tied cells cannot matter.
    let swapped = top_k_hits(&[0.9, 0.5, 0.5, 0.1], &[false, true, false, true], 2);
    assert_eq!(got, swapped);
    // A perfect ranking retrieves every abnormal cell; a constant score gets the base rate.
    let perfect = top_k_hits(&[0.1, 0.2, 0.8, 0.9], &truth, 2);
    close(perfect.recall, 1.0, "perfect recall");
    close(top_k_hits(&[1.0; 4], &truth, 2).hits, 1.0, "all tied");
    // K beyond the cells is capped.
    assert_eq!(top_k_hits(&[0.1, 0.2, 0.8, 0.9], &truth, 10).k, 4);
}

#[test]
fn spread_by_hand() {
    // Unit rows (1,0), (0,1), (1,0): pair cosines 0, 1, 0; each dimension's values have
    // standard deviation sqrt(2)/3.
    let got = spread(&[1.0, 0.0, 0.0, 5.0, 2.0, 0.0], 2);
    close(got.mean_pairwise_cosine, 1.0 / 3.0, "mean pairwise cosine");
    close(
        got.per_dim_std,
        2f64.sqrt() / 3.0 * 2f64.sqrt(),
        "per-dimension std",
    );
    // Collapsed: every row the same direction.
    let collapsed = spread(&[1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 2);
    close(collapsed.mean_pairwise_cosine, 1.0, "collapsed cosine");
    close(collapsed.per_dim_std, 0.0, "collapsed std");
}

/// At the probe's optimum the penalized objective's gradient vanishes:
/// `sum_i (p_i - y_i) x_i + l2 w = 0` (standardized x, unpenalized bias).
#[test]
fn probe_reaches_the_optimum_and_separates() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dim = 6;
    let n = 400;
    let labels: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let rows: Vec<f32> = labels
        .iter()
        .flat_map(|&l| {
            let shift = if l { 0.8 } else { 0.0 };
            (0..dim)
                .map(|d| rng.random_range(-1.0..1.0f32) + if d < 2 { shift } else { 0.0 } + 3.0)
                .collect::<Vec<_>>()
        })
        .collect();
    let l2 = 0.5;
    let probe = LogisticProbe::fit(&rows, dim, &labels, l2).unwrap();
    let logits = probe.scores(&rows);
    let mut grad = vec![0.0f64; dim + 1];
    for ((row, f), &y) in rows.chunks_exact(dim).zip(&logits).zip(&labels) {
        let r = 1.0 / (1.0 + (-f).exp()) - y as u8 as f64;
        for d in 0..dim {
            grad[d] += r * (row[d] as f64 - probe.mean[d]) / probe.std[d];
        }
        grad[dim] += r;
    }
    for (g, w) in grad.iter_mut().zip(&probe.weights) {
        *g += l2 * w;
    }
    for (d, g) in grad.iter().enumerate() {
        assert!(g.abs() < 1e-8, "gradient {d} is {g} at the fitted probe");
    }
    // The informative dimensions carry the weight, and the probe ranks well.
    assert!(
        probe.weights[0] > 0.5 && probe.weights[1] > 0.5,
        "{:?}",
        probe.weights
    );
    assert!(auc(&logits, &labels).unwrap() > 0.8);
}

/// A cell: its features and instance truth.
type Cell = (Vec<f32>, Option<bool>);

/// Embeddings of `cells` per bag: `(bag label, [cell])`.
fn embeddings(kind: FeatureKind, dim: usize, bags: &[(BagLabel, Vec<Cell>)]) -> Embeddings {
    let mut e = Embeddings {
        kind,
        dim,
        features: Vec::new(),
        bags: Vec::new(),
        instances: Vec::new(),
        sources: Vec::new(),
    };
    for (b, (label, cells)) in bags.iter().enumerate() {
        let start = e.instances.len();
        for (row, truth) in cells {
            e.features.extend_from_slice(row);
            e.instances.push(*truth);
            e.sources.push(format!("bag{b}/{}", e.instances.len()));
        }
        e.bags.push(Bag {
            name: format!("bag{b}"),
            label: *label,
            patches: start..e.instances.len(),
        });
    }
    e
}

#[test]
fn evaluation_of_a_separable_case_and_refusals() {
    let normal = |x: f32| (vec![1.0, x], Some(false));
    let abnormal = |x: f32| (vec![x, 1.0], Some(true));
    let train = embeddings(
        FeatureKind::Encoder,
        2,
        &[
            (
                BagLabel::Normal,
                vec![normal(0.0), normal(0.1), normal(0.2)],
            ),
            (
                BagLabel::Abnormal,
                vec![normal(0.05), abnormal(0.0), abnormal(0.1)],
            ),
        ],
    );
    let test = embeddings(
        FeatureKind::Encoder,
        2,
        &[(
            BagLabel::Abnormal,
            vec![
                normal(0.15),
                abnormal(0.05),
                normal(0.02),
                abnormal(0.2),
                (vec![1.0, 1.0], None),
            ],
        )],
    );
    let config = InstanceEvalConfig::default();
    let report = evaluate(&train, &test, &config).unwrap();
    assert_eq!((report.test_cells, report.test_abnormal), (4, 2));
    assert_eq!((report.reference_cells, report.probe_cells), (3, 6));
    close(report.centroid_auroc, 1.0, "centroid auroc");
    close(report.knn_auroc, 1.0, "knn auroc");
    close(report.probe_auroc.unwrap(), 1.0, "probe auroc");
    close(report.retrieval.recall, 1.0, "retrieval");
    assert_eq!(report.retrieval.k, 2);

    // Training cells without truth: no probe, the rest still measured.
    let mut blind = train.clone();
    blind.instances.iter_mut().for_each(|t| *t = None);
    let report = evaluate(&blind, &test, &config).unwrap();
    assert_eq!((report.probe_auroc, report.probe_cells), (None, 0));

    let refuse = |train: &Embeddings, test: &Embeddings, want: &str| {
        let err = evaluate(train, test, &config).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    };
    let mut projector = test.clone();
    projector.kind = FeatureKind::Projector;
    refuse(&train, &projector, "same model and --features");
    let mut no_truth = test.clone();
    no_truth.instances.iter_mut().for_each(|t| *t = None);
    refuse(&train, &no_truth, "known truth of both kinds");
    let mut no_normal_bags = train.clone();
    no_normal_bags
        .bags
        .iter_mut()
        .for_each(|b| b.label = BagLabel::Abnormal);
    refuse(&no_normal_bags, &test, "no cells of normal bags");
}
