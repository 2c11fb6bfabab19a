//! The error metrics the tests compare results with, each named for what it measures.

/// `|got - want| / |want|`, the norms over all values (in f64).
pub fn rel_l2_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// The largest `|got - want|` over the largest `|want|`.
pub fn max_error_over_peak(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let peak = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / peak
}

/// The largest `|got - want|` over `max(1, largest |want|)`; NaN anywhere (a value never
/// written) is infinite.
pub fn max_error_over_peak_or_one(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let scale = want.iter().fold(1f64, |m, w| m.max(w.abs()));
    got.iter().zip(want).fold(0.0, |m, (g, w)| {
        let d = (g - w).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d / scale)
        }
    })
}

/// The largest `|got - want|` of feature-major `[dim, n]` values, each column relative to that
/// column's largest `|want|` (columns differ in scale by orders of magnitude where a norm floor
/// is active). NaN anywhere gives NaN.
pub fn max_error_per_column(got: &[f64], want: &[f64], n: usize) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let mut worst = 0.0f64;
    for a in 0..n {
        let column = |v: &[f64]| v.iter().skip(a).step_by(n).copied().collect::<Vec<_>>();
        let (g, w) = (column(got), column(want));
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        for (x, y) in g.iter().zip(&w) {
            let e = (x - y).abs() / scale;
            if e.is_nan() {
                return f64::NAN;
            }
            worst = worst.max(e);
        }
    }
    worst
}

/// The largest `|got - want|` over the mean `|want|`.
pub fn max_error_over_mean_magnitude(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let scale = want.iter().map(|v| v.abs()).sum::<f64>() / want.len() as f64;
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    diff / scale
}

/// How many values differ in their bits, and the largest difference in units in the last
/// place (0 and 0 means bit-identical).
pub fn ulp_difference(got: &[f32], want: &[f32]) -> (usize, u32) {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let mut count = 0;
    let mut max = 0;
    for (&a, &b) in got.iter().zip(want) {
        if a.to_bits() != b.to_bits() {
            count += 1;
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
            max = max.max(u32::try_from(ulps).unwrap_or(u32::MAX));
        }
    }
    (count, max)
}
