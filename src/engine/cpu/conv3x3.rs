//! A direct 3x3 stride-1 convolution (padding 1) with AVX-512 micro-kernels: the ResNet's
//! body layers, without unfolding their input nine times.
//!
//! Each image is copied once into a zero-bordered plane of `(h + 2) x (w + 2)` pixels, so
//! that tap `(ky, kx)` of output pixel `q` (in bordered coordinates) reads input pixel
//! `q + (ky - 1) pw + (kx - 1)` (`pw = w + 2`) with no bounds tests. A micro-kernel keeps
//! a tile of output channels x pixels in registers over a pass of up to 64 input channels
//! and nine taps, then stores it: the output makes one trip to memory per pass, and nothing
//! is packed but the weights. It computes whole bordered rows; the two border columns of a
//! row are computed and dropped (1/8 extra work at `w = 16`). The tile shape is chosen per
//! layer so that an image's rows fill whole tiles (see [`SHAPES`]).
//!
//! - forward: `y = conv(x, w)`;
//! - input gradient: `dx += conv(dy, w')`, the same kernel with `w'[ci, co, t] = w[co, ci,
//!   8 - t]` (the transposed convolution of a stride-1 "same" convolution is the
//!   convolution with the flipped, transposed kernel);
//! - weight gradient: `dw[co, ci, t] += sum_q dy[co, q] x[ci, q + off_t]` over the bordered
//!   pixels (zero outside the image), a second micro-kernel that keeps 3 output channels x 9
//!   taps of sums in registers and runs along the pixels.
//!
//! Every output value is one thread's sum in a fixed order, so results do not depend on the
//! thread count. The CPU engine falls back to its unfolded products (`conv.rs`) without
//! AVX-512F, and for the shapes where those measured faster.

use rayon::prelude::*;

use super::scratch::with_scratch;
use super::simd;
use crate::engine::Conv2d;

const TAPS: usize = simd::TAPS_3X3;

/// A micro-kernel's tile: `rows` output channels x `vectors` 16-lane vectors of pixels, all
/// in registers (20 to 24 of the 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TileShape {
    rows: usize,
    vectors: usize,
}

impl TileShape {
    fn pixels(self) -> usize {
        16 * self.vectors
    }
}

/// The shapes there are micro-kernels for, in order of preference: wider rows of pixels
/// for narrower images, so that an image's inner rows fill whole tiles.
const SHAPES: [TileShape; 3] = [
    TileShape {
        rows: 8,
        vectors: 3,
    },
    TileShape {
        rows: 6,
        vectors: 4,
    },
    TileShape {
        rows: 4,
        vectors: 5,
    },
];

/// The share of computed pixels that are real outputs below which the unfolded products
/// run faster (measured: 2/3 at `w = 8` about even with them, 1/3 at `w = 4` slower).
const MIN_USEFUL: f64 = 0.7;

/// The tile shape for `s`: the one that wastes least on border columns and on rounding an
/// image's rows up to whole tiles; none where even that wastes too much.
fn tile_shape(s: &Conv2d) -> Option<TileShape> {
    let (useful, computed_row) = (s.in_h * s.in_w, s.in_h * (s.in_w + 2));
    let share = |t: TileShape| useful as f64 / computed_row.next_multiple_of(t.pixels()) as f64;
    let best = SHAPES
        .into_iter()
        .reduce(|best, t| if share(t) > share(best) { t } else { best })?;
    (share(best) >= MIN_USEFUL).then_some(best)
}

/// Whether the direct kernel runs `s` on this CPU: a 3x3 stride-1 "same" convolution, on
/// AVX-512F, over images wide enough to fill a tile's vectors (see [`MIN_USEFUL`]).
pub(super) fn applies(s: &Conv2d) -> bool {
    s.kernel == 3
        && s.stride == 1
        && s.pad == 1
        && s.batch * s.in_channels * s.out_channels > 0
        && simd::available()
        && tile_shape(s).is_some()
}

