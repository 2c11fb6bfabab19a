//! Every engine op against its CPU twin, through the twin harness (tests/common/twin.rs): each
//! case below is written once, generic over the engine, run on the CPU engine and, on a GPU,
//! twice on the CUDA engine (bit-identical runs, each within its tolerance of the CPU).
//! Inputs are random, in several shapes: tiny ones, lengths that are not multiples of 4 or of
//! a block or chunk, views at odd offsets inside bigger NaN-filled buffers (the scalar paths;
//! a value read or written outside a view shows up), and the reference model's shapes.
//! Accumulated outputs (`+=`) start from random values. Without a GPU the cases still run on
//! the CPU and the GPU half prints why it skips; `SLAM_REQUIRE_GPU=1` makes that a failure.
//!
//! Tolerances: with exact f32 products the engines differ only in summation order, so single
//! ops agree to about 1e-6 (relative L2); batch norm's statistics are f64 on both sides
//! (1e-5 of the largest value); pooling, the AGS update and the combination are the same f32
//! operations in the same order (bit for bit); the losses run their softmax in f64 with f32
//! products (1e-4 NT-Xent, 1e-5 cohesion, per column of the gradient). TF32 rounds the
//! products' inputs to 10 mantissa bits (1e-2), bf16 to 7 (5e-2).

mod common;

use anyhow::{Result, ensure};
use common::twin::{Case, Output, Tolerance, Twin};
use common::{uniform, uniform_in};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::MatmulMode;
use slam_ags::engine::{
    AvgPool, BatchNorm, BnBackward, BnForward, BnStats, Conv2d, ConvBackward, Engine, Linear,
    LinearBackward, LinearForward, LossViews, MaxPool, SgdBuffers, SgdUpdate, ViewPair,
};

/// A buffer holding `host` at offset `off`, NaN around it.
fn place<E: Engine>(eng: &E, host: &[f32], off: usize) -> Result<E::Buf> {
    let mut padded = vec![f32::NAN; off + host.len() + 3];
    padded[off..off + host.len()].copy_from_slice(host);
    eng.upload(&padded)
}

/// The `len` values at offset `off` of a buffer.
fn fetch<E: Engine>(eng: &E, buf: &E::Buf, off: usize, len: usize) -> Result<Vec<f32>> {
    eng.download(eng.view(buf, off..off + len))
}

/// Values on [center - scale, center + scale).
fn around(rng: &mut ChaCha8Rng, len: usize, center: f32, scale: f32) -> Vec<f32> {
    uniform_in(rng, len, center - scale, center + scale)
}

// ---------------------------------------------------------------------------------------
// Convolution and linear layers.
// ---------------------------------------------------------------------------------------

/// Forward and backward of one convolution; `dw` and `dx` start from random values, so that
/// accumulation is checked too, and a backward without `dx` moves `dw` alone.
struct ConvCase {
    s: Conv2d,
    seed: u64,
    tol: f64,
}

impl Case for ConvCase {
    fn name(&self) -> String {
        format!("conv {:?}", self.s)
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let s = &self.s;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let (x, w) = (
            uniform(&mut rng, s.in_len()),
            uniform(&mut rng, s.weight_len()),
        );
        let dy = uniform(&mut rng, s.out_len());
        let (dw0, dx0) = (
            uniform(&mut rng, s.weight_len()),
            uniform(&mut rng, s.in_len()),
        );
        let (x, w, dy) = (eng.upload(&x)?, eng.upload(&w)?, eng.upload(&dy)?);
        let mut y = eng.upload(&vec![f32::NAN; s.out_len()])?;
        eng.conv2d_forward(s, eng.all(&x), eng.all(&w), eng.all_mut(&mut y))?;
        let (mut dw, mut dx, mut dw_only) =
            (eng.upload(&dw0)?, eng.upload(&dx0)?, eng.upload(&dw0)?);
        for (dw, dx) in [(&mut dw, Some(&mut dx)), (&mut dw_only, None)] {
            let grads = ConvBackward {
                x: eng.all(&x),
                w: eng.all(&w),
                dy: eng.all(&dy),
                dw: eng.all_mut(dw),
                dx: dx.map(|dx| eng.all_mut(dx)),
            };
            eng.conv2d_backward(s, grads)?;
        }
        let tol = Tolerance::RelL2(self.tol);
        Ok(vec![
            Output::new("y", &eng.download(eng.all(&y))?, tol),
            Output::new("dw", &eng.download(eng.all(&dw))?, tol),
            Output::new("dx", &eng.download(eng.all(&dx))?, tol),
            Output::new("dw (no dx)", &eng.download(eng.all(&dw_only))?, tol),
        ])
    }
}

