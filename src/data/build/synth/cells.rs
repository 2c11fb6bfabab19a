//! Drawing one patch: the scene and the centred cell drawn from the patch's own RNG streams
//! ([`SynthConfig::render_into`]), the shapes (wavy blobs, cells with textured nuclei, red
//! cells), and the per-thread canvas of stain concentrations that is blurred and developed
//! with Beer-Lambert into RGB, with its noise and hash helpers.

use std::cell::RefCell;
use std::f32::consts::TAU;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::SynthConfig;
use crate::data::store::MAX_PATCH_SIDE;

/// Mean of the latent abnormality per class and its spread: the classes overlap, so a few
/// cells of either class look like the other (as on real slides).
const LATENT_MEAN: [f32; 2] = [0.25, 0.75];
const LATENT_STD: f32 = 0.17;

/// Optical density per unit stain, R G B, and of the empty slide.
const NUCLEAR_OD: [f32; 3] = [1.05, 1.45, 0.55];
const CYTOPLASM_OD: [f32; 3] = [0.42, 0.30, 0.10];
const EOSIN_OD: [f32; 3] = [0.10, 0.45, 0.28];
const BACKGROUND_OD: [f32; 3] = [0.16, 0.20, 0.07];

impl SynthConfig {
    /// Renders patch `id` into `out` (u8 HWC RGB, [`SynthConfig::patch_bytes`] long).
    pub fn render_into(&self, id: u64, abnormal: bool, out: &mut [u8]) {
        assert_eq!(out.len(), self.patch_bytes(), "output buffer size");
        if out.is_empty() {
            return;
        }
        let side = self.patch_size as f32;
        let scene = Scene::sample(&mut self.rng(id, 0), side);
        let cell = CellShape::sample(
            &mut self.rng(id, 1),
            side,
            scene.centre,
            LATENT_MEAN[abnormal as usize],
        );
        CANVAS.with_borrow_mut(|canvas| {
            canvas.reset(self.patch_size);
            for neighbour in &scene.neighbours {
                canvas.draw_cell(neighbour);
            }
            for red in &scene.red_cells {
                canvas.draw_red_cell(red);
            }
            canvas.draw_cell(&cell);
            canvas.blur(scene.blur_sigma);
            canvas.develop(&scene, out);
        });
    }

    /// The RNG of one patch: stream 0 draws the scene (class-blind), stream 1 the cell.
    fn rng(&self, id: u64, stream: u64) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&id.to_le_bytes());
        key[16..24].copy_from_slice(b"slamsynt");
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(stream);
        rng
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    rng.sample(StandardNormal)
}

/// Harmonics 2..=5 of a contour, as complex amplitudes relative to the radius.
const HARMONICS: usize = 4;

/// A blob with a wavy contour r(theta) = radius (1 + sum_k Re(A_k e^{ik theta})) and a soft
/// one-pixel edge; the harmonics are evaluated from (dx, dy) / r by complex powers, without
/// trigonometry per pixel.
#[derive(Clone, Copy, Debug)]
struct Blob {
    cx: f32,
    cy: f32,
    radius: f32,
    harmonics: [[f32; 2]; HARMONICS],
    /// Squared radii inside which the blob is surely full, outside which surely empty.
    inner2: f32,
    outer2: f32,
}

impl Blob {
    /// `amplitudes[k]` scales harmonic k + 2, each at a random phase.
    fn new(rng: &mut ChaCha8Rng, cx: f32, cy: f32, radius: f32, amplitudes: [f32; 4]) -> Self {
        let harmonics = amplitudes.map(|a| {
            let phase = rng.random_range(0.0..TAU);
            [a * phase.cos(), a * phase.sin()]
        });
        let wobble: f32 = amplitudes.iter().map(|a| a.abs()).sum();
        let inner = (radius * (1.0 - wobble) - 0.5).max(0.0);
        let outer = radius * (1.0 + wobble) + 0.5;
        Self {
            cx,
            cy,
            radius,
            harmonics,
            inner2: inner * inner,
            outer2: outer * outer,
        }
    }

    fn circle(cx: f32, cy: f32, radius: f32) -> Self {
        let (inner, outer) = ((radius - 0.5).max(0.0), radius + 0.5);
        Self {
            cx,
            cy,
            radius,
            harmonics: [[0.0; 2]; HARMONICS],
            inner2: inner * inner,
            outer2: outer * outer,
        }
    }