/// The bordered layout of one `[C, N, h, w]` batch.
#[derive(Clone, Copy)]
struct Bordered {
    /// Bordered row length `w + 2`.
    pw: usize,
    h: usize,
    w: usize,
    batch: usize,
    /// Values per bordered image, `(h + 2) pw`.
    image: usize,
    /// Values per channel: the images back to back, then a zero tail that the last tile's
    /// reads may reach.
    channel: usize,
    /// Output pixels computed per image: its `h` inner bordered rows, rounded up to tiles.
    out_image: usize,
}

impl Bordered {
    /// The layout for tiles of `tile` pixels (at least 16).
    fn new(s: &Conv2d, tile: usize) -> Self {
        let (h, w) = (s.in_h, s.in_w);
        let pw = w + 2;
        let image = (h + 2) * pw;
        let out_image = (h * pw).next_multiple_of(tile);
        // The last tile of the last image ends before `(h + 1) pw + 1 + tile` and its reads
        // are shifted by at most `pw + 1`: at most `tile + 1` past the last image.
        let channel = s.batch * image + tile + 1;
        Self {
            pw,
            h,
            w,
            batch: s.batch,
            image,
            channel,
            out_image,
        }
    }

    /// The first inner pixel of an image, `(1, 1)`: where its computed output starts (the
    /// pixels before it, in its top border, are what that pixel's taps reach back to).
    fn first_inner(&self) -> usize {
        self.pw + 1
    }

    /// The offset of tap `t = 3 ky + kx` from the output pixel.
    fn tap_offsets(&self) -> [isize; TAPS] {
        std::array::from_fn(|t| ((t / 3) as isize - 1) * self.pw as isize + (t % 3) as isize - 1)
    }

    /// Copies `[C, N, h, w]` `src` into the bordered layout `dst` (`C * channel` values).
    fn fill(&self, src: &[f32], dst: &mut [f32]) {
        let plane = self.h * self.w;
        dst.par_chunks_mut(self.channel)
            .zip(src.par_chunks(self.batch * plane))
            .for_each(|(dst, src)| {
                dst.fill(0.0);
                for (n, img) in src.chunks_exact(plane).enumerate() {
                    for (row, src_row) in img.chunks_exact(self.w).enumerate() {
                        let at = n * self.image + (row + 1) * self.pw + 1;
                        dst[at..at + self.w].copy_from_slice(src_row);
                    }
                }
            });
    }
}

/// Weights packed for the micro-kernel: for each block of `rows` output channels, for each
/// input channel and tap, the `rows` weights (zero past the last output channel).
fn pack_weights(
    (cout, cin, rows): (usize, usize, usize),
    weight: impl Fn(usize, usize, usize) -> f32 + Sync,
    packed: &mut [f32],
) {
    packed
        .par_chunks_mut(cin * TAPS * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            for (i, v) in dst.iter_mut().enumerate() {
                let (ci, t, r) = (i / (TAPS * rows), i / rows % TAPS, i % rows);
                let co = block * rows + r;
                *v = if co < cout { weight(co, ci, t) } else { 0.0 };
            }
        });
}

/// Bytes of input rows near a tile and of their weights that one pass over the tile keeps
/// in the first-level cache (48 KiB on the machines measured); the tile is stored and
/// reloaded between passes.
const PASS_BYTES: usize = 40 << 10;

