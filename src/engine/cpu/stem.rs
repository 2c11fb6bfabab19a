//! The stem's weight gradient (7x7, stride 2, padding 3, output rows of whole vectors),
//! direct, with the AVX-512 weight-gradient kernel: `dw[co, ci, ky, kx] += sum_{n, oy, ox}
//! dy[co, n, oy, ox] x[ci, n, 2 oy + ky - 3, 2 ox + kx - 3]`.
//!
//! The unfolded product reduces a `64 x 147` result over every output pixel (a million at
//! crop 224), after unfolding the input 12 times its size; this reads it twice instead. A
//! stride of 2 puts the taps of consecutive output pixels two input pixels apart, so each
//! input row is first split into its even and odd columns ("phases"): tap `kx` of output
//! pixels `ox..ox + 16` is then 16 consecutive values of phase `(kx - 3) mod 2`, from
//! column `ox + floor((kx - 3) / 2)`.

use rayon::prelude::*;

use super::scratch::with_scratch;
use super::simd;
use crate::engine::Conv2d;

const KERNEL: usize = 7;
const PAD: usize = 3;
/// Zero columns before column 0 of a phase row: the leftmost tap reaches `floor(-3 / 2) = -2`.
const LEAD: usize = 2;
/// Zero output-gradient rows after each image's: an image's input rows then span exactly
/// twice its output-gradient rows (`2 (oh + 3) >= 2 oh + 5`, the rows its taps reach), so
/// one stride walks both across images.
const TRAIL: usize = 3;

/// Whether the direct weight gradient runs `s` on this CPU.
pub(super) fn applies(s: &Conv2d) -> bool {
    s.kernel == KERNEL
        && s.stride == 2
        && s.pad == PAD
        && s.out_w().is_multiple_of(16)
        && s.batch * s.in_channels * s.out_channels * s.out_w() > 0
        && simd::available()
}

/// The phase layout of the input and the padded rows of the output gradient.
struct Phases {
    /// Values per phase row: the lead, `ow` columns and the rightmost tap's reach of 1.
    pw: usize,
    /// Output-gradient rows per image, with the zero trail.
    dy_rows: usize,
    /// Values per input channel: each image's `2 dy_rows` rows of two phases, then zero rows
    /// for the last image's trailing reads.
    x_channel: usize,
}

impl Phases {
    fn new(s: &Conv2d) -> Self {
        let pw = LEAD + s.out_w() + 1;
        let dy_rows = s.out_h() + TRAIL;
        let x_channel = (s.batch * 2 * dy_rows + KERNEL) * 2 * pw;
        Self {
            pw,
            dy_rows,
            x_channel,
        }
    }

    /// Where tap `kx` of a pixel reads, from the pixel's column in its row's phase pair.
    fn tap_offsets(&self) -> [isize; KERNEL] {
        std::array::from_fn(|kx| {
            let shift = kx as isize - PAD as isize;
            shift.rem_euclid(2) * self.pw as isize + shift.div_euclid(2) + LEAD as isize
        })
    }

    /// `xp[ci, n, r, phase, LEAD + j] = x[ci, n, r - 3, 2 j + phase]`, zero outside the image.
    fn fill_input(&self, s: &Conv2d, x: &[f32], xp: &mut [f32]) {
        let plane = s.in_h * s.in_w;
        xp.par_chunks_mut(self.x_channel)
            .zip(x.par_chunks(s.batch * plane))
            .for_each(|(dst, src)| {
                dst.fill(0.0);
                for (n, img) in src.chunks_exact(plane).enumerate() {
                    for (iy, row) in img.chunks_exact(s.in_w).enumerate() {
                        let at = ((n * 2 * self.dy_rows + iy + PAD) * 2) * self.pw + LEAD;
                        for (ix, &v) in row.iter().enumerate() {
                            dst[at + (ix % 2) * self.pw + ix / 2] = v;
                        }
                    }
                }
            });
    }

    /// `dyp[co, n, oy, ox] = dy[co, n, oy, ox]`, then `TRAIL` zero rows per image.
    fn fill_gradient(&self, s: &Conv2d, dy: &[f32], dyp: &mut [f32]) {
        let (plane, padded) = (s.out_h() * s.out_w(), self.dy_rows * s.out_w());
        dyp.par_chunks_mut(s.batch * padded)
            .zip(dy.par_chunks(s.batch * plane))
            .for_each(|(dst, src)| {
                for (dst, src) in dst.chunks_exact_mut(padded).zip(src.chunks_exact(plane)) {
                    dst[..plane].copy_from_slice(src);
                    dst[plane..].fill(0.0);
                }
            });
    }
}

/// Bytes of output-gradient rows, every output channel, that stay in the second-level cache
/// while each (input channel, kernel row) runs over them.
const ROWS_BYTES: usize = 1 << 20;

/// `dw += dL/dw` of the stem. Units of work are (input channel, kernel row) pairs, each
/// reducing over blocks of output rows one after the other: a fixed order whatever the
/// threads.
pub(super) fn weight_gradient(s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout, ow) = (s.in_channels, s.out_channels, s.out_w());
    let ph = Phases::new(s);
    let rows = s.batch * ph.dy_rows;
    let dy_channel = rows * ow;
    // The furthest read: the last row's last tap, `2 (rows - 1) + 6` phase-row pairs in,
    // plus the odd phase, its shift of 1 and its 16 values past the last vector's start.
    let last = ((2 * (rows - 1) + KERNEL - 1) * 2 + 1) * ph.pw + LEAD + 1 + ow;
    assert!(last <= ph.x_channel && ow.is_multiple_of(16));
    let units = cin * KERNEL;
    let (xp_len, dyp_len, sums_len) =
        (cin * ph.x_channel, cout * dy_channel, units * cout * KERNEL);
    with_scratch(xp_len + dyp_len + sums_len, |scratch| {
        let (xp, rest) = scratch.split_at_mut(xp_len);
        let (dyp, sums) = rest.split_at_mut(dyp_len);
        ph.fill_input(s, x, xp);
        ph.fill_gradient(s, dy, dyp);
        sums.fill(0.0);
        let (xp, dyp) = (&*xp, &*dyp);
        let block_rows = (ROWS_BYTES / (4 * cout * ow)).max(1);
        for r0 in (0..rows).step_by(block_rows) {
            let walk = simd::Walk {
                dy_channel,
                offsets: ph.tap_offsets(),
                rows: block_rows.min(rows - r0),
                vectors: ow / 16,
                dy_row: ow,
                // Output row `r` reads input rows `2 r + ky`: two phase-row pairs on.
                x_row: 4 * ph.pw,
            };
            // `sums[(ci, ky), co, kx]`.
            sums.par_chunks_mut(cout * KERNEL)
                .enumerate()
                .for_each(|(unit, sums)| {
                    let (ci, ky) = (unit / KERNEL, unit % KERNEL);
                    let x = &xp[ci * ph.x_channel + (2 * r0 + ky) * 2 * ph.pw..];
                    // SAFETY: `applies` checked AVX-512F; the reads stay below `last`
                    // within the channel (asserted above) and inside `dyp`'s rows.
                    unsafe { simd::weight_tiles(0..cout, (&dyp[r0 * ow..], x), &walk, sums) };
                });
        }
        simd::add_weight_sums(sums, (cout, units, KERNEL), dw);
    });
}