    fn extent(&self) -> f32 {
        self.outer2.sqrt()
    }

    /// Share of the pixel centred at (px, py) that the blob covers.
    #[inline]
    fn coverage(&self, px: f32, py: f32) -> f32 {
        let (dx, dy) = (px - self.cx, py - self.cy);
        let r2 = dx * dx + dy * dy;
        if r2 >= self.outer2 {
            return 0.0;
        }
        if r2 <= self.inner2 {
            return 1.0;
        }
        let r = r2.sqrt();
        let (c, s) = (dx / r, dy / r);
        let (mut zr, mut zi) = (c, s);
        let mut wave = 0.0;
        for [ar, ai] in self.harmonics {
            (zr, zi) = (zr * c - zi * s, zr * s + zi * c);
            wave += ar * zr - ai * zi;
        }
        (self.radius * (1.0 + wave) - r + 0.5).clamp(0.0, 1.0)
    }
}

/// One cell: cytoplasm, nucleus with chromatin texture, nucleoli.
#[derive(Clone, Debug)]
struct CellShape {
    body: Blob,
    nucleus: Blob,
    /// Cytoplasm stain concentration and the grain of its mottling (inverse pixels).
    cytoplasm: f32,
    inv_cytoplasm_grain: f32,
    /// Mean nuclear stain concentration, the chromatin texture's contrast and grain (pixels).
    chromatin: f32,
    contrast: f32,
    inv_grain: f32,
    texture_seed: u32,
    nucleoli: Vec<Blob>,
}

impl CellShape {
    /// A cell centred near `centre` in a patch of side `side`, its abnormality drawn around
    /// `latent_mean`.
    fn sample(rng: &mut ChaCha8Rng, side: f32, centre: [f32; 2], latent_mean: f32) -> Self {
        let a = (latent_mean + LATENT_STD * normal(rng)).clamp(0.0, 1.0);
        let radius = side * (0.26 + 0.02 * a + 0.035 * normal(rng)).clamp(0.17, 0.38);
        let nc_ratio = (0.54 + 0.14 * a + 0.06 * normal(rng)).clamp(0.38, 0.85);
        let nucleus_radius = radius * nc_ratio;
        // Eccentric nucleus, kept inside the cell.
        let offset = (radius - nucleus_radius) * rng.random_range(0.0..0.8);
        let angle = rng.random_range(0.0..TAU);
        let body_wave = [
            rng.random_range(0.02..0.07),
            0.01 * normal(rng).abs(),
            0.01 * normal(rng).abs(),
            0.005 * normal(rng).abs(),
        ];
        let body = Blob::new(rng, centre[0], centre[1], radius, body_wave);
        // Irregular, folded contour with abnormality; a round one without.
        let irregular = 0.005 + 0.05 * a;
        let nucleus_wave = [
            (0.03 + 0.06 * a) * rng.random_range(0.5..1.5),
            irregular * rng.random_range(0.3..1.3),
            irregular * rng.random_range(0.3..1.3),
            0.6 * irregular * rng.random_range(0.3..1.3),
        ];
        let (ncx, ncy) = (
            centre[0] + offset * angle.cos(),
            centre[1] + offset * angle.sin(),
        );
        let nucleus = Blob::new(rng, ncx, ncy, nucleus_radius, nucleus_wave);
        let nucleoli_count = (0..3)
            .filter(|_| rng.random_bool((0.6 * a * a) as f64))
            .count();
        let nucleoli = (0..nucleoli_count)
            .map(|_| {
                let r = nucleus_radius * rng.random_range(0.0..0.5);
                let t = rng.random_range(0.0..TAU);
                let size = nucleus_radius * rng.random_range(0.09..0.15);
                Blob::circle(ncx + r * t.cos(), ncy + r * t.sin(), size.max(0.6))
            })
            .collect();
        Self {
            body,
            nucleus,
            cytoplasm: 0.55 * rng.random_range(0.75..1.25),
            inv_cytoplasm_grain: 1.0 / (0.04 * side).max(1.0),
            // Abnormal chromatin is open (a little paler) and clumped (coarse, contrasted).
            chromatin: (1.0 - 0.4 * a) * (1.0 + 0.08 * normal(rng)),
            contrast: ((0.15 + 0.3 * a) * rng.random_range(0.7..1.3)).min(0.8),
            inv_grain: 1.0 / (side * (0.016 + 0.022 * a) * rng.random_range(0.8..1.25)).max(0.7),
            texture_seed: rng.random(),
            nucleoli,
        }
    }