/// Shapes of ResNet-18's convolutions at small sizes, odd sides, and one large enough to be
/// cut into several chunks of images (64 channels, 3x3 at 56x56, 40 images).
fn conv_shapes() -> Vec<Conv2d> {
    vec![
        Conv2d::new(2, (3, 8), (13, 11), (7, 2, 3)),
        Conv2d::new(3, (8, 8), (9, 9), (3, 1, 1)),
        Conv2d::new(3, (8, 16), (9, 7), (3, 2, 1)),
        Conv2d::new(3, (8, 16), (9, 9), (1, 2, 0)),
        Conv2d::new(4, (16, 8), (5, 5), (1, 1, 0)),
        Conv2d::new(1, (1, 1), (1, 1), (1, 1, 0)),
        Conv2d::new(2, (4, 4), (2, 2), (3, 1, 1)),
        Conv2d::new(40, (64, 64), (56, 56), (3, 1, 1)),
    ]
}

#[test]
fn conv2d_matches_cpu_twin() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    for (i, s) in conv_shapes().into_iter().enumerate() {
        twin.check(&ConvCase {
            s,
            seed: 100 + i as u64,
            tol: 1e-5,
        })?;
    }
    Ok(())
}

#[test]
fn conv2d_tf32_and_bf16_stay_close() -> Result<()> {
    for (mode, tol) in [(MatmulMode::Tf32, 1e-2), (MatmulMode::Bf16, 5e-2)] {
        let s = Conv2d::new(8, (32, 64), (28, 28), (3, 1, 1));
        Twin::new(mode).check(&ConvCase { s, seed: 7, tol })?;
    }
    Ok(())
}

/// Forward and backward of one linear layer, with and without the ReLU.
struct LinearCase {
    s: Linear,
    relu: bool,
    seed: u64,
}

impl Case for LinearCase {
    fn name(&self) -> String {
        format!("linear {:?} relu={}", self.s, self.relu)
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let (s, relu) = (&self.s, self.relu);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let x = uniform(&mut rng, s.in_features * s.batch);
        let wb = uniform(&mut rng, s.param_len());
        let dy = uniform(&mut rng, s.out_features * s.batch);
        let (dwb0, dx0) = (uniform(&mut rng, s.param_len()), uniform(&mut rng, x.len()));
        let (x, wb) = (eng.upload(&x)?, eng.upload(&wb)?);
        let mut y = eng.upload(&vec![f32::NAN; dy.len()])?;
        let forward = LinearForward {
            x: eng.all(&x),
            wb: eng.all(&wb),
            relu,
            y: eng.all_mut(&mut y),
        };
        eng.linear_forward(s, forward)?;
        let (mut dy, mut dwb, mut dx) = (eng.upload(&dy)?, eng.upload(&dwb0)?, eng.upload(&dx0)?);
        let backward = LinearBackward {
            x: eng.all(&x),
            wb: eng.all(&wb),
            relu_out: relu.then(|| eng.all(&y)),
            dy: eng.all_mut(&mut dy),
            dwb: eng.all_mut(&mut dwb),
            dx: Some(eng.all_mut(&mut dx)),
        };
        eng.linear_backward(s, backward)?;
        Ok(vec![
            Output::new("y", &eng.download(eng.all(&y))?, Tolerance::RelL2(1e-5)),
            Output::new(
                "masked dy",
                &eng.download(eng.all(&dy))?,
                Tolerance::RelL2(1e-7),
            ),
            Output::new("dwb", &eng.download(eng.all(&dwb))?, Tolerance::RelL2(1e-5)),
            Output::new("dx", &eng.download(eng.all(&dx))?, Tolerance::RelL2(1e-5)),
        ])
    }
}