/// `out[n, co, r] = sum_{ci, t} wp[co, ci, t] xb[ci, n * image + pw + 1 + r + off_t]` for
/// every tile: from each image's first inner pixel on, its `h` inner rows (with their border
/// columns), `out_image` pixels.
fn convolve<const MR: usize, const NV: usize>(
    g: &Bordered,
    (cin, cout_blocks): (usize, usize),
    xb: &[f32],
    wp: &[f32],
    out: &mut [f32],
) {
    let tile = 16 * NV;
    let offsets = g.tap_offsets();
    // Every read of every tile stays inside `xb`: the furthest is the last image's last
    // tile, `tile` pixels from its start, shifted by the largest offset.
    let last_read = (cin - 1) * g.channel
        + (g.batch - 1) * g.image
        + g.first_inner()
        + g.out_image
        + offsets[TAPS - 1] as usize;
    assert!(last_read <= xb.len() && g.first_inner() as isize + offsets[0] >= 0);
    assert!(wp.len() >= cout_blocks * cin * TAPS * MR && g.out_image.is_multiple_of(tile));
    // An input channel's rows around a tile, and its weights.
    let channel_bytes = 4 * (tile + 2 * g.pw + 2 + TAPS * MR);
    let cin_block = (PASS_BYTES / channel_bytes).clamp(8, 64);
    let strides = simd::Strides {
        x: g.channel,
        y: g.out_image,
        offsets,
    };
    out.par_chunks_mut(MR * g.out_image)
        .enumerate()
        .for_each(|(unit, out)| {
            let (n, block) = (unit / cout_blocks, unit % cout_blocks);
            let w = &wp[block * cin * TAPS * MR..][..cin * TAPS * MR];
            for c0 in (0..cin).step_by(cin_block) {
                let channels = cin_block.min(cin - c0);
                for start in (0..g.out_image).step_by(tile) {
                    let x0 = c0 * g.channel + n * g.image + g.first_inner() + start;
                    // SAFETY: `applies` checked AVX-512F; the reads stay below `last_read`
                    // (asserted above) and at or after `x0 + offsets[0] >= 0`; the tile
                    // writes `MR` rows of `tile` values inside `out`, rows `out_image` apart.
                    unsafe {
                        simd::output_tile::<MR, NV>(
                            xb.as_ptr().add(x0),
                            &strides,
                            channels,
                            w[c0 * TAPS * MR..].as_ptr(),
                            out.as_mut_ptr().add(start),
                            c0 > 0,
                        )
                    };
                }
            }
        });
}

/// `dst[c, n, y, x] (+)= out[n, c, y pw + x]` for the inner pixels.
fn unborder(
    g: &Bordered,
    (channels, rows): (usize, usize),
    out: &[f32],
    dst: &mut [f32],
    accumulate: bool,
) {
    let plane = g.h * g.w;
    let cout_rows = channels.next_multiple_of(rows);
    dst.par_chunks_mut(g.batch * plane)
        .enumerate()
        .for_each(|(c, dst)| {
            for (n, img) in dst.chunks_exact_mut(plane).enumerate() {
                let src = &out[(n * cout_rows + c) * g.out_image..][..g.out_image];
                for (row, dst_row) in img.chunks_exact_mut(g.w).enumerate() {
                    let src_row = &src[row * g.pw..][..g.w];
                    if accumulate {
                        for (d, v) in dst_row.iter_mut().zip(src_row) {
                            *d += v;
                        }
                    } else {
                        dst_row.copy_from_slice(src_row);
                    }
                }
            }
        });
}

/// One convolution `src` (`cin` channels) to `dst` (`cout` channels) with `weight(co, ci,
/// t)`: borders the input, packs the weights, runs the tiles, writes or adds the result.
fn run(
    s: &Conv2d,
    (cin, cout): (usize, usize),
    weight: impl Fn(usize, usize, usize) -> f32 + Sync,
    src: &[f32],
    dst: &mut [f32],
    accumulate: bool,
) {
    let shape = tile_shape(s).expect("the direct convolution applies to this shape");
    let g = Bordered::new(s, shape.pixels());
    let blocks = cout.div_ceil(shape.rows);
    let (xb_len, wp_len) = (cin * g.channel, blocks * cin * TAPS * shape.rows);
    let out_len = s.batch * blocks * shape.rows * g.out_image;
    with_scratch(xb_len + wp_len + out_len, |scratch| {
        let (xb, rest) = scratch.split_at_mut(xb_len);
        let (wp, out) = rest.split_at_mut(wp_len);
        g.fill(src, xb);
        pack_weights((cout, cin, shape.rows), weight, wp);
        let sizes = (cin, blocks);
        match shape {
            TileShape {
                rows: 8,
                vectors: 3,
            } => convolve::<8, 3>(&g, sizes, xb, wp, out),
            TileShape {
                rows: 6,
                vectors: 4,
            } => convolve::<6, 4>(&g, sizes, xb, wp, out),
            TileShape {
                rows: 4,
                vectors: 5,
            } => convolve::<4, 5>(&g, sizes, xb, wp, out),
            _ => unreachable!("a shape in SHAPES has its kernel here: {shape:?}"),
        }
        unborder(&g, (cout, shape.rows), out, dst, accumulate);
    });
}