    /// Nuclear stain at (px, py): two octaves of value noise around the mean.
    #[inline]
    fn chromatin_at(&self, px: f32, py: f32) -> f32 {
        let (u, v) = (px * self.inv_grain, py * self.inv_grain);
        let n = 0.65 * value_noise(u, v, self.texture_seed)
            + 0.35 * value_noise(2.03 * u, 2.03 * v, self.texture_seed ^ 0x9e37_79b9);
        self.chromatin * (1.0 + 1.8 * self.contrast * (2.0 * n - 1.0)).max(0.08)
    }
}

/// A red blood cell: an eosin disc with a pale centre.
#[derive(Clone, Copy, Debug)]
struct RedCell {
    disc: Blob,
    stain: f32,
}

/// Everything about a patch but the centred cell; drawn the same way for both classes.
#[derive(Clone, Debug)]
struct Scene {
    /// Optical densities per unit stain (nuclear, cytoplasm, eosin) and of the background.
    stains: [[f32; 3]; 3],
    background: [f32; 3],
    /// Incident light in grey levels, and its gradient across the patch (share per side).
    brightness: f32,
    gradient: [f32; 2],
    blur_sigma: f32,
    /// Amplitude of the uniform sensor noise in grey levels.
    noise: f32,
    noise_seed: u32,
    centre: [f32; 2],
    neighbours: Vec<CellShape>,
    red_cells: Vec<RedCell>,
}

impl Scene {
    fn sample(rng: &mut ChaCha8Rng, side: f32) -> Self {
        // Stain batches and thickness: each stain's hue and strength vary.
        let intensity = rng.random_range(0.8..1.2);
        let mut stain = |od: [f32; 3]| {
            let strength = intensity * rng.random_range(0.9..1.1);
            od.map(|v| v * strength * (0.12 * normal(rng)).exp())
        };
        let stains = [stain(NUCLEAR_OD), stain(CYTOPLASM_OD), stain(EOSIN_OD)];
        let background = BACKGROUND_OD.map(|v| v * rng.random_range(0.6..1.5));
        let half = side / 2.0;
        let centre = [
            half + side * rng.random_range(-0.04..0.04),
            half + side * rng.random_range(-0.04..0.04),
        ];
        let neighbours = (0..rng.random_range(0..=3))
            .map(|_| {
                let t = rng.random_range(0.0..TAU);
                let d = side * rng.random_range(0.58..0.85);
                let at = [half + d * t.cos(), half + d * t.sin()];
                // Class-blind neighbours: mostly normal-looking, sometimes not.
                CellShape::sample(rng, side, at, 0.35)
            })
            .collect();
        let red_cells = (0..rng.random_range(0..=3))
            .map(|_| {
                let t = rng.random_range(0.0..TAU);
                let d = side * rng.random_range(0.3..0.75);
                let radius = side * rng.random_range(0.10..0.15);
                let wave = [rng.random_range(0.0..0.06), 0.0, 0.0, 0.0];
                RedCell {
                    disc: Blob::new(rng, half + d * t.cos(), half + d * t.sin(), radius, wave),
                    stain: rng.random_range(0.6..1.0),
                }
            })
            .collect();
        Self {
            stains,
            background,
            brightness: 255.0 * rng.random_range(0.88..1.1),
            gradient: [rng.random_range(-0.3..0.3), rng.random_range(-0.3..0.3)],
            blur_sigma: side / 250.0 * rng.random_range(0.0..1.6),
            noise: rng.random_range(1.0..4.0),
            noise_seed: rng.random(),
            centre,
            neighbours,
            red_cells,
        }
    }
}

/// Stain concentrations of one patch (nuclear, cytoplasm, eosin per pixel, interleaved) and
/// the blur's scratch row buffer, kept per thread so rendering allocates nothing per patch.
#[derive(Default)]
struct Canvas {
    side: usize,
    planes: Vec<f32>,
    scratch: Vec<f32>,
}

thread_local! {
    static CANVAS: RefCell<Canvas> = RefCell::default();
}

impl Canvas {
    fn reset(&mut self, side: usize) {
        self.side = side;
        self.planes.clear();
        self.planes.resize(side * side * 3, 0.0);
    }