#[test]
fn linear_matches_cpu_twin() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    let shapes = [
        (6, 10, 7),
        (1, 1, 1),
        (33, 5, 70),
        (256, 512, 512),
        (128, 512, 128),
    ];
    for (i, (batch, in_features, out_features)) in shapes.into_iter().enumerate() {
        let s = Linear {
            batch,
            in_features,
            out_features,
        };
        for relu in [false, true] {
            twin.check(&LinearCase {
                s,
                relu,
                seed: 200 + i as u64,
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Batch norm.
// ---------------------------------------------------------------------------------------

/// Batch norm shapes `(C, M)`: C = 1, tiny rows, rows not multiples of 4, of the block or of a
/// chunk, several chunks, and the reference model's C=64, M=2*56*56 and C=512, M=2*7*7.
const BN_SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (1, 5),
    (3, 7),
    (2, 4097),
    (1, 3 * 4096 + 1),
    (5, 8195),
    (64, 2 * 56 * 56),
    (512, 2 * 7 * 7),
    (7, 100_003),
];

/// Offsets of the views (x, second input, output): equal offsets take the float4 path where
/// the row allows, different ones the scalar path.
const BN_OFFSETS: [[usize; 3]; 3] = [[0, 0, 0], [1, 1, 1], [1, 2, 3]];

/// Statistics in f64 on both sides, summed in different orders; the elementwise passes round
/// alike.
const BN_TOL: Tolerance = Tolerance::PeakOrOne(1e-5);

fn bn(c: usize, m: usize) -> BatchNorm {
    BatchNorm {
        channels: c,
        per_channel: m,
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// Inputs of one batch norm: x with a per-channel offset (so the mean is far from 0), affine,
/// residual, running statistics.
fn bn_inputs(rng: &mut ChaCha8Rng, c: usize, m: usize) -> [Vec<f32>; 4] {
    let x: Vec<f32> = (0..c)
        .flat_map(|ch| around(rng, m, 3.0 + ch as f32 * 0.01, 0.5))
        .collect();
    let mut affine = around(rng, c, 1.0, 0.5);
    affine.extend(around(rng, c, 0.0, 0.5));
    let residual = around(rng, c * m, 0.0, 1.0);
    let mut running = around(rng, c, 0.0, 0.1);
    running.extend(around(rng, c, 1.0, 0.1));
    [x, affine, residual, running]
}

/// The three batch norm ops on one shape, views at `offsets`.
struct BnCase {
    c: usize,
    m: usize,
    seed: u64,
    offsets: [usize; 3],
    residual: bool,
    relu: bool,
}

impl BnCase {
    /// The training forward on `eng`, views at the case's offsets: the padded output buffer,
    /// the saved statistics and the updated running statistics.
    fn train_forward<E: Engine>(&self, eng: &E, inputs: &[Vec<f32>; 4]) -> Result<[E::Buf; 3]> {
        let (s, n) = (bn(self.c, self.m), self.c * self.m);
        let [ox, or, oy] = self.offsets;
        let [x, affine, residual, running] = inputs;
        let (xb, ab, rb) = (
            place(eng, x, ox)?,
            eng.upload(affine)?,
            place(eng, residual, or)?,
        );
        let (mut y, mut saved, mut run) = (
            place(eng, &vec![0.0; n], oy)?,
            eng.upload(&vec![f32::NAN; 2 * self.c])?,
            eng.upload(running)?,
        );
        let train = BnForward {
            x: eng.view(&xb, ox..ox + n),
            affine: eng.all(&ab),
            residual: self.residual.then(|| eng.view(&rb, or..or + n)),
            relu: self.relu,
            y: eng.view_mut(&mut y, oy..oy + n),
            stats: BnStats::Batch {
                saved: eng.all_mut(&mut saved),
                running: eng.all_mut(&mut run),
            },
        };
        eng.batchnorm_forward(&s, train)?;
        Ok([y, saved, run])
    }
}

impl Case for BnCase {
    fn name(&self) -> String {
        format!(
            "bn C={} M={} offsets={:?} residual={} relu={}",
            self.c, self.m, self.offsets, self.residual, self.relu
        )
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let (c, m, relu) = (self.c, self.m, self.relu);
        let (s, n) = (bn(c, m), c * m);
        let [ox, or, oy] = self.offsets;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let inputs = bn_inputs(&mut rng, c, m);
        let grad = around(&mut rng, n, 0.0, 1.0);
        let daffine0 = around(&mut rng, 2 * c, 0.0, 1.0);
        let [y, saved, run] = self.train_forward(eng, &inputs)?;

        let [x, affine, residual, running] = &inputs;
        let (xb, ab, rb) = (
            place(eng, x, ox)?,
            eng.upload(affine)?,
            place(eng, residual, or)?,
        );
        let running = eng.upload(running)?;
        let mut y_eval = place(eng, &vec![0.0; n], oy)?;
        let eval = BnForward {
            x: eng.view(&xb, ox..ox + n),
            affine: eng.all(&ab),
            residual: self.residual.then(|| eng.view(&rb, or..or + n)),
            relu,
            y: eng.view_mut(&mut y_eval, oy..oy + n),
            stats: BnStats::Running(eng.all(&running)),
        };
        eng.batchnorm_forward(&s, eval)?;

        // The backward from a random output gradient, its forward's outputs the same on every
        // engine: the CPU twin's.
        let [y_cpu, saved_cpu, _] = self.train_forward(&CpuEngine, &inputs)?;
        let (y_fwd, saved_fwd) = (eng.upload(&y_cpu)?, eng.upload(&saved_cpu)?);
        let (mut dy, mut dx, mut daffine) = (
            place(eng, &grad, or)?,
            place(eng, &vec![f32::NAN; n], oy)?,
            eng.upload(&daffine0)?,
        );
        let backward = BnBackward {
            x: eng.view(&xb, ox..ox + n),
            affine: eng.all(&ab),
            saved: eng.all(&saved_fwd),
            relu_out: relu.then(|| eng.view(&y_fwd, oy..oy + n)),
            dy: eng.view_mut(&mut dy, or..or + n),
            dx: eng.view_mut(&mut dx, oy..oy + n),
            daffine: eng.all_mut(&mut daffine),
        };
        eng.batchnorm_backward(&s, backward)?;
        Ok(vec![
            Output::new("train y", &fetch(eng, &y, oy, n)?, BN_TOL),
            Output::new("saved", &eng.download(eng.all(&saved))?, BN_TOL),
            Output::new("running", &eng.download(eng.all(&run))?, BN_TOL),
            // The same f32 operations in the same order: bit-identical.
            Output::new("eval y", &fetch(eng, &y_eval, oy, n)?, Tolerance::Bits),
            Output::new("masked dy", &fetch(eng, &dy, or, n)?, Tolerance::Bits),
            Output::new("dx", &fetch(eng, &dx, oy, n)?, BN_TOL),
            Output::new("daffine", &eng.download(eng.all(&daffine))?, BN_TOL),
        ])
    }
}

#[test]
fn batchnorm_matches_cpu_twin() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    for (i, (c, m)) in BN_SHAPES.into_iter().enumerate() {
        for offsets in BN_OFFSETS {
            for (residual, relu) in [(false, false), (true, true), (true, false), (false, true)] {
                twin.check(&BnCase {
                    c,
                    m,
                    seed: 0xb17 + i as u64,
                    offsets,
                    residual,
                    relu,
                })?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pooling.
// ---------------------------------------------------------------------------------------

/// Max pool windows `(planes, h, w, kernel, stride, pad)`: 1x1, odd sizes, overlapping
/// windows with padding (the ResNet stem's 3/2/1, at 112x112), disjoint windows, stride 1.
const MAXPOOL_SHAPES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 1, 0),
    (3, 5, 7, 3, 2, 1),
    (4, 9, 9, 2, 2, 0),
    (2, 6, 5, 3, 1, 1),
    (3, 8, 8, 3, 3, 0),
    (5, 13, 11, 5, 2, 2),
    (2 * 64, 112, 112, 3, 2, 1),
];

/// Max pooling forward and backward, views at `offsets` (input, output gradient, outputs).
struct MaxPoolCase {
    s: MaxPool,
    ties: bool,
    offsets: [usize; 3],
    seed: u64,
}

impl Case for MaxPoolCase {
    fn name(&self) -> String {
        format!(
            "maxpool {:?} ties={} offsets={:?}",
            self.s, self.ties, self.offsets
        )
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let s = &self.s;
        let [ox, og, oo] = self.offsets;
        let (n_in, n_out) = (s.planes * s.in_h * s.in_w, s.planes * s.out_h() * s.out_w());
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        // Values on a coarse grid, many of them negative: ties in most windows, and padding
        // (which would win as a 0) must never win.
        let x: Vec<f32> = (0..n_in)
            .map(|_| {
                if self.ties {
                    rng.random_range(-3i32..=0) as f32
                } else {
                    rng.random_range(-1.0f32..1.0)
                }
            })
            .collect();
        let dy = around(&mut rng, n_out, 0.0, 1.0);
        let (xb, dyb) = (place(eng, &x, ox)?, place(eng, &dy, og)?);
        let (mut y, mut dx) = (
            place(eng, &vec![f32::NAN; n_out], oo)?,
            place(eng, &vec![f32::NAN; n_in], oo)?,
        );
        let xv = eng.view(&xb, ox..ox + n_in);
        eng.maxpool_forward(s, xv, eng.view_mut(&mut y, oo..oo + n_out))?;
        let dyv = eng.view(&dyb, og..og + n_out);
        eng.maxpool_backward(s, xv, dyv, eng.view_mut(&mut dx, oo..oo + n_in))?;
        Ok(vec![
            Output::new("y", &fetch(eng, &y, oo, n_out)?, Tolerance::Bits),
            Output::new("dx", &fetch(eng, &dx, oo, n_in)?, Tolerance::Bits),
        ])
    }
}

#[test]
fn maxpool_matches_cpu_twin_bit_for_bit() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    for (i, (planes, in_h, in_w, kernel, stride, pad)) in MAXPOOL_SHAPES.into_iter().enumerate() {
        let s = MaxPool::new(planes, (in_h, in_w), (kernel, stride, pad));
        for ties in [true, false] {
            for offsets in [[0, 0, 0], [1, 3, 2]] {
                let seed = 0x9001 + i as u64;
                twin.check(&MaxPoolCase {
                    s,
                    ties,
                    offsets,
                    seed,
                })?;
            }
        }
    }
    Ok(())
}

/// Global average pooling forward and backward, views at `offsets`.
struct AvgPoolCase {
    s: AvgPool,
    offsets: [usize; 3],
    seed: u64,
}

impl Case for AvgPoolCase {
    fn name(&self) -> String {
        format!("avgpool {:?} offsets={:?}", self.s, self.offsets)
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let (s, [ox, og, oo]) = (&self.s, self.offsets);
        let (planes, n) = (s.planes, s.planes * s.spatial);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let (x, dy) = (
            around(&mut rng, n, 0.5, 1.0),
            around(&mut rng, planes, 0.0, 1.0),
        );
        let (xb, dyb) = (place(eng, &x, ox)?, place(eng, &dy, og)?);
        let (mut y, mut dx) = (
            place(eng, &vec![f32::NAN; planes], oo)?,
            place(eng, &vec![f32::NAN; n], oo)?,
        );
        eng.avgpool_forward(
            s,
            eng.view(&xb, ox..ox + n),
            eng.view_mut(&mut y, oo..oo + planes),
        )?;
        let dyv = eng.view(&dyb, og..og + planes);
        eng.avgpool_backward(s, dyv, eng.view_mut(&mut dx, oo..oo + n))?;
        Ok(vec![
            Output::new("y", &fetch(eng, &y, oo, planes)?, Tolerance::Bits),
            Output::new("dx", &fetch(eng, &dx, oo, n)?, Tolerance::Bits),
        ])
    }
}

#[test]
fn avgpool_matches_cpu_twin_bit_for_bit() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    // (planes, spatial): tiny, the reference C*N = 512*128 planes of 7x7, large planes.
    for (planes, spatial) in [(1, 1), (7, 49), (512 * 128, 49), (3, 112 * 112 + 1)] {
        for offsets in [[0, 0, 0], [1, 3, 2]] {
            let s = AvgPool { planes, spatial };
            twin.check(&AvgPoolCase {
                s,
                offsets,
                seed: 0xa9,
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The losses.
// ---------------------------------------------------------------------------------------

/// Loss shapes `(n, dim)`: 2n from 2 to 400 rows (partial blocks of columns, several blocks,
/// rows longer than a block), dims that are not multiples of the 32 feature groups, and the
/// reference 2n = 256 rows of 512.
const LOSS_SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (2, 3),
    (5, 33),
    (17, 64),
    (37, 100),
    (128, 512),
    (200, 129),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    NtXent,
    Cohesion,
}

/// One loss with its gradients (outputs NaN-poisoned first).
struct LossCase {
    loss: Loss,
    shape: usize,
    t: f32,
    seed: u64,
}

impl Case for LossCase {
    fn name(&self) -> String {
        let (n, dim) = LOSS_SHAPES[self.shape];
        format!("{:?} 2n={} dim={dim} T={}", self.loss, 2 * n, self.t)
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let (n, dim) = LOSS_SHAPES[self.shape];
        let s = ViewPair { dim, n };
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut z_i = uniform(&mut rng, dim * n);
        // The second view near the first, as two augmentations of one patch are.
        let mut z_j: Vec<f32> = z_i
            .iter()
            .map(|&x| x + 0.5 * rng.random_range(-1.0f32..1.0))
            .collect();
        if self.shape % 2 == 1 {
            // A zero sample: its norm floor is active (f = 0, and no projection).
            for k in 0..dim {
                z_i[k * n] = 0.0;
            }
        }
        if self.shape == 4 {
            // Large-norm samples, as an untrained projector can give.
            z_j.iter_mut().for_each(|x| *x *= 40.0);
        }
        let (z_i, z_j) = (eng.upload(&z_i)?, eng.upload(&z_j)?);
        let poison = vec![f32::NAN; dim * n];
        let (mut dz_i, mut dz_j) = (eng.upload(&poison)?, eng.upload(&poison)?);
        let views = LossViews {
            z_i: eng.all(&z_i),
            z_j: eng.all(&z_j),
            dz_i: eng.all_mut(&mut dz_i),
            dz_j: eng.all_mut(&mut dz_j),
        };
        let value = match self.loss {
            Loss::NtXent => eng.ntxent(&s, self.t, views)?,
            Loss::Cohesion => eng.cohesion(&s, self.t, views)?,
        };
        // Both run the softmax in f64; the products (cuBLAS on the GPU) and f are f32.
        let tol = match self.loss {
            Loss::NtXent => 1e-4,
            Loss::Cohesion => 1e-5,
        };
        let grad = Tolerance::Columns { n, tol };
        Ok(vec![
            Output::new("loss", &[value], Tolerance::Relative { floor: 1.0, tol }),
            Output::new("dz_i", &eng.download(eng.all(&dz_i))?, grad),
            Output::new("dz_j", &eng.download(eng.all(&dz_j))?, grad),
        ])
    }
}

fn loss_matches_cpu_twin(loss: Loss, seed: u64) -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    for shape in 0..LOSS_SHAPES.len() {
        for t in [0.07f32, 0.5] {
            twin.check(&LossCase {
                loss,
                shape,
                t,
                seed: seed + shape as u64,
            })?;
        }
    }
    Ok(())
}

#[test]
fn ntxent_matches_cpu_twin() -> Result<()> {
    loss_matches_cpu_twin(Loss::NtXent, 0x47e47)
}

#[test]
fn cohesion_matches_cpu_twin() -> Result<()> {
    loss_matches_cpu_twin(Loss::Cohesion, 0xc0e5)
}

// ---------------------------------------------------------------------------------------
// Gradient surgery and SGD over the flat buffers.
// ---------------------------------------------------------------------------------------

/// Sizes of the flat-buffer passes: tiny, not multiples of 4 or of the block, several grids'
/// worth, and the reference model's 11,701,824 parameters.
const FLAT_SIZES: [usize; 7] = [1, 3, 1000, 4097, 70_001, (1 << 20) + 7, 11_701_824];

/// View offsets (in floats) of the buffers of one launch: equal offsets take the scalar head
/// + float4 path, different ones the all-scalar path.
const OFFSETS: [[usize; 4]; 3] = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 2, 1, 3]];

/// Values of a gradient-like buffer, a few of them subnormal (which must not be flushed).
fn gradient_like(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x: f32 = rng.random_range(-1.0..1.0);
            if i % 97 == 5 { x * 1e-39 } else { x * 1e-2 }
        })
        .collect()
}

/// The three inner products, the fused update and the combination over `n` values at
/// `offsets` (g1, g2, params or output, momentum).
struct UpdateCase {
    n: usize,
    offsets: [usize; 4],
    seed: u64,
}

impl Case for UpdateCase {
    fn name(&self) -> String {
        format!("update n={} offsets={:?}", self.n, self.offsets)
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let (n, [o1, o2, op, om]) = (self.n, self.offsets);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let host: Vec<Vec<f32>> = (0..4).map(|_| gradient_like(&mut rng, n + 3)).collect();
        // The inner products on g1 and g2 partly opposed to it, as conflicting task
        // gradients are; relative to |g1|^2, |g2|^2 and |g1||g2|, from the inputs.
        let g1 = uniform(&mut rng, n + 3);
        let g2: Vec<f32> = g1
            .iter()
            .map(|&x| -0.3 * x + rng.random_range(-1.0..1.0))
            .collect();
        let square = |g: &[f32]| g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        let (a, b) = (square(&g1[o1..o1 + n]), square(&g2[o2..o2 + n]));
        let (d1, d2) = (eng.upload(&g1)?, eng.upload(&g2)?);
        let dots = eng.grad_dots(eng.view(&d1, o1..o1 + n), eng.view(&d2, o2..o2 + n))?;
        let nonzero = |x: f64| if x == 0.0 { 1.0 } else { x };
        let scaled = |scale| Tolerance::Scaled { scale, tol: 1e-9 };

        let u = SgdUpdate {
            alpha: 0.83,
            beta: 1.17,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        let (h1, h2) = (eng.upload(&host[0])?, eng.upload(&host[1])?);
        let (mut p, mut m) = (eng.upload(&host[2])?, eng.upload(&host[3])?);
        let buffers = SgdBuffers {
            g1: eng.view(&h1, o1..o1 + n),
            g2: eng.view(&h2, o2..o2 + n),
            params: eng.view_mut(&mut p, op..op + n),
            momentum: eng.view_mut(&mut m, om..om + n),
        };
        eng.sgd_step(&u, buffers)?;
        // NaN-filled: an element the kernel fails to write shows up.
        let mut out = eng.upload(&vec![f32::NAN; n + 3])?;
        let (g1v, g2v) = (eng.view(&h1, o1..o1 + n), eng.view(&h2, o2..o2 + n));
        eng.combine_grads((0.83, -1.17), g1v, g2v, eng.view_mut(&mut out, op..op + n))?;
        Ok(vec![
            Output::f64("g1.g2", vec![dots.g1g2], scaled(nonzero((a * b).sqrt()))),
            Output::f64("|g1|^2", vec![dots.g1g1], scaled(nonzero(a))),
            Output::f64("|g2|^2", vec![dots.g2g2], scaled(nonzero(b))),
            Output::new("params", &eng.download(eng.all(&p))?, Tolerance::Bits),
            Output::new("momentum", &eng.download(eng.all(&m))?, Tolerance::Bits),
            Output::new("combined", &fetch(eng, &out, op, n)?, Tolerance::Bits),
        ])
    }
}

#[test]
fn update_ops_match_cpu_twin() -> Result<()> {
    let twin = Twin::new(MatmulMode::Exact);
    for (i, n) in FLAT_SIZES.into_iter().enumerate() {
        for offsets in OFFSETS {
            twin.check(&UpdateCase {
                n,
                offsets,
                seed: 0x5eed + i as u64,
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shape errors.
// ---------------------------------------------------------------------------------------

/// Fails unless `r` is an error whose message contains `needle`.
fn refused(r: Result<impl std::fmt::Debug>, needle: &str) -> Result<()> {
    match r {
        Ok(v) => anyhow::bail!("accepted a bad shape ({v:?}); expected an error about {needle}"),
        Err(e) => {
            let msg = e.to_string();
            ensure!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
            Ok(())
        }
    }
}

/// Wrong lengths and empty batches are errors on every engine (never a launch), with a
/// message naming the buffer.
struct ShapeErrors;

impl Case for ShapeErrors {
    fn name(&self) -> String {
        "shape errors".into()
    }

    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>> {
        let s = bn(2, 10);
        let (x, short, affine) = (eng.zeros(20)?, eng.zeros(19)?, eng.zeros(4)?);
        let (mut y, mut saved, mut run) = (eng.zeros(20)?, eng.zeros(4)?, eng.zeros(4)?);
        let mut train = |x: &E::Buf, residual: Option<&E::Buf>| {
            let a = BnForward {
                x: eng.all(x),
                affine: eng.all(&affine),
                residual: residual.map(|r| eng.all(r)),
                relu: false,
                y: eng.all_mut(&mut y),
                stats: BnStats::Batch {
                    saved: eng.all_mut(&mut saved),
                    running: eng.all_mut(&mut run),
                },
            };
            eng.batchnorm_forward(&s, a)
        };
        refused(train(&short, None), "batch norm input")?;
        refused(train(&x, Some(&short)), "residual")?;
        let eval = |s: &BatchNorm, len: usize, running: &E::Buf, y: &mut E::Buf| {
            let a = BnForward {
                x: eng.view(&x, 0..len),
                affine: eng.view(&affine, 0..2 * s.channels),
                residual: None,
                relu: false,
                y: eng.view_mut(y, 0..len),
                stats: BnStats::Running(eng.all(running)),
            };
            eng.batchnorm_forward(s, a)
        };
        refused(eval(&s, 20, &short, &mut y), "running")?;
        let empty = BatchNorm {
            per_channel: 0,
            channels: 0,
            ..s
        };
        refused(eval(&empty, 0, &eng.zeros(0)?, &mut y), "empty")?;
        let (mut dy, mut dx, mut daffine) = (eng.zeros(20)?, eng.zeros(20)?, eng.zeros(3)?);
        let backward = BnBackward {
            x: eng.all(&x),
            affine: eng.all(&affine),
            saved: eng.all(&saved),
            relu_out: None,
            dy: eng.all_mut(&mut dy),
            dx: eng.all_mut(&mut dx),
            daffine: eng.all_mut(&mut daffine),
        };
        refused(eng.batchnorm_backward(&s, backward), "parameter gradient")?;

        let pool = MaxPool::new(2, (4, 5), (3, 2, 1));
        let (px, mut py, mut pdx) = (eng.zeros(40)?, eng.zeros(2 * 2 * 3)?, eng.zeros(40)?);
        refused(
            eng.maxpool_forward(&pool, eng.view(&px, 0..39), eng.all_mut(&mut py)),
            "max pool input",
        )?;
        let dy11 = eng.view(&py, 0..11);
        refused(
            eng.maxpool_backward(&pool, eng.all(&px), dy11, eng.all_mut(&mut pdx)),
            "max pool output gradient",
        )?;
        let avg = AvgPool {
            planes: 4,
            spatial: 10,
        };
        let mut ay = eng.zeros(4)?;
        refused(
            eng.avgpool_forward(&avg, eng.view(&px, 0..39), eng.all_mut(&mut ay)),
            "average pool input",
        )?;
        refused(
            eng.avgpool_backward(&avg, eng.all(&ay), eng.view_mut(&mut pdx, 0..39)),
            "average pool input gradient",
        )?;

        let (a, mut b, mut c) = (
            eng.upload(&[1.0; 12])?,
            eng.upload(&[1.0; 12])?,
            eng.upload(&[1.0; 11])?,
        );
        refused(eng.grad_dots(eng.all(&a), eng.all(&c)), "second gradient")?;
        let views = LossViews {
            z_i: eng.view(&a, 0..6),
            z_j: eng.view(&a, 6..12),
            dz_i: eng.view_mut(&mut b, 0..6),
            dz_j: eng.view_mut(&mut c, 0..5),
        };
        refused(
            eng.cohesion(&ViewPair { dim: 3, n: 2 }, 0.5, views),
            "dz_j: expected 6 values, got 5",
        )?;
        Ok(Vec::new())
    }
}

#[test]
fn shape_errors_are_reported_by_every_engine() -> Result<()> {
    Twin::new(MatmulMode::Exact).check(&ShapeErrors)
}

/// Shapes beyond what the CUDA kernels take are errors there, naming the limit.
#[test]
fn cuda_kernel_limits_are_reported() -> Result<()> {
    use slam_ags::engine::prelude::*;
    let twin = Twin::new(MatmulMode::Exact);
    let Some(eng) = twin.cuda() else {
        return Ok(());
    };
    let wide = bn(65_536, 1);
    let (x, affine) = (
        Backend::zeros(eng, 65_536)?,
        Backend::zeros(eng, 2 * 65_536)?,
    );
    let mut y = Backend::zeros(eng, 65_536)?;
    let eval = BnForward {
        x: eng.all(&x),
        affine: eng.all(&affine),
        residual: None,
        relu: false,
        y: eng.all_mut(&mut y),
        stats: BnStats::Running(eng.all(&affine)),
    };
    refused(eng.batchnorm_forward(&wide, eval), "65535")?;
    let pool = MaxPool::new(2, (4, 5), (3, 2, 1));
    let (px, mut py) = (Backend::zeros(eng, 40)?, Backend::zeros(eng, 2 * 2 * 3)?);
    let padded = MaxPool { pad: 2, ..pool };
    refused(
        eng.maxpool_forward(&padded, eng.all(&px), eng.all_mut(&mut py)),
        "padding",
    )?;
    let large = MaxPool { kernel: 9, ..pool };
    refused(
        eng.maxpool_forward(&large, eng.all(&px), eng.all_mut(&mut py)),
        "larger than",
    )
}
