//! Bag-level classification metrics (abnormal is the positive class) and positive-cell
//! retrieval from attention scores.

/// Bag classification figures at probability threshold 0.5.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct BagMetrics {
    pub bags: usize,
    pub accuracy: f64,
    /// F1 of the abnormal class; 0 when no bag is predicted or labelled abnormal.
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    /// Area under the ROC curve; `None` unless both labels occur.
    pub auc: Option<f64>,
}

/// Metrics of `probabilities` (of being abnormal) against `labels` (true: abnormal).
pub fn bag_metrics(probabilities: &[f64], labels: &[bool]) -> BagMetrics {
    assert_eq!(probabilities.len(), labels.len());
    let predicted: Vec<bool> = probabilities.iter().map(|&p| p >= 0.5).collect();
    let count = |want_pred: bool, want_label: bool| {
        predicted
            .iter()
            .zip(labels)
            .filter(|&(&p, &l)| p == want_pred && l == want_label)
            .count() as f64
    };
    let (tp, fp, fn_, tn) = (
        count(true, true),
        count(true, false),
        count(false, true),
        count(false, false),
    );
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    BagMetrics {
        bags: labels.len(),
        accuracy: ratio(tp + tn, labels.len() as f64),
        f1: ratio(2.0 * tp, 2.0 * tp + fp + fn_),
        precision,
        recall,
        auc: auc(probabilities, labels),
    }
}

/// ROC AUC as the Mann-Whitney statistic: the probability that a random abnormal bag scores
/// above a random normal one, ties counting one half (average ranks).
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // Ranks start..end (1-based: start+1 ..= end) share their average.
        let average = (start + end + 1) as f64 / 2.0;
        rank_sum += average * order[start..end].iter().filter(|&&i| labels[i]).count() as f64;
        start = end;
    }
    let u = rank_sum - (positives * (positives + 1)) as f64 / 2.0;
    Some(u / (positives * negatives) as f64)
}

/// How many truly abnormal cells are among a bag's top-K attention scores.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Retrieval {
    /// K actually used: the requested K capped by the bag size.
    pub k: usize,
    pub hits: usize,
    /// Abnormal cells in the bag.
    pub positives: usize,
}

impl Retrieval {
    /// Hits as a share of the bag's abnormal cells (1 when it has none).
    pub fn fraction(&self) -> f64 {
        if self.positives == 0 {
            1.0
        } else {
            self.hits as f64 / self.positives as f64
        }
    }
}

/// Retrieval for one bag: `scores` per instance (higher is more attended), `truth` per
/// instance (true: abnormal cell). Ties keep the earlier instance first.
pub fn retrieval(scores: &[f64], truth: &[bool], k: usize) -> Retrieval {
    assert_eq!(scores.len(), truth.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let k = k.min(scores.len());
    Retrieval {
        k,
        hits: order[..k].iter().filter(|&&i| truth[i]).count(),
        positives: truth.iter().filter(|&&t| t).count(),
    }
}