    /// Pixel ranges (x, y) of the square of half-side `extent` around (cx, cy), clipped.
    fn bounds(&self, cx: f32, cy: f32, extent: f32) -> [std::ops::Range<usize>; 2] {
        let s = self.side as f32;
        let range = |c: f32| {
            let lo = (c - extent).floor().clamp(0.0, s) as usize;
            let hi = (c + extent).ceil().clamp(0.0, s) as usize;
            lo..hi.max(lo)
        };
        [range(cx), range(cy)]
    }

    fn draw_cell(&mut self, cell: &CellShape) {
        let (body, nucleus) = (&cell.body, &cell.nucleus);
        let reach = (nucleus.cx - body.cx).hypot(nucleus.cy - body.cy) + nucleus.extent();
        let [xs, ys] = self.bounds(body.cx, body.cy, body.extent().max(reach));
        let side = self.side;
        for y in ys {
            let py = y as f32 + 0.5;
            let row = &mut self.planes[y * side * 3..(y + 1) * side * 3];
            for x in xs.clone() {
                let px = x as f32 + 0.5;
                let inside = body.coverage(px, py);
                let nuclear = nucleus.coverage(px, py);
                if inside == 0.0 && nuclear == 0.0 {
                    continue;
                }
                let pixel = &mut row[x * 3..x * 3 + 3];
                let mut cytoplasm = 0.0;
                if inside > nuclear {
                    // Faint mottling, the same for both classes.
                    let (u, v) = (px * cell.inv_cytoplasm_grain, py * cell.inv_cytoplasm_grain);
                    let mottle = 0.8 + 0.4 * value_noise(u, v, !cell.texture_seed);
                    cytoplasm = inside * (1.0 - nuclear) * cell.cytoplasm * mottle;
                }
                if nuclear > 0.0 {
                    let mut chromatin = cell.chromatin_at(px, py);
                    for nucleolus in &cell.nucleoli {
                        // Nucleoli: pale, bluish holes in the chromatin.
                        let c = nucleolus.coverage(px, py);
                        chromatin *= 1.0 - 0.7 * c;
                        cytoplasm += nuclear * 0.5 * c * cell.cytoplasm;
                    }
                    pixel[0] += nuclear * chromatin;
                }
                pixel[1] += cytoplasm;
            }
        }
    }

    fn draw_red_cell(&mut self, red: &RedCell) {
        let disc = &red.disc;
        let [xs, ys] = self.bounds(disc.cx, disc.cy, disc.extent());
        let inv_pallor = 1.0 / (0.55 * disc.radius).max(0.5);
        for y in ys {
            let py = y as f32 + 0.5;
            for x in xs.clone() {
                let px = x as f32 + 0.5;
                let cover = disc.coverage(px, py);
                if cover > 0.0 {
                    let (dx, dy) = ((px - disc.cx) * inv_pallor, (py - disc.cy) * inv_pallor);
                    let pallor = (1.0 - dx * dx - dy * dy).max(0.0);
                    self.planes[(y * self.side + x) * 3 + 2] +=
                        cover * red.stain * (1.0 - 0.45 * pallor);
                }
            }
        }
    }

