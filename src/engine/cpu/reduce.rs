//! Sums in f64 that the compiler can vectorize: `LANES` independent accumulators (f64
//! addition is not associative, so one accumulator would serialize the loop), combined in a
//! fixed order that depends only on the length.

const LANES: usize = 8;

/// `sum_i f(a[i], b[i])` for `N` quantities at once, in f64.
#[inline]
pub(crate) fn sum_pairs<const N: usize>(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f64, f64) -> [f64; N],
) -> [f64; N] {
    assert_eq!(a.len(), b.len(), "summed slices differ in length");
    let mut acc = [[0.0f64; LANES]; N];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            let v = f(x[l] as f64, y[l] as f64);
            for k in 0..N {
                acc[k][l] += v[k];
            }
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        let v = f(x as f64, y as f64);
        for k in 0..N {
            acc[k][l] += v[k];
        }
    }
    acc.map(|lanes| lanes.iter().sum())
}
