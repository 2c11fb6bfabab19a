//! The two task losses in f64, written from their definitions over every ordered pair of rows
//! (no algebra, no shortcuts): what the engines' losses and their gradients are held to.

/// Samples as rows of their embedding.
pub type Rows = Vec<Vec<f64>>;

pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

pub fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// Each row divided by `max(|row|, 1e-12)`, as `F.normalize`.
pub fn normalized(rows: &Rows) -> Rows {
    rows.iter()
        .map(|r| {
            let s = norm(r).max(1e-12);
            r.iter().map(|v| v / s).collect()
        })
        .collect()
}

/// The `2n` rows `[z_i; z_j]` of two feature-major `[dim, n]` views.
pub fn rows_of_views(z_i: &[f64], z_j: &[f64], n: usize) -> Rows {
    let dim = z_i.len() / n;
    (0..2 * n)
        .map(|a| {
            let (z, col) = if a < n { (z_i, a) } else { (z_j, a - n) };
            (0..dim).map(|k| z[k * n + col]).collect()
        })
        .collect()
}

/// Cohesion over every ordered pair of the `m` rows: `(1 - mean_{a != b} f_a . f_b) / T`.
pub fn cohesion(rows: &Rows, t: f64) -> f64 {
    let f = normalized(rows);
    let m = f.len();
    let mut sum = 0.0;
    for a in 0..m {
        for b in (0..m).filter(|&b| b != a) {
            sum += dot(&f[a], &f[b]);
        }
    }
    (1.0 - sum / (m * (m - 1)) as f64) / t
}

/// NT-Xent over every anchor `a` of the `m = 2n` rows, its partner `p = a +- n`:
/// `-mean_a [S[a,p] - ln sum_{b != a} exp S[a,b]]` with `S = f f^T / T`.
pub fn ntxent(rows: &Rows, t: f64) -> f64 {
    let f = normalized(rows);
    let m = f.len();
    let n = m / 2;
    let mut total = 0.0;
    for a in 0..m {
        let p = (a + n) % m;
        let denom: f64 = (0..m)
            .filter(|&b| b != a)
            .map(|b| (dot(&f[a], &f[b]) / t).exp())
            .sum();
        total += dot(&f[a], &f[p]) / t - denom.ln();
    }
    -total / m as f64
}