pub(super) fn forward(s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (cin, cout) = (s.in_channels, s.out_channels);
    let weight = |co: usize, ci: usize, t: usize| w[(co * cin + ci) * TAPS + t];
    run(s, (cin, cout), weight, x, y, false);
}

/// `dx += conv(dy, w')` with `w'[ci, co, t] = w[co, ci, 8 - t]`.
pub(super) fn input_gradient(s: &Conv2d, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (cin, cout) = (s.in_channels, s.out_channels);
    let flipped = |ci: usize, co: usize, t: usize| w[(co * cin + ci) * TAPS + TAPS - 1 - t];
    run(s, (cout, cin), flipped, dy, dx, true);
}

/// Whether [`weight_gradient`] beats the unfolded product for `s`: with few channels, where
/// that product is skinny (measured: faster at 64 and 128 channels, slower at 256 and 512,
/// where the product is wide and the direct kernel's loads outnumber its multiply-adds).
pub(super) fn weight_gradient_applies(s: &Conv2d) -> bool {
    applies(s) && s.in_channels * s.out_channels <= 128 * 128
}

/// Pixels per pass of the weight gradient, and the bytes of output-gradient rows over that
/// span that stay in the second-level cache (2 MiB a core on the machines measured) while
/// each input channel runs over them: the output channels go by blocks of that size.
const SPAN_PIXELS: usize = 4096;
const SPAN_BYTES: usize = 1 << 20;

/// `dw[co, ci, t] += sum_q dyb[co, q] xb[ci, q + off_t]`, both bordered (zero borders),
/// over every pixel from the first inner one to the last. Spans of pixels one after the
/// other, each adding its partial sums in order: a fixed order whatever the
/// threads.
pub(super) fn weight_gradient(s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout) = (s.in_channels, s.out_channels);
    let g = Bordered::new(s, 16);
    let first = g.first_inner();
    let span = (s.batch * g.image - 2 * first).div_ceil(16) * 16;
    // Reads reach `first + span + pw + 1`, inside the channel's zero tail (17 values: the
    // up to 15 of rounding `span` up, and the `pw + 1 = first` of the shift).
    assert!(first + span + first <= g.channel);
    let (xb_len, dyb_len, sums_len) = (cin * g.channel, cout * g.channel, cin * cout * TAPS);
    with_scratch(xb_len + dyb_len + sums_len, |scratch| {
        let (xb, rest) = scratch.split_at_mut(xb_len);
        let (dyb, sums) = rest.split_at_mut(dyb_len);
        g.fill(x, xb);
        g.fill(dy, dyb);
        sums.fill(0.0);
        let (xb, dyb) = (&*xb, &*dyb);
        // Output channels whose rows over a span fit the budget.
        let co_block = (SPAN_BYTES / (4 * SPAN_PIXELS)).next_multiple_of(simd::GRAD_ROWS);
        for q0 in (first..first + span).step_by(SPAN_PIXELS) {
            let walk = simd::Walk {
                dy_channel: g.channel,
                offsets: g.tap_offsets(),
                rows: 1,
                vectors: SPAN_PIXELS.min(first + span - q0) / 16,
                dy_row: 0,
                x_row: 0,
            };
            for co_start in (0..cout).step_by(co_block) {
                let co_end = cout.min(co_start + co_block);
                // `sums[ci, co, t]`: one input channel per unit.
                sums.par_chunks_mut(cout * TAPS)
                    .enumerate()
                    .for_each(|(ci, sums)| {
                        let (dy, x) = (&dyb[q0..], &xb[ci * g.channel + q0..]);
                        // SAFETY: `applies` checked AVX-512F; rows `co_start..co_end` of
                        // `dyb` and row `ci` of `xb` are read over the walk's span from `q0`
                        // (shifted by at most `first`), inside by the assert above.
                        unsafe { simd::weight_tiles(co_start..co_end, (dy, x), &walk, sums) };
                    });
            }
        }
        simd::add_weight_sums(sums, (cout, cin, TAPS), dw);
    });
}