    /// Separable gaussian blur of the stain planes (out-of-focus optics), edges clamped.
    fn blur(&mut self, sigma: f32) {
        if sigma < 0.3 || self.side < 2 {
            return;
        }
        let side = self.side;
        let radius = ((2.5 * sigma).ceil() as usize).min(side - 1);
        let mut weights: Vec<f32> = (0..=2 * radius)
            .map(|k| {
                let d = k as f32 - radius as f32;
                (-d * d / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let total: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let row_len = side * 3;
        self.scratch.resize(row_len * side, 0.0);
        // Pixels whose taps all fall inside the row take whole shifted slices (vectorized);
        // the few at the ends gather with clamping.
        let (lo, hi) = (
            radius.min(side),
            side.saturating_sub(radius).max(radius.min(side)),
        );
        for (src, dst) in self
            .planes
            .chunks_exact(row_len)
            .zip(self.scratch.chunks_exact_mut(row_len))
        {
            dst.fill(0.0);
            for (k, w) in weights.iter().enumerate() {
                let from = (lo + k - radius) * 3;
                for (d, s) in dst[lo * 3..hi * 3].iter_mut().zip(&src[from..]) {
                    *d += w * s;
                }
            }
            for x in (0..lo).chain(hi..side) {
                for (k, w) in weights.iter().enumerate() {
                    let xx = (x + k).saturating_sub(radius).min(side - 1);
                    for c in 0..3 {
                        dst[x * 3 + c] += w * src[xx * 3 + c];
                    }
                }
            }
        }
        // Columns: whole rows are scaled and added.
        for y in 0..side {
            let dst = &mut self.planes[y * row_len..(y + 1) * row_len];
            dst.fill(0.0);
            for (k, w) in weights.iter().enumerate() {
                let yy = (y + k).saturating_sub(radius).min(side - 1);
                let src = &self.scratch[yy * row_len..(yy + 1) * row_len];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += w * s;
                }
            }
        }
    }

    /// Beer-Lambert: light through the background and the stains, plus sensor noise; row by
    /// row, optical densities first, then transmission and noise in one vectorizable pass.
    fn develop(&mut self, scene: &Scene, out: &mut [u8]) {
        let noise = noise_table();
        let side = self.side;
        let row_len = side * 3;
        let inv_side = 1.0 / side as f32;
        let [n_od, c_od, e_od] = scene.stains;
        self.scratch.resize(row_len.max(self.scratch.len()), 0.0);
        let od = &mut self.scratch[..row_len];
        for (y, (planes, out)) in self
            .planes
            .chunks_exact(row_len)
            .zip(out.chunks_exact_mut(row_len))
            .enumerate()
        {
            let fy = scene.gradient[1] * ((y as f32 + 0.5) * inv_side - 0.5);
            for (x, (od, p)) in od
                .chunks_exact_mut(3)
                .zip(planes.chunks_exact(3))
                .enumerate()
            {
                let light = 1.0 + fy + scene.gradient[0] * ((x as f32 + 0.5) * inv_side - 0.5);
                for c in 0..3 {
                    od[c] = scene.background[c] * light
                        + p[0] * n_od[c]
                        + p[1] * c_od[c]
                        + p[2] * e_od[c];
                }
            }
            // A random window of the noise table per row.
            let start = (hash(y as i32, 0, scene.noise_seed) as usize) % NOISE_LEN;
            for ((o, &d), &g) in out.iter_mut().zip(od.iter()).zip(&noise[start..]) {
                let v = (scene.brightness * transmission(d) + scene.noise * g).clamp(0.0, 255.0);
                // Adding 2^23 rounds to an integer held in the low mantissa bits: unlike a
                // float-to-int cast, this vectorizes.
                *o = (v + 8_388_608.0).to_bits() as u8;
            }
        }
    }
}

/// exp(-od) for od >= 0 without a libm call: 2^t = 2^round(t) 2^f with |f| <= 1/2, the
/// integer part put into the exponent bits, the fraction by a degree-5 Taylor polynomial
/// (relative error below 1e-5, far under one grey level).
#[inline]
fn transmission(od: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let t = (-od * std::f32::consts::LOG2_E).clamp(-126.0, 0.0);
    let r = t + ROUND;
    let i = r.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let f = t - (r - ROUND);
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_1 + f * (0.009_618_1 + f * 0.001_333_4))));
    f32::from_bits(((i + 127) as u32) << 23) * p
}

/// Uniform noise in [-1, 1], long enough for a random window of any row.
const NOISE_LEN: usize = 1 << 16;

fn noise_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..NOISE_LEN + 3 * MAX_PATCH_SIDE as usize)
            .map(|i| hash(i as i32, 1, 0x5eed) as f32 * (2.0 / u32::MAX as f32) - 1.0)
            .collect()
    })
}

#[inline]
fn hash(x: i32, y: i32, seed: u32) -> u32 {
    let mut h = (x as u32).wrapping_mul(0x27d4_eb2d) ^ (y as u32).wrapping_mul(0x1656_67b1) ^ seed;
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297a_2d39);
    h ^ (h >> 15)
}

/// Smooth noise in [0, 1] at x, y >= 0 (pixel coordinates): random values on the integer
/// lattice, interpolated. Truncation is the floor there, and cheaper than `floor`.
#[inline]
fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (ix, iy) = (x as i32, y as i32);
    let (fx, fy) = (ix as f32, iy as f32);
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    let (tx, ty) = (smooth(x - fx), smooth(y - fy));
    let at = |dx, dy| hash(ix + dx, iy + dy, seed) as f32 * (1.0 / u32::MAX as f32);
    let top = at(0, 0) + tx * (at(1, 0) - at(0, 0));
    let bottom = at(0, 1) + tx * (at(1, 1) - at(0, 1));
    top + ty * (bottom - top)
}
