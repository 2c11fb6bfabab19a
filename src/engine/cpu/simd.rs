//! The CPU engine's hand-written AVX-512 micro-kernels, for the direct convolutions
//! (`conv3x3.rs`, `stem.rs`). Callers check [`available`] first; off x86-64, or without
//! AVX-512F, nothing here runs.
//!
//! Both kernels keep a whole tile of sums in registers (20 to 27 of the 32): the output
//! kernel a tile of output channels x pixels over a reduction along input channels and
//! taps, the weight-gradient kernel a tile of output channels x taps over a reduction along
//! pixels.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Taps of a 3x3 kernel, `t = 3 ky + kx`.
pub(super) const TAPS_3X3: usize = 9;
/// Output channels per weight-gradient tile: with up to nine taps, 27 sums in registers.
pub(super) const GRAD_ROWS: usize = 3;
/// The sums a weight-gradient tile holds at most.
const GRAD_SUMS: usize = 27;

/// Whether this CPU runs the kernels (AVX-512F).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Distances, in values, between the rows [`output_tile`] reads and writes.
pub(super) struct Strides {
    /// Between input channels.
    pub x: usize,
    /// Between output rows (channels).
    pub y: usize,
    /// Of each tap from its output pixel.
    pub offsets: [isize; TAPS_3X3],
}

/// How [`weight_tiles`] walks the pixels: `rows` rows of `vectors` 16-pixel vectors, row `i`
/// starting `i * dy_row` values into the output gradient and `i * x_row` into the input.
pub(super) struct Walk<const TAPS: usize> {
    /// Between the output-gradient rows of consecutive output channels.
    pub dy_channel: usize,
    /// Of each tap in the input, from a pixel's position there.
    pub offsets: [isize; TAPS],
    pub rows: usize,
    pub vectors: usize,
    pub dy_row: usize,
    pub x_row: usize,
}

/// One `MR x NV*16` output tile: `y[r * s.y + p] (+)= sum_{ci, t} w[(ci * 9 + t) * MR + r]
/// x[ci * s.x + p + s.offsets[t]]`, added to what `y` holds when `accumulate`.
///
/// # Safety
/// [`available`]; every read and write named above is inside its buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn output_tile<const MR: usize, const NV: usize>(
    x: *const f32,
    s: &Strides,
    cin: usize,
    w: *const f32,
    y: *mut f32,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (v, a) in acc.iter_mut().enumerate() {
                // SAFETY: inside `y` by the caller's promise.
                *a = unsafe { _mm512_loadu_ps(y.add(r * s.y + 16 * v)) };
            }
        }
    }
    for ci in 0..cin {
        // SAFETY: inside the buffers by the caller's promise.
        unsafe {
            let x_c = x.add(ci * s.x);
            let w_c = w.add(ci * TAPS_3X3 * MR);
            for (t, &offset) in s.offsets.iter().enumerate() {
                let x_t = x_c.offset(offset);
                let xs: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(x_t.add(16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w_c.add(t * MR + r));
                    for (a, &xv) in acc.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(wv, xv, *a);
                    }
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            // SAFETY: inside `y` by the caller's promise.
            unsafe { _mm512_storeu_ps(y.add(r * s.y + 16 * v), a) };
        }
    }
}

/// Partial weight gradients of `ROWS` output channels and one input channel over the
/// walk's pixels: `sums[r * TAPS + t] += sum_p dy[r * w.dy_channel + p] x[p +
/// w.offsets[t]]`. `ROWS` and `TAPS` are constants so that the sums stay in registers.
///
/// # Safety
/// [`available`]; every read named above is inside its buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_tile_of<const ROWS: usize, const TAPS: usize>(
    dy: *const f32,
    x: *const f32,
    w: &Walk<TAPS>,
    sums: &mut [f32],
) {
    const { assert!(ROWS <= GRAD_ROWS && ROWS * TAPS <= GRAD_SUMS) };
    // Sums `r * TAPS + t`, in one flat array: LLVM keeps that in registers, where an array
    // of arrays made it shuffle registers around the loop.
    let mut acc = [_mm512_setzero_ps(); GRAD_SUMS];
    for row in 0..w.rows {
        // SAFETY: inside the buffers by the caller's promise.
        unsafe {
            let (dy, x) = (dy.add(row * w.dy_row), x.add(row * w.x_row));
            for v in 0..w.vectors {
                let mut dys = [_mm512_setzero_ps(); GRAD_ROWS];
                for (r, d) in dys.iter_mut().enumerate().take(ROWS) {
                    *d = _mm512_loadu_ps(dy.add(r * w.dy_channel + 16 * v));
                }
                for t in 0..TAPS {
                    let xv = _mm512_loadu_ps(x.offset(w.offsets[t]).add(16 * v));
                    for r in 0..ROWS {
                        acc[r * TAPS + t] = _mm512_fmadd_ps(dys[r], xv, acc[r * TAPS + t]);
                    }
                }
            }
        }
    }
    for (i, sum) in sums.iter_mut().enumerate().take(ROWS * TAPS) {
        *sum += _mm512_reduce_add_ps(acc[i]);
    }
}

/// [`weight_tile_of`] over output channels `channels`, in tiles of up to [`GRAD_ROWS`]:
/// `sums[co * TAPS + t] += sum_p dy[co * w.dy_channel + p] x[p + w.offsets[t]]`, `dy` and
/// `x` read from the starts of their slices, `sums` one input unit's `[cout, TAPS]`.
///
/// # Safety
/// As for [`weight_tile_of`], for every channel in `channels`.
pub(super) unsafe fn weight_tiles<const TAPS: usize>(
    channels: std::ops::Range<usize>,
    (dy, x): (&[f32], &[f32]),
    w: &Walk<TAPS>,
    sums: &mut [f32],
) {
    for co0 in channels.clone().step_by(GRAD_ROWS) {
        let rows = GRAD_ROWS.min(channels.end - co0);
        let dy = dy[co0 * w.dy_channel..].as_ptr();
        let sums = &mut sums[co0 * TAPS..][..rows * TAPS];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: passed on to the caller.
        unsafe {
            match rows {
                GRAD_ROWS => weight_tile_of::<GRAD_ROWS, TAPS>(dy, x.as_ptr(), w, sums),
                2 => weight_tile_of::<2, TAPS>(dy, x.as_ptr(), w, sums),
                _ => weight_tile_of::<1, TAPS>(dy, x.as_ptr(), w, sums),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no AVX-512 kernels off x86-64 ({rows}, {dy:?}, {}, {})",
            x.len(),
            sums.len()
        )
    }
}

/// `dw[co, u, t] += sums[u, co, t]`: the per-unit partial sums of a weight gradient (a unit
/// being what one thread reduced: an input channel, or an input channel and kernel row)
/// added into the `[cout, units, taps]` gradient.
pub(super) fn add_weight_sums(
    sums: &[f32],
    (cout, units, taps): (usize, usize, usize),
    dw: &mut [f32],
) {
    use rayon::prelude::*;
    dw.par_chunks_mut(units * taps)
        .enumerate()
        .for_each(|(co, dw)| {
            for (i, d) in dw.iter_mut().enumerate() {
                *d += sums[((i / taps) * cout + co) * taps + i % taps];
            }
        });
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn output_tile<const MR: usize, const NV: usize>(
    _: *const f32,
    _: &Strides,
    _: usize,
    _: *const f32,
    _: *mut f32,
    _: bool,
) {
    unreachable!("no AVX-512 kernels off x86-64")
}
