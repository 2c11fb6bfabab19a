//! k-means of instance features (k-means++ seeding, then Lloyd's iterations): PAMIL's
//! prototypes as its authors start them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Lloyd's iterations stop after this many even if assignments still change.
const MAX_ITERATIONS: usize = 100;

fn distance2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| (a - b) * (a - b)).sum()
}

/// The `k` centres (`k x dim`, row-major) of the rows of `points` (`n x dim`, n >= 1),
/// seeded by k-means++ from ChaCha8 with `seed`. A cluster that empties keeps its centre.
pub fn kmeans(points: &[f64], dim: usize, k: usize, seed: u64) -> Vec<f64> {
    let n = points.len() / dim;
    assert!(n >= 1 && k >= 1, "k-means of {n} points into {k} clusters");
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // k-means++: each next centre drawn with probability proportional to the squared
    // distance to the nearest centre so far (uniformly when every point is on a centre).
    let mut centres = row(rng.random_range(0..n)).to_vec();
    let mut nearest: Vec<f64> = (0..n).map(|i| distance2(row(i), &centres)).collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut target = rng.random_range(0.0..total);
            nearest
                .iter()
                .position(|&d| {
                    target -= d;
                    target < 0.0
                })
                .unwrap_or(n - 1)
        } else {
            rng.random_range(0..n)
        };
        let centre = row(pick).to_vec();
        for (i, d) in nearest.iter_mut().enumerate() {
            *d = d.min(distance2(row(i), &centre));
        }
        centres.extend(centre);
    }
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..MAX_ITERATIONS {
        let mut changed = false;
        for (i, a) in assignment.iter_mut().enumerate() {
            let best = (0..k)
                .map(|c| distance2(row(i), &centres[c * dim..(c + 1) * dim]))
                .enumerate()
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .map_or(0, |(c, _)| c);
            changed |= *a != best;
            *a = best;
        }
        if !changed {
            break;
        }
        let mut sums = vec![0.0; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &c) in assignment.iter().enumerate() {
            counts[c] += 1;
            sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(row(i))
                .for_each(|(s, v)| *s += v);
        }
        for c in (0..k).filter(|&c| counts[c] > 0) {
            for (centre, s) in centres[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(&sums[c * dim..(c + 1) * dim])
            {
                *centre = s / counts[c] as f64;
            }
        }
    }
    centres
}
