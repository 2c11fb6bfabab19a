//! Finite-difference gradient checks: every layer's backward and both losses on the CPU
//! engine, the whole network end to end, and the trainer's two task gradients
//! (`cargo test --release gradcheck -- --nocapture` prints every error measured).
//!
//! Method. An op's output `y` is reduced to a scalar `L = sum r y` with a fixed random `r`
//! (accumulated in f64), so its backward pass runs with `dy = r`; the losses are scalars
//! already. The analytic directional derivative `h <grad, d>` is compared with a finite
//! difference of `L` along several directions `d`: the gradient's own direction (the
//! strongest test: it fails unless the gradient is parallel to the true one and of the
//! right length), random directions, and every coordinate of small tensors. The difference
//! is Richardson's combination of the central differences at `h` and `h/2`,
//! `(8 (L(x + h/2 d) - L(x - h/2 d)) - (L(x + h d) - L(x - h d))) / 6`, whose relative
//! error is `O(h^4)` (batch norm over three values per channel is curved enough for the
//! plain central difference to miss by a few percent); for f32 inputs the analytic side
//! uses the points as rounded. The error of one direction is
//! `|fd - an| / max(|fd|, |an|, typical)`, where `typical = h max(|grad * d|, rms(grad) |d|)`
//! is the size a random direction's derivative has, so that a derivative that happens to be
//! near zero is not judged by rounding alone.
//!
//! Tolerance: every check is held to [`TOL`] = 1e-2. Measured at the seeds below: at most
//! 6e-4 in the layer checks and 1.5e-4 end to end; over 40 other seeds for every case, at
//! most 4.6e-3 and 1.4e-3, with no direction skipped. Each of 23 deliberate bugs tried in
//! the engine and the model (a missing batch-norm term, a forgotten gamma, `<` for `<=` in
//! a ReLU mask, an unaccumulated gradient, a transposed weight, a lost shortcut gradient,
//! an unzeroed task gradient, ...) failed at least one test.
//!
//! Layers: through the engine in f32. Ops linear in the checked input take a large step
//! (the difference is then exact up to rounding), the smooth ones 1% of the input's spread.
//! Kinks: a step that moves a ReLU input across zero would make the difference wrong through
//! no fault of the backward pass, so the objective reports its pattern of kinks (ReLU masks,
//! max-pool argmaxes) and a step is halved until the pattern at all four points equals the
//! one at `x` (a direction that finds none within [`SHRINKS`] halvings is skipped, at most
//! half of them). Max-pool inputs are distinct values spaced further apart than the step.
//! The losses are also differenced in f64 from their definition.
//!
//! End to end: a ten-layer network in f32 with batch norms over three or four values rounds
//! its loss at a few 1e-7 relative, and its thousands of ReLUs leave kink-free steps of
//! about 1e-5 along a direction that moves every parameter: f32 differences cannot resolve
//! such derivatives to 1% (they miss by up to 10%). So the objective of these checks is a
//! float64 reference of the network and losses, written here from their definition with
//! direct loops (and held to the engine's forward pass), differenced with steps of 1e-6 of
//! each tensor's scale; the analytic side is the engine's own `forward_train`, loss gradient
//! and `backward`.
//!
//! Outputs that the engine accumulates (`+=`) start from random values and are checked as
//! `after - before`, after asserting that this equals a run started from zero; outputs the
//! engine writes (`=`) start as NaN, so that an element left unwritten fails.

mod common;

use std::ops::Range;

use common::reference::{self, rows_of_views};
use common::{net, uniform_in};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use slam_ags::data::input::batch::HostBatch;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{
    AvgPool, BatchNorm, BnBackward, BnForward, BnStats, Conv2d, ConvBackward, Linear,
    LinearBackward, LinearForward, LossViews, MaxPool, ViewPair,
};
use slam_ags::model::network::{BnParams, ConvParams, LinearParams};
use slam_ags::model::weak::bce;
use slam_ags::model::{
    Activations, ModelState, NetConfig, Network, StepBatch, StepConfig, Surgery, Trainer, WeakHead,
};

/// Largest relative error accepted for one directional derivative.
const TOL: f64 = 1e-2;
/// A step whose points cross a kink is halved, at most this many times.
const SHRINKS: usize = 8;
const ENG: CpuEngine = CpuEngine;
const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

// ---------------------------------------------------------------------------------------
// The finite-difference machinery.
// ---------------------------------------------------------------------------------------

/// One evaluation of a scalar objective: its value and its pattern of kinks (ReLU masks,
/// max-pool argmaxes); empty for smooth objectives.
struct Eval {
    value: f64,
    pattern: Vec<u32>,
}

impl Eval {
    fn smooth(value: f64) -> Self {
        Self {
            value,
            pattern: Vec::new(),
        }
    }

    /// `sum r y`, with the ReLU mask of `y` as pattern when `relu`.
    fn weighted(r: &[f32], y: &[f32], relu: bool) -> Self {
        Self {
            value: dot(r, y),
            pattern: if relu { relu_mask(y) } else { Vec::new() },
        }
    }
}

fn relu_mask<T: Copy + Into<f64>>(y: &[T]) -> Vec<u32> {
    y.iter().map(|&v| (v.into() > 0.0) as u32).collect()
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn normal(rng: &mut ChaCha8Rng, len: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..len)
        .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

fn rms(a: &[f32]) -> f32 {
    (norm(a) / (a.len() as f64).sqrt()) as f32
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `|a - b| / |b|`.
fn rel_diff<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut base) = (0.0f64, 0.0f64);
    for (&a, &b) in a.iter().zip(b) {
        let (a, b) = (a.into(), b.into());
        diff += (a - b).powi(2);
        base += b * b;
    }
    (diff / base.max(f64::MIN_POSITIVE)).sqrt()
}

/// Directions for a tensor with gradient `grad`: the gradient's own (scaled to max-abs 1),
/// `random` uniform ones in `[-1, 1]`, and every coordinate when there are at most
/// `coords_upto` of them.
fn directions(
    rng: &mut ChaCha8Rng,
    grad: &[f32],
    random: usize,
    coords_upto: usize,
) -> Vec<Vec<f32>> {
    let mut dirs = Vec::new();
    let max = grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    if max > 0.0 {
        dirs.push(grad.iter().map(|g| g / max).collect());
    }
    dirs.extend((0..random).map(|_| uniform_in(rng, grad.len(), -1.0, 1.0)));
    if grad.len() <= coords_upto {
        for i in 0..grad.len() {
            let mut e = vec![0.0; grad.len()];
            e[i] = 1.0;
            dirs.push(e);
        }
    }
    dirs
}

/// Checks the analytic gradient `grad` of the engine objective `f` at `x` along each of
/// `dirs` with step `h` (halved while it crosses a kink; see the top of the file). Prints and
/// returns the largest relative error; panics above [`TOL`] or when more than half the
/// directions were skipped.
fn check(
    name: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    dirs: &[Vec<f32>],
    mut f: impl FnMut(&[f32]) -> Eval,
) -> f64 {
    check_points(name, x, grad, h, dirs, true, |p| f(&to_f32(p)))
}

/// [`check`] for an objective of f64 inputs.
fn check_f64(
    name: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    dirs: &[Vec<f32>],
    f: impl FnMut(&[f64]) -> Eval,
) -> f64 {
    check_points(name, x, grad, h, dirs, false, f)
}

/// The difference is `sum w L(x + t h d)` over these `(t, w)`: Richardson's combination of
/// the central differences at `h` and `h/2`, `h L'(x) + O(h^5)`.
const STENCIL: [(f64, f64); 4] = [
    (1.0, -1.0 / 6.0),
    (-1.0, 1.0 / 6.0),
    (0.5, 8.0 / 6.0),
    (-0.5, -8.0 / 6.0),
];

fn check_points(
    name: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    dirs: &[Vec<f32>],
    round_to_f32: bool,
    mut f: impl FnMut(&[f64]) -> Eval,
) -> f64 {
    assert_eq!(grad.len(), x.len(), "{name}: gradient and input lengths");
    assert!(
        grad.iter().all(|g| g.is_finite()),
        "{name}: gradient is not finite"
    );
    let x = to_f64(x);
    let point = |t: f64, d: &[f32]| -> Vec<f64> {
        x.iter()
            .zip(d)
            .map(|(&x, &d)| x + t * d as f64)
            .map(|v| if round_to_f32 { v as f32 as f64 } else { v })
            .collect()
    };
    let base = f(&x).pattern;
    // The RMS gradient over every element some direction moves.
    let group: Vec<f32> = (0..x.len())
        .filter(|&i| dirs.iter().any(|d| d[i] != 0.0))
        .map(|i| grad[i])
        .collect();
    let group_rms = rms(&group) as f64;
    let (mut worst, mut min_step, mut skipped) = (0.0f64, h as f64, 0);
    let mut failures = Vec::new();
    'directions: for (k, d) in dirs.iter().enumerate() {
        let mut step = h as f64;
        for _ in 0..=SHRINKS {
            let points = STENCIL.map(|(t, _)| point(t * step, d));
            let evals = points.each_ref().map(|p| f(p));
            if evals.iter().any(|e| e.pattern != base) {
                step /= 2.0;
                continue;
            }
            min_step = min_step.min(step);
            let (mut fd, mut an) = (0.0, 0.0);
            for (((_, w), p), e) in STENCIL.iter().zip(&points).zip(&evals) {
                fd += w * e.value;
                // The analytic side of the same combination, over the points as rounded.
                an += w * p
                    .iter()
                    .zip(&x)
                    .zip(grad)
                    .map(|((p, x), &g)| (p - x) * g as f64)
                    .sum::<f64>();
            }
            let terms: Vec<f32> = grad.iter().zip(d).map(|(g, d)| g * d).collect();
            let typical = step * norm(&terms).max(group_rms * norm(d));
            let err = (fd - an).abs() / fd.abs().max(an.abs()).max(typical);
            worst = worst.max(err);
            if err.is_nan() || err > TOL {
                failures.push(format!(
                    "direction {k}, step {step:.1e}: analytic {an:.6e}, finite difference \
                     {fd:.6e}, error {err:.2e}"
                ));
            }
            continue 'directions;
        }
        skipped += 1;
    }
    let used = dirs.len() - skipped;
    println!(
        "{name:<52} max rel err {worst:.2e} over {used:>3} directions \
         (smallest step {min_step:.1e}, {skipped} skipped at kinks)"
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {used} directional derivatives off by more than {TOL:.0e}:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert!(
        used > 0 && skipped * 2 <= dirs.len(),
        "{name}: {skipped} of {} directions found no kink-free step",
        dirs.len()
    );
    worst
}

/// The parameter and input gradients of a layer's `backward(dparams, Some(dx))` (its
/// accumulation checked by [`accumulated`]), and the parameter gradient of
/// `backward(dparams, None)`.
fn with_and_without_dx(
    rng: &mut ChaCha8Rng,
    name: &str,
    [param_len, in_len]: [usize; 2],
    mut backward: impl FnMut(&mut [f32], Option<&mut [f32]>),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut grads = accumulated(rng, name, &[param_len, in_len], |g| {
        let (dp, dx) = g.split_at_mut(1);
        backward(&mut dp[0], Some(&mut dx[0]));
    });
    let mut params_only = vec![0.0; param_len];
    backward(&mut params_only, None);
    let dx = grads.pop().expect("two gradients");
    (grads.pop().expect("two gradients"), dx, params_only)
}

/// Runs `op`, which accumulates into buffers of the given lengths, once from zero and once
/// from random starting values; asserts that the second run added what the first wrote, and
/// returns the first run's buffers (the gradients).
fn accumulated(
    rng: &mut ChaCha8Rng,
    name: &str,
    lens: &[usize],
    mut op: impl FnMut(&mut [Vec<f32>]),
) -> Vec<Vec<f32>> {
    let mut zero: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    op(&mut zero);
    let start: Vec<Vec<f32>> = zero
        .iter()
        .map(|g| {
            let scale = rms(g).max(1e-3);
            uniform_in(rng, g.len(), -scale, scale)
        })
        .collect();
    let mut from_start = start.clone();
    op(&mut from_start);
    for (i, ((g, s), a)) in zero.iter().zip(&start).zip(&from_start).enumerate() {
        let added: Vec<f32> = a.iter().zip(s).map(|(&a, &s)| a - s).collect();
        let diff: Vec<f32> = added.iter().zip(g).map(|(&a, &g)| a - g).collect();
        let err = norm(&diff) / (norm(g) + norm(s));
        assert!(
            err <= 1e-5,
            "{name}: output {i} does not accumulate: (after - before) differs from the \
             result from zero by {err:.2e}"
        );
    }
    zero
}

// ---------------------------------------------------------------------------------------
// Direct-loop references (f64), for the forward passes and the end-to-end objective.
// ---------------------------------------------------------------------------------------

/// Convolution of a `[Cin, N, H, W]` batch.
fn direct_conv(s: &Conv2d, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (oh, ow, k) = (s.out_h(), s.out_w(), s.kernel);
    let mut y = Vec::with_capacity(s.out_len());
    for co in 0..s.out_channels {
        for n in 0..s.batch {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..s.in_channels {
                        for ky in 0..k {
                            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                            if iy < 0 || iy >= s.in_h as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if ix < 0 || ix >= s.in_w as isize {
                                    continue;
                                }
                                let xi = ((ci * s.batch + n) * s.in_h + iy as usize) * s.in_w
                                    + ix as usize;
                                acc += x[xi] * w[((co * s.in_channels + ci) * k + ky) * k + kx];
                            }
                        }
                    }
                    y.push(acc);
                }
            }
        }
    }
    y
}

/// Training-mode batch norm of `channels` rows (biased batch variance), then the residual
/// and the ReLU; appends the ReLU mask to `pattern`.
/// Batch norm with the batch's statistics, or with `running` `[mean; var]` (eval mode).
fn direct_batchnorm(
    x: &[f64],
    channels: usize,
    affine: &[f64],
    running: Option<&[f64]>,
    residual: Option<&[f64]>,
    relu: bool,
    pattern: &mut Vec<u32>,
) -> Vec<f64> {
    let m = x.len() / channels;
    let mut y = Vec::with_capacity(x.len());
    for (c, row) in x.chunks(m).enumerate() {
        let batch_mean = row.iter().sum::<f64>() / m as f64;
        let batch_var = row.iter().map(|v| (v - batch_mean).powi(2)).sum::<f64>() / m as f64;
        let (mean, var) = running.map_or((batch_mean, batch_var), |r| (r[c], r[channels + c]));
        let invstd = 1.0 / (var + BN_EPS as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            let mut out = affine[c] * (v - mean) * invstd + affine[channels + c];
            out += residual.map_or(0.0, |r| r[c * m + i]);
            y.push(if relu { out.max(0.0) } else { out });
        }
    }
    if relu {
        pattern.extend(relu_mask(&y));
    }
    y
}

/// Max pool (padding never wins): the maxima and the index of each (the first maximum of
/// its window, row by row).
fn direct_maxpool<T: Copy + PartialOrd>(s: &MaxPool, x: &[T]) -> (Vec<T>, Vec<u32>) {
    let (mut y, mut arg) = (Vec::new(), Vec::new());
    for p in 0..s.planes {
        for oy in 0..s.out_h() {
            for ox in 0..s.out_w() {
                let mut best: Option<usize> = None;
                for ky in 0..s.kernel {
                    for kx in 0..s.kernel {
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                        if iy < 0 || ix < 0 || iy >= s.in_h as isize || ix >= s.in_w as isize {
                            continue;
                        }
                        let at = (p * s.in_h + iy as usize) * s.in_w + ix as usize;
                        if best.is_none_or(|b| x[at] > x[b]) {
                            best = Some(at);
                        }
                    }
                }
                let best = best.expect("a window inside the image");
                y.push(x[best]);
                arg.push(best as u32);
            }
        }
    }
    (y, arg)
}

/// `act(W x + b)` on a feature-major `[in, N]` batch; appends the ReLU mask to `pattern`.
fn direct_linear(
    p: &LinearParams,
    params: &[f64],
    x: &[f64],
    relu: bool,
    pattern: &mut Vec<u32>,
) -> Vec<f64> {
    let (fin, fout) = (p.in_features, p.out_features);
    let n = x.len() / fin;
    let wb = &params[p.weight_bias.clone()];
    let mut y = Vec::with_capacity(fout * n);
    for o in 0..fout {
        for col in 0..n {
            let v = wb[fout * fin + o]
                + (0..fin)
                    .map(|i| wb[o * fin + i] * x[i * n + col])
                    .sum::<f64>();
            y.push(if relu { v.max(0.0) } else { v });
        }
    }
    if relu {
        pattern.extend(relu_mask(&y));
    }
    y
}

/// A convolution and its batch norm as the network chains them. Returns the output and its
/// height and width.
#[allow(clippy::too_many_arguments)]
fn direct_conv_bn(
    params: &[f64],
    running: Option<&[f64]>,
    x: &[f64],
    (batch, h, w): (usize, usize, usize),
    (conv, bn): (&ConvParams, &BnParams),
    residual: Option<&[f64]>,
    relu: bool,
    pattern: &mut Vec<u32>,
) -> (Vec<f64>, usize, usize) {
    let s = Conv2d {
        batch,
        in_channels: conv.in_channels,
        out_channels: conv.out_channels,
        in_h: h,
        in_w: w,
        kernel: conv.kernel,
        stride: conv.stride,
        pad: conv.pad,
    };
    let y = direct_conv(&s, x, &params[conv.weight.clone()]);
    let affine = &params[bn.affine.clone()];
    let running = running.map(|r| &r[bn.running.clone()]);
    let out = direct_batchnorm(&y, bn.channels, affine, running, residual, relu, pattern);
    (out, s.out_h(), s.out_w())
}

/// The network's forward pass on `[3, batch, crop, crop]` in training mode, or in eval mode
/// with `running` statistics: `z` (`[out_dim, batch]`) and the pattern of every ReLU mask and
/// max-pool argmax.
fn reference_forward(
    net: &Network,
    params: &[f64],
    running: Option<&[f64]>,
    input: &[f32],
    batch: usize,
    crop: usize,
) -> (Vec<f64>, Vec<u32>) {
    let (features, mut pattern) = reference_features(net, params, running, input, batch, crop);
    let hidden = direct_linear(&net.proj_hidden, params, &features, true, &mut pattern);
    let z = direct_linear(&net.proj_out, params, &hidden, false, &mut pattern);
    (z, pattern)
}

/// [`reference_forward`] up to the encoder's output h (`[feature_dim, batch]`).
fn reference_features(
    net: &Network,
    params: &[f64],
    running: Option<&[f64]>,
    input: &[f32],
    batch: usize,
    crop: usize,
) -> (Vec<f64>, Vec<u32>) {
    let mut pattern = Vec::new();
    let stem = (&net.stem_conv, &net.stem_bn);
    let input = to_f64(input);
    let (y, h, w) = direct_conv_bn(
        params,
        running,
        &input,
        (batch, crop, crop),
        stem,
        None,
        true,
        &mut pattern,
    );
    let pool = MaxPool {
        planes: net.config.width * batch,
        in_h: h,
        in_w: w,
        kernel: 3,
        stride: 2,
        pad: 1,
    };
    let (mut x, argmax) = direct_maxpool(&pool, &y);
    pattern.extend(argmax);
    let (mut h, mut w) = (pool.out_h(), pool.out_w());
    for b in &net.blocks {
        let shape = (batch, h, w);
        let (mid, h1, w1) = direct_conv_bn(
            params,
            running,
            &x,
            shape,
            (&b.conv1, &b.bn1),
            None,
            true,
            &mut pattern,
        );
        let shortcut = match &b.downsample {
            Some((conv, bn)) => {
                let bn = (conv, bn);
                direct_conv_bn(params, running, &x, shape, bn, None, false, &mut pattern).0
            }
            None => x,
        };
        let second = (&b.conv2, &b.bn2);
        x = direct_conv_bn(
            params,
            running,
            &mid,
            (batch, h1, w1),
            second,
            Some(&shortcut),
            true,
            &mut pattern,
        )
        .0;
        (h, w) = (h1, w1);
    }
    let features: Vec<f64> = x
        .chunks(h * w)
        .map(|p| p.iter().sum::<f64>() / (h * w) as f64)
        .collect();
    (features, pattern)
}

// ---------------------------------------------------------------------------------------
// Convolution.
// ---------------------------------------------------------------------------------------

fn conv_forward(s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NAN; s.out_len()];
    ENG.conv2d_forward(s, x, w, &mut y).unwrap();
    y
}

fn conv_case(seed: u64, s: Conv2d) {
    let tag = format!("{s:?}");
    let mut rng = rng(seed);
    let fan_in = s.in_channels * s.kernel * s.kernel;
    let x = normal(&mut rng, s.in_len(), 0.0, 1.0);
    let w = normal(&mut rng, s.weight_len(), 0.0, (1.0 / fan_in as f32).sqrt());
    let r = normal(&mut rng, s.out_len(), 0.0, 1.0);

    let y = conv_forward(&s, &x, &w);
    let err = rel_diff(&to_f64(&y), &direct_conv(&s, &to_f64(&x), &to_f64(&w)));
    assert!(
        err <= 1e-5,
        "{tag}: forward differs from direct loops by {err:.2e}"
    );

    let backward = |dw: &mut [f32], dx: Option<&mut [f32]>| {
        let a = ConvBackward {
            x: &x[..],
            w: &w[..],
            dy: &r[..],
            dw,
            dx,
        };
        ENG.conv2d_backward(&s, a).unwrap();
    };
    let (dw, dx, dw_only) =
        with_and_without_dx(&mut rng, &tag, [s.weight_len(), s.in_len()], backward);
    assert!(
        rel_diff(&dw_only, &dw) <= 1e-6,
        "{tag}: dw without dx differs"
    );

    // Linear in each input: a large step.
    let coords = if s.in_len() <= 400 { 400 } else { 0 };
    let dirs = directions(&mut rng, &dx, 4, coords);
    check(&format!("{tag}: dx"), &x, &dx, 0.1, &dirs, |x| {
        Eval::smooth(dot(&r, &conv_forward(&s, x, &w)))
    });
    let dirs = directions(&mut rng, &dw, 4, 200);
    check(&format!("{tag}: dw"), &w, &dw, 0.1 * rms(&w), &dirs, |w| {
        Eval::smooth(dot(&r, &conv_forward(&s, &x, w)))
    });
}

#[test]
fn gradcheck_conv2d_3x3() {
    conv_case(11, Conv2d::new(2, (3, 5), (9, 11), (3, 1, 1)));
    conv_case(12, Conv2d::new(3, (4, 3), (8, 8), (3, 2, 1)));
    conv_case(13, Conv2d::new(2, (2, 3), (9, 7), (3, 2, 0)));
}

#[test]
fn gradcheck_conv2d_7x7_stride2_pad3() {
    conv_case(21, Conv2d::new(3, (3, 4), (13, 10), (7, 2, 3)));
    // Smaller than the kernel: most taps fall in the padding.
    conv_case(22, Conv2d::new(2, (2, 3), (5, 4), (7, 2, 3)));
}

#[test]
fn gradcheck_conv2d_1x1() {
    // The pointwise path (no unfolding) and the strided downsample.
    conv_case(31, Conv2d::new(2, (3, 4), (5, 6), (1, 1, 0)));
    conv_case(32, Conv2d::new(3, (4, 6), (7, 9), (1, 2, 0)));
}

#[test]
fn gradcheck_conv2d_batch_in_chunks() {
    // Over a million unfolded values per image: one image per chunk, two chunks.
    conv_case(41, Conv2d::new(2, (32, 3), (63, 65), (3, 1, 1)));
}

// ---------------------------------------------------------------------------------------
// Batch norm.
// ---------------------------------------------------------------------------------------

struct BnInputs {
    s: BatchNorm,
    x: Vec<f32>,
    affine: Vec<f32>,
    residual: Option<Vec<f32>>,
}

impl BnInputs {
    /// Channels with their own offsets and spreads, gammas of both signs.
    fn random(rng: &mut ChaCha8Rng, channels: usize, per_channel: usize, residual: bool) -> Self {
        let s = BatchNorm {
            channels,
            per_channel,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        };
        let mut x = Vec::with_capacity(s.len());
        for _ in 0..channels {
            let (mean, std) = (rng.random_range(-1.0..1.0), rng.random_range(0.3..2.0));
            x.extend(normal(rng, per_channel, mean, std));
        }
        let mut gamma = uniform_in(rng, channels, 0.5, 1.5);
        gamma[channels - 1] *= -1.0;
        let beta = normal(rng, channels, 0.0, 0.5);
        let residual = residual.then(|| normal(rng, s.len(), 0.0, 1.0));
        Self {
            s,
            x,
            affine: [gamma, beta].concat(),
            residual,
        }
    }

    /// The smallest standard deviation of a channel of `x`.
    fn min_spread(&self) -> f32 {
        self.x
            .chunks(self.s.per_channel)
            .map(|row| {
                let mean = row.iter().sum::<f32>() / row.len() as f32;
                rms(&row.iter().map(|v| v - mean).collect::<Vec<_>>())
            })
            .fold(f32::INFINITY, f32::min)
    }

    /// Training-mode forward: `(y, saved)`.
    fn forward(
        &self,
        x: &[f32],
        affine: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = self.s.channels;
        let mut y = vec![f32::NAN; self.s.len()];
        let mut saved = vec![f32::NAN; 2 * c];
        let mut running = [vec![0.0; c], vec![1.0; c]].concat();
        ENG.batchnorm_forward(
            &self.s,
            BnForward {
                x,
                affine,
                residual,
                relu,
                y: &mut y,
                stats: BnStats::Batch {
                    saved: &mut saved,
                    running: &mut running,
                },
            },
        )
        .unwrap();
        (y, saved)
    }
}

fn batchnorm_case(seed: u64, channels: usize, per_channel: usize, residual: bool, relu: bool) {
    let tag = format!(
        "batchnorm c{channels} m{per_channel}{}{}",
        if residual { " +residual" } else { "" },
        if relu { " relu" } else { "" }
    );
    let mut rng = rng(seed);
    let bn = BnInputs::random(&mut rng, channels, per_channel, residual);
    let r = normal(&mut rng, bn.s.len(), 0.0, 1.0);
    let res = bn.residual.as_deref();
    let (y, saved) = bn.forward(&bn.x, &bn.affine, res, relu);

    let (mut dy, mut dx) = (r.clone(), vec![f32::NAN; bn.s.len()]);
    let grads = accumulated(&mut rng, &tag, &[2 * channels], |g| {
        dy.copy_from_slice(&r);
        dx.fill(f32::NAN);
        let relu_out = relu.then_some(&y[..]);
        let (x, affine) = (&bn.x, &bn.affine);
        ENG.batchnorm_backward(
            &bn.s,
            BnBackward {
                x,
                affine,
                saved: &saved,
                relu_out,
                dy: &mut dy,
                dx: &mut dx,
                daffine: &mut g[0],
            },
        )
        .unwrap();
    });
    let daffine = &grads[0];
    // `dy` now holds the gradient of the pre-activation sum: the residual's gradient.
    let dres = &dy;
    if !relu {
        assert_eq!(dy, r, "{tag}: dy changed without a ReLU");
    }

    let objective = |x: &[f32], affine: &[f32], res: Option<&[f32]>| {
        Eval::weighted(&r, &bn.forward(x, affine, res, relu).0, relu)
    };
    let h = 1e-2 * bn.min_spread();
    let dirs = directions(&mut rng, &dx, 6, 100);
    check(&format!("{tag}: dx"), &bn.x, &dx, h, &dirs, |x| {
        objective(x, &bn.affine, res)
    });
    let dirs = directions(&mut rng, daffine, 4, 100);
    check(
        &format!("{tag}: d[gamma;beta]"),
        &bn.affine,
        daffine,
        1e-2,
        &dirs,
        |a| objective(&bn.x, a, res),
    );
    if let Some(res) = res {
        let dirs = directions(&mut rng, dres, 6, 100);
        check(
            &format!("{tag}: dresidual"),
            res,
            dres,
            1e-2,
            &dirs,
            |res| objective(&bn.x, &bn.affine, Some(res)),
        );
    }
}

#[test]
fn gradcheck_batchnorm_train() {
    batchnorm_case(51, 3, 2 * 5 * 7, false, false);
    batchnorm_case(52, 4, 3 * 3 * 3, false, false);
    // Three values per channel: the last stage of a small network at batch 3.
    batchnorm_case(53, 5, 3, false, false);
}

#[test]
fn gradcheck_batchnorm_train_relu() {
    batchnorm_case(61, 3, 2 * 5 * 7, false, true);
    batchnorm_case(62, 4, 3 * 3 * 3, false, true);
}

#[test]
fn gradcheck_batchnorm_train_residual() {
    batchnorm_case(71, 3, 2 * 5 * 7, true, true);
    batchnorm_case(72, 4, 3 * 3 * 3, true, true);
    batchnorm_case(73, 2, 2 * 3 * 5, true, false);
}

/// Evaluation mode has no backward in the engine: check it against its formula, and check
/// the running statistics that training mode leaves for it.
#[test]
fn gradcheck_batchnorm_eval_forward_and_running_stats() {
    let mut rng = rng(81);
    let bn = BnInputs::random(&mut rng, 3, 2 * 4 * 5, true);
    let (c, m) = (bn.s.channels, bn.s.per_channel);
    let running_mean = normal(&mut rng, c, 0.0, 1.0);
    let running_var = uniform_in(&mut rng, c, 0.2, 3.0);
    let running = [running_mean.clone(), running_var.clone()].concat();
    for (residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
        let res = if residual {
            bn.residual.as_deref()
        } else {
            None
        };
        let mut y = vec![f32::NAN; bn.s.len()];
        let (x, affine) = (&bn.x, &bn.affine);
        ENG.batchnorm_forward(
            &bn.s,
            BnForward {
                x,
                affine,
                residual: res,
                relu,
                y: &mut y,
                stats: BnStats::Running(&running[..]),
            },
        )
        .unwrap();
        let want: Vec<f64> = (0..bn.s.len())
            .map(|i| {
                let ch = i / m;
                let invstd = 1.0 / (running_var[ch] as f64 + BN_EPS as f64).sqrt();
                let v = affine[ch] as f64 * (x[i] - running_mean[ch]) as f64 * invstd
                    + affine[c + ch] as f64
                    + res.map_or(0.0, |r| r[i] as f64);
                if relu { v.max(0.0) } else { v }
            })
            .collect();
        let err = rel_diff(&to_f64(&y), &want);
        println!("batchnorm eval residual {residual} relu {relu}: error {err:.2e}");
        assert!(err <= 1e-6, "batch norm eval forward off by {err:.2e}");
    }

    // Training mode: r = (1 - momentum) r + momentum stat, the variance unbiased.
    let (mut saved, mut y, mut updated) =
        (vec![0.0; 2 * c], vec![0.0; bn.s.len()], running.clone());
    let (x, affine) = (&bn.x, &bn.affine);
    ENG.batchnorm_forward(
        &bn.s,
        BnForward {
            x,
            affine,
            residual: None,
            relu: false,
            y: &mut y,
            stats: BnStats::Batch {
                saved: &mut saved,
                running: &mut updated,
            },
        },
    )
    .unwrap();
    let mom = BN_MOMENTUM as f64;
    for ch in 0..c {
        let row = to_f64(&x[ch * m..][..m]);
        let mean = row.iter().sum::<f64>() / m as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m as f64;
        let checks = [
            ("saved mean", saved[ch], mean),
            (
                "saved invstd",
                saved[c + ch],
                1.0 / (var + BN_EPS as f64).sqrt(),
            ),
            (
                "running mean",
                updated[ch],
                (1.0 - mom) * running_mean[ch] as f64 + mom * mean,
            ),
            (
                "running var",
                updated[c + ch],
                (1.0 - mom) * running_var[ch] as f64 + mom * var * m as f64 / (m - 1) as f64,
            ),
        ];
        for (what, got, want) in checks {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "channel {ch}: {what} {got}, expected {want}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pooling.
// ---------------------------------------------------------------------------------------

fn maxpool_case(seed: u64, s: MaxPool) {
    let tag = format!("{s:?}");
    let mut rng = rng(seed);
    let len = s.planes * s.in_h * s.in_w;
    let out_len = s.planes * s.out_h() * s.out_w();
    // Distinct values GAP apart, half of them negative (so that some windows at the border
    // hold only negative values, where a zero from the padding must not win).
    const GAP: f32 = 0.01;
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng);
    let x: Vec<f32> = order
        .iter()
        .map(|&i| (i as f32 - len as f32 / 2.0) * GAP)
        .collect();
    let r = normal(&mut rng, out_len, 0.0, 1.0);
    let forward = |x: &[f32]| {
        let mut y = vec![f32::NAN; out_len];
        ENG.maxpool_forward(&s, x, &mut y).unwrap();
        y
    };
    assert_eq!(forward(&x), direct_maxpool(&s, &x).0, "{tag}: forward");

    let mut dx = vec![f32::NAN; len];
    ENG.maxpool_backward(&s, &x, &r, &mut dx).unwrap();
    // A step of GAP/4 per element cannot swap two values.
    let dirs = directions(&mut rng, &dx, 6, 0);
    check(&format!("{tag}: dx"), &x, &dx, GAP / 4.0, &dirs, |x| {
        Eval::smooth(dot(&r, &forward(x)))
    });
}

#[test]
fn gradcheck_maxpool() {
    // The stem's pool on odd and even sizes.
    maxpool_case(91, MaxPool::new(6, (9, 11), (3, 2, 1)));
    maxpool_case(92, MaxPool::new(4, (10, 10), (3, 2, 1)));
    // Non-overlapping 2x2 dropping the last column; overlapping windows at stride 1.
    maxpool_case(93, MaxPool::new(4, (8, 7), (2, 2, 0)));
    maxpool_case(94, MaxPool::new(5, (7, 6), (3, 1, 1)));
}

#[test]
fn gradcheck_avgpool() {
    for (seed, planes, spatial) in [(101, 6, 15), (102, 8, 1), (103, 3, 49)] {
        let tag = format!("avgpool planes {planes} spatial {spatial}");
        let s = AvgPool { planes, spatial };
        let mut rng = rng(seed);
        let x = normal(&mut rng, planes * spatial, 0.0, 1.0);
        let r = normal(&mut rng, planes, 0.0, 1.0);
        let mut dx = vec![f32::NAN; planes * spatial];
        ENG.avgpool_backward(&s, &r, &mut dx).unwrap();
        let dirs = directions(&mut rng, &dx, 4, 64);
        check(&format!("{tag}: dx"), &x, &dx, 0.1, &dirs, |x| {
            let mut y = vec![f32::NAN; planes];
            ENG.avgpool_forward(&s, x, &mut y).unwrap();
            Eval::smooth(dot(&r, &y))
        });
    }
}

// ---------------------------------------------------------------------------------------
// Linear layer.
// ---------------------------------------------------------------------------------------

fn linear_case(seed: u64, s: Linear, relu: bool) {
    let tag = format!(
        "linear {}->{} n{}{}",
        s.in_features,
        s.out_features,
        s.batch,
        if relu { " relu" } else { "" }
    );
    let mut rng = rng(seed);
    let bound = 1.0 / (s.in_features as f32).sqrt();
    let x = normal(&mut rng, s.in_features * s.batch, 0.0, 1.0);
    let wb = [
        uniform_in(&mut rng, s.out_features * s.in_features, -bound, bound),
        normal(&mut rng, s.out_features, 0.0, 0.3),
    ]
    .concat();
    let r = normal(&mut rng, s.out_features * s.batch, 0.0, 1.0);
    let forward = |x: &[f32], wb: &[f32]| {
        let mut y = vec![f32::NAN; s.out_features * s.batch];
        ENG.linear_forward(
            &s,
            LinearForward {
                x,
                wb,
                relu,
                y: &mut y,
            },
        )
        .unwrap();
        y
    };
    let y = forward(&x, &wb);
    let relu_out = relu.then_some(&y[..]);
    let mut dy = r.clone();
    let backward = |dwb: &mut [f32], dx: Option<&mut [f32]>| {
        dy.copy_from_slice(&r);
        let a = LinearBackward {
            x: &x[..],
            wb: &wb[..],
            relu_out,
            dy: &mut dy[..],
            dwb,
            dx,
        };
        ENG.linear_backward(&s, a).unwrap();
    };
    let (dwb, dx, dwb_only) =
        with_and_without_dx(&mut rng, &tag, [s.param_len(), x.len()], backward);
    assert_eq!(&dwb_only, &dwb, "{tag}: d[W;b] without dx differs");

    // Linear up to the ReLU's kinks: a large step without them.
    let h = if relu { 1e-2 } else { 0.1 };
    let dirs = directions(&mut rng, &dx, 6, 100);
    check(&format!("{tag}: dx"), &x, &dx, h, &dirs, |x| {
        Eval::weighted(&r, &forward(x, &wb), relu)
    });
    let dirs = directions(&mut rng, &dwb, 6, 100);
    check(
        &format!("{tag}: d[W;b]"),
        &wb,
        &dwb,
        h * bound,
        &dirs,
        |wb| Eval::weighted(&r, &forward(&x, wb), relu),
    );
}

#[test]
fn gradcheck_linear() {
    let s = |batch, in_features, out_features| Linear {
        batch,
        in_features,
        out_features,
    };
    linear_case(111, s(3, 7, 5), false);
    linear_case(112, s(2, 4, 9), false);
    linear_case(113, s(3, 7, 5), true);
    linear_case(114, s(5, 12, 6), true);
}

// ---------------------------------------------------------------------------------------
// Losses.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    NtXent,
    Cohesion,
}

impl Loss {
    /// The engine's loss of feature-major `[dim, n]` embeddings and its gradients.
    fn engine(self, s: &ViewPair, z_i: &[f32], z_j: &[f32], t: f32) -> (f32, [Vec<f32>; 2]) {
        let (mut dz_i, mut dz_j) = (vec![f32::NAN; z_i.len()], vec![f32::NAN; z_j.len()]);
        let loss = match self {
            Loss::NtXent => ENG.ntxent(
                s,
                t,
                LossViews {
                    z_i,
                    z_j,
                    dz_i: &mut dz_i,
                    dz_j: &mut dz_j,
                },
            ),
            Loss::Cohesion => ENG.cohesion(
                s,
                t,
                LossViews {
                    z_i,
                    z_j,
                    dz_i: &mut dz_i,
                    dz_j: &mut dz_j,
                },
            ),
        };
        (loss.unwrap(), [dz_i, dz_j])
    }

    /// The loss in f64 from its definition.
    fn direct(self, z_i: &[f64], z_j: &[f64], n: usize, t: f32) -> f64 {
        match self {
            Loss::NtXent => reference::ntxent(&rows_of_views(z_i, z_j, n), t as f64),
            Loss::Cohesion => reference::cohesion(&rows_of_views(z_i, z_j, n), t as f64),
        }
    }
}

fn loss_case(seed: u64, loss: Loss, s: ViewPair, t: f32) {
    let tag = format!("{loss:?} dim {} n {} T {t}", s.dim, s.n);
    let mut rng = rng(seed);
    // Samples of different norms, so that the normalization's backward matters.
    let scales = uniform_in(&mut rng, 2 * s.n, 0.3, 3.0);
    let mut z = normal(&mut rng, 2 * s.dim * s.n, 0.0, 1.0);
    for (i, v) in z.iter_mut().enumerate() {
        let (view, col) = (i / (s.dim * s.n), i % s.n);
        *v *= scales[view * s.n + col];
    }
    let half = s.dim * s.n;
    let engine = |z: &[f32]| loss.engine(&s, &z[..half], &z[half..], t);
    let (value, [dz_i, dz_j]) = engine(&z);
    let want = loss.direct(&to_f64(&z[..half]), &to_f64(&z[half..]), s.n, t);
    assert!(
        (value as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{tag}: loss {value}, expected {want}"
    );
    let dz = [dz_i, dz_j].concat();
    // The loss's curvature grows as 1/T: the step shrinks, less, since f32 rounding of the
    // loss (which grows as 1/T too) then weighs more.
    let h = 3e-2 * t.min(1.0).sqrt();
    let dirs = directions(&mut rng, &dz, 6, 200);
    check(&format!("{tag}: d[z_i;z_j]"), &z, &dz, h, &dirs, |z| {
        Eval::smooth(engine(z).0 as f64)
    });
    // And against the loss's definition in f64, which resolves far smaller errors.
    check_f64(
        &format!("{tag}: d[z_i;z_j], f64 loss"),
        &z,
        &dz,
        1e-6,
        &dirs,
        |z| Eval::smooth(loss.direct(&z[..half], &z[half..], s.n, t)),
    );
}

#[test]
fn gradcheck_ntxent() {
    let pair = |dim, n| ViewPair { dim, n };
    loss_case(121, Loss::NtXent, pair(6, 3), 0.07);
    loss_case(122, Loss::NtXent, pair(5, 4), 0.5);
    loss_case(123, Loss::NtXent, pair(3, 5), 0.2);
}

#[test]
fn gradcheck_cohesion() {
    let pair = |dim, n| ViewPair { dim, n };
    loss_case(131, Loss::Cohesion, pair(6, 3), 0.07);
    loss_case(132, Loss::Cohesion, pair(5, 4), 0.5);
    loss_case(133, Loss::Cohesion, pair(4, 1), 0.2);
}

// ---------------------------------------------------------------------------------------
// The network end to end.
// ---------------------------------------------------------------------------------------

/// A freshly initialized model whose batch norms have random weights and biases (the
/// initial 1 and 0 would hide a gradient that forgets gamma or beta).
fn random_state(config: NetConfig, seed: u64) -> (Network, ModelState) {
    let mut state = ModelState::init(config, seed).unwrap();
    let net = Network::new(config);
    let mut rng = rng(seed ^ 0x5eed);
    for bn in net.bns() {
        let c = bn.channels;
        let affine = &mut state.params[bn.affine.clone()];
        affine[..c].copy_from_slice(&uniform_in(&mut rng, c, 0.5, 1.5));
        affine[c..].copy_from_slice(&normal(&mut rng, c, 0.0, 0.2));
    }
    (net, state)
}

/// Step of the end-to-end checks, relative to [`param_scale`].
const NET_STEP: f32 = 1e-6;

/// Per-element step scale of the flat parameters: each tensor's RMS, at least 0.1.
fn param_scale(net: &Network, params: &[f32]) -> Vec<f32> {
    let mut scale = vec![0.0f32; params.len()];
    for e in &net.params {
        scale[e.range()].fill(rms(&params[e.range()]).max(0.1));
    }
    scale
}

/// `dirs` for the part `range` of the parameters, placed there and times `scale`.
fn embed(dirs: Vec<Vec<f32>>, range: Range<usize>, scale: &[f32]) -> Vec<Vec<f32>> {
    dirs.into_iter()
        .map(|d| {
            let mut full = vec![0.0; scale.len()];
            for ((f, d), s) in full[range.clone()]
                .iter_mut()
                .zip(d)
                .zip(&scale[range.clone()])
            {
                *f = d * s;
            }
            full
        })
        .collect()
}

/// Directions over all parameters (the gradient's own and one random), then over each of
/// `tensors` alone (its part of the gradient), each times `scale`.
fn whole_and_tensor_directions(
    rng: &mut ChaCha8Rng,
    net: &Network,
    grad: &[f32],
    tensors: &[&str],
    scale: &[f32],
) -> Vec<Vec<f32>> {
    let mut dirs = embed(directions(rng, grad, 1, 0), 0..grad.len(), scale);
    for tensor in tensors {
        let range = net.param(tensor).unwrap().range();
        let d = directions(rng, &grad[range.clone()], 0, 0);
        dirs.extend(embed(d, range, scale));
    }
    dirs
}

/// What the network's gradient is checked on.
#[derive(Clone, Copy, Debug)]
enum Objective {
    /// `sum r z` of one view.
    Projection,
    /// A loss of two views at a temperature.
    Loss(Loss, f32),
}

struct NetCase {
    net: Network,
    running: Vec<f32>,
    views: Vec<Vec<f32>>,
    r: Vec<f32>,
    batch: usize,
    crop: usize,
    objective: Objective,
}

impl NetCase {
    fn new(
        seed: u64,
        config: NetConfig,
        batch: usize,
        crop: usize,
        objective: Objective,
    ) -> (Self, Vec<f32>) {
        let (net, state) = random_state(config, seed);
        let mut rng = rng(seed);
        let views = match objective {
            Objective::Projection => 1,
            Objective::Loss(..) => 2,
        };
        let views = (0..views)
            .map(|_| normal(&mut rng, 3 * batch * crop * crop, 0.0, 1.0))
            .collect();
        let r = normal(&mut rng, config.out_dim * batch, 0.0, 1.0);
        let case = Self {
            net,
            running: state.running,
            views,
            r,
            batch,
            crop,
            objective,
        };
        (case, state.params)
    }

    /// The objective at `params` through the f64 reference, with its kink pattern.
    fn eval(&self, params: &[f64]) -> Eval {
        let mut pattern = Vec::new();
        let z: Vec<Vec<f64>> = self
            .views
            .iter()
            .map(|view| {
                let (z, p) =
                    reference_forward(&self.net, params, None, view, self.batch, self.crop);
                pattern.extend(p);
                z
            })
            .collect();
        let value = match self.objective {
            Objective::Projection => z[0].iter().zip(&self.r).map(|(z, &r)| z * r as f64).sum(),
            Objective::Loss(loss, t) => loss.direct(&z[0], &z[1], self.batch, t),
        };
        Eval { value, pattern }
    }

    /// The engine's gradient at `params` (`forward_train`, the loss's gradient, `backward`),
    /// added to `grads`. Checks the engine's `z` against the reference on the way.
    fn gradient(&self, params: &Vec<f32>, grads: &mut Vec<f32>) {
        let mut running = self.running.clone();
        let acts: Vec<Activations<'_, CpuEngine>> = self
            .views
            .iter()
            .map(|view| {
                self.net
                    .forward_train(&ENG, params, &mut running, view, self.batch, self.crop)
                    .unwrap()
            })
            .collect();
        let params64 = to_f64(params);
        for (view, acts) in self.views.iter().zip(&acts) {
            let (want, _) =
                reference_forward(&self.net, &params64, None, view, self.batch, self.crop);
            let err = rel_diff(&to_f64(&acts.z), &want);
            assert!(err <= 1e-4, "z differs from the f64 reference by {err:.2e}");
        }
        let dz = match self.objective {
            Objective::Projection => vec![self.r.clone()],
            Objective::Loss(loss, t) => {
                let pair = ViewPair {
                    dim: self.net.config.out_dim,
                    n: self.batch,
                };
                loss.engine(&pair, &acts[0].z, &acts[1].z, t).1.to_vec()
            }
        };
        for (acts, dz) in acts.iter().zip(dz) {
            self.net.backward(&ENG, params, acts, dz, grads).unwrap();
        }
    }
}

fn network_case(seed: u64, config: NetConfig, batch: usize, crop: usize, objective: Objective) {
    let tag = format!(
        "network {:?} crop {crop} n{batch} {objective:?}",
        config.blocks
    );
    let (case, params) = NetCase::new(seed, config, batch, crop, objective);
    let mut grads = vec![0.0; params.len()];
    case.gradient(&params, &mut grads);
    // Backward accumulates: a second pass adds the same gradient again.
    let mut twice = grads.clone();
    case.gradient(&params, &mut twice);
    let doubled: Vec<f32> = grads.iter().map(|g| 2.0 * g).collect();
    assert!(
        rel_diff(&twice, &doubled) <= 1e-5,
        "{tag}: backward does not accumulate"
    );

    let mut rng = rng(seed);
    let scale = param_scale(&case.net, &params);
    let f = |p: &[f64]| case.eval(p);
    let check = |name: &str, dirs: &[Vec<f32>]| {
        check_f64(
            &format!("{tag}: {name}"),
            &params,
            &grads,
            NET_STEP,
            dirs,
            f,
        )
    };
    let dirs = embed(directions(&mut rng, &grads, 3, 0), 0..params.len(), &scale);
    check("all parameters", &dirs);

    // Every tensor on its own: its gradient's direction and a random one.
    let mut worst: (f64, &str) = (0.0, "");
    for e in &case.net.params {
        let dirs = embed(
            directions(&mut rng, &grads[e.range()], 1, 0),
            e.range(),
            &scale,
        );
        let err = check(&e.name, &dirs);
        if err >= worst.0 {
            worst = (err, &e.name);
        }
    }
    println!("{tag}: worst tensor {} ({:.2e})", worst.1, worst.0);

    // Per coordinate, for the output bias.
    let bias = case.net.param("projector.fc.2.bias").unwrap().range();
    let dirs = embed(
        directions(&mut rng, &grads[bias.clone()], 0, 64),
        bias,
        &scale,
    );
    check("projector.fc.2.bias[k]", &dirs);
}

#[test]
fn gradcheck_network_one_block_per_stage() {
    let config = net(4, [1, 1, 1, 1], 8);
    network_case(141, config, 3, 20, Objective::Projection);
    network_case(142, config, 4, 32, Objective::Loss(Loss::NtXent, 0.2));
}

#[test]
fn gradcheck_network_identity_shortcut() {
    // Stage 0's second block has an identity shortcut; later stages downsample.
    let config = net(4, [2, 1, 1, 1], 8);
    network_case(151, config, 3, 20, Objective::Loss(Loss::NtXent, 0.07));
    network_case(152, config, 3, 24, Objective::Loss(Loss::Cohesion, 0.2));
}

// ---------------------------------------------------------------------------------------
// The trainer's task gradients.
// ---------------------------------------------------------------------------------------

/// `g1` and `g2` of a training step against the step's two losses (through the f64
/// reference), along each gradient's direction, a random one and a few tensors' own.
#[test]
fn gradcheck_trainer_task_gradients() {
    let config = net(4, [1, 1, 1, 1], 8);
    let (net, state) = random_state(config, 161);
    let (n_pos, n_neg, crop, t) = (3, 4, 20, 0.2);
    let batch = StepBatch::upload(&ENG, &HostBatch::random(n_pos, n_neg, crop, 162)).unwrap();
    let step_cfg = StepConfig {
        surgery: Surgery::Ags,
        temperature: t,
        ..StepConfig::default()
    };
    // The second step's gradients, at the parameters the first left: a task gradient that
    // kept anything from the first step would fail.
    let mut trainer = Trainer::new(&ENG, &state).unwrap();
    trainer.step(&ENG, &batch, &step_cfg, 0.1, None).unwrap();
    let params = trainer.params.clone();
    assert_ne!(params, state.params, "the first step moved nothing");
    let report = trainer.step(&ENG, &batch, &step_cfg, 0.1, None).unwrap();

    let tasks = [
        (
            "g1 (contrastive)",
            Loss::NtXent,
            &trainer.g1,
            [&batch.pos_i, &batch.pos_j],
            n_pos,
        ),
        (
            "g2 (cohesion)",
            Loss::Cohesion,
            &trainer.g2,
            [&batch.neg_i, &batch.neg_j],
            n_neg,
        ),
    ];
    let scale = param_scale(&net, &params);
    let mut rng = rng(163);
    for (name, loss, grad, views, n) in tasks {
        let f = |p: &[f64]| {
            let mut pattern = Vec::new();
            let [z_i, z_j] = views.map(|view| {
                let (z, p) = reference_forward(&net, p, None, view, n, crop);
                pattern.extend(p);
                z
            });
            Eval {
                value: loss.direct(&z_i, &z_j, n, t),
                pattern,
            }
        };
        let want = f(&to_f64(&params)).value;
        let got = match loss {
            Loss::NtXent => report.loss_contrastive,
            Loss::Cohesion => report.loss_cohesion,
        };
        assert!(
            (got as f64 - want).abs() <= 1e-4 * want.abs(),
            "trainer {name}: loss {got}, reference {want}"
        );
        let dirs = whole_and_tensor_directions(
            &mut rng,
            &net,
            grad,
            &[
                "encoder.0.weight",
                "encoder.1.bias",
                "encoder.4.0.conv2.weight",
                "encoder.5.0.downsample.0.weight",
                "encoder.7.0.bn2.weight",
                "projector.fc.0.weight",
                "projector.fc.2.bias",
            ],
            &scale,
        );
        check_f64(
            &format!("trainer {name}"),
            &params,
            grad,
            NET_STEP,
            &dirs,
            f,
        );
    }
}

/// The network's eval-mode forward (running statistics, as `model.eval()`) against the f64
/// reference, and its independence of the other images in the batch.
#[test]
fn network_eval_forward_matches_reference() {
    let config = net(4, [1, 1, 2, 1], 8);
    let (net, mut state) = random_state(config, 171);
    let mut rng = rng(172);
    for bn in net.bns() {
        let c = bn.channels;
        let running = &mut state.running[bn.running.clone()];
        running[..c].copy_from_slice(&normal(&mut rng, c, 0.0, 0.5));
        running[c..].copy_from_slice(&uniform_in(&mut rng, c, 0.5, 2.0));
    }
    let (batch, crop) = (3, 24);
    let input = HostBatch::random(batch, 2, crop, 173);
    let x = StepBatch::upload(&ENG, &input).unwrap().pos_i;
    let params = ENG.upload(&state.params).unwrap();
    let running = ENG.upload(&state.running).unwrap();
    let acts = net
        .forward_eval(&ENG, &params, &running, &x, batch, crop)
        .unwrap();
    let (want, _) = reference_forward(
        &net,
        &to_f64(&state.params),
        Some(&to_f64(&state.running)),
        &x,
        batch,
        crop,
    );
    let err = rel_diff(&to_f64(&acts.z), &want);
    println!("eval forward: relative error {err:.2e}");
    assert!(err < 1e-5, "eval forward differs from the reference: {err}");
    assert_eq!(
        ENG.download(&running).unwrap(),
        state.running,
        "eval changed running stats"
    );

    // Image 1 alone gives the same z as inside the batch (feature-major columns).
    let plane = crop * crop;
    let single: Vec<f32> = (0..3)
        .flat_map(|c| x[(c * batch + 1) * plane..(c * batch + 2) * plane].to_vec())
        .collect();
    let single = ENG.upload(&single).unwrap();
    let alone = net
        .forward_eval(&ENG, &params, &running, &single, 1, crop)
        .unwrap();
    for d in 0..config.out_dim {
        let (a, b) = (alone.z[d], acts.z[d * batch + 1]);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "dim {d}: {a} vs {b}"
        );
    }
}

/// Outputs an op writes whole come from `Backend::alloc`, whose contents are unspecified; the
/// CPU engine fills them with NaN, so a pass that read one before writing it would leave NaN
/// in its results. A training step and an evaluation pass are finite everywhere.
#[test]
fn every_output_is_written_before_it_is_read() {
    assert!(ENG.alloc(3).unwrap().iter().all(|v| v.is_nan()));
    let (net, state) = random_state(net(4, [2, 1, 1, 1], 8), 171);
    let host = HostBatch::random(3, 3, 20, 172);
    let mut trainer = Trainer::new(&ENG, &state).unwrap();
    let mut combined = ENG.alloc(net.param_len()).unwrap();
    let batch = StepBatch::upload(&ENG, &host).unwrap();
    let report = trainer
        .step(
            &ENG,
            &batch,
            &StepConfig::default(),
            0.01,
            Some(&mut combined),
        )
        .unwrap();
    assert!(report.loss_contrastive.is_finite() && report.loss_cohesion.is_finite());
    let finite = |what: &str, v: &[f32]| {
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{what}: a value was never written"
        );
    };
    finite("g1", &trainer.g1);
    finite("g2", &trainer.g2);
    finite("combined gradient", &combined);
    finite("parameters", &trainer.params);
    finite("running statistics", &trainer.running);
    let acts = net
        .forward_eval(&ENG, &trainer.params, &trainer.running, &batch.pos_i, 3, 20)
        .unwrap();
    finite("features", &acts.features);
    finite("embeddings", &acts.z);
}

/// The weak baseline's encoder gradient (`g1` of `weak_step`) against its loss through the
/// f64 reference (the mean over both views of the binary cross-entropy of `w . h + b` with
/// each patch's slide label), and the classifier's own gradient against f64 differences.
#[test]
fn gradcheck_weak_baseline() {
    let config = net(4, [1, 1, 1, 1], 8);
    let (net, state) = random_state(config, 171);
    let (n, abnormal, crop) = (5, 2, 20);
    let host = HostBatch::random(n, 0, crop, 172);
    let batch = StepBatch::upload(&ENG, &host).unwrap();
    let cfg = StepConfig::default();
    let mut head = WeakHead::init(config.feature_dim(), 173).unwrap();
    let mut trainer = Trainer::new(&ENG, &state).unwrap();
    trainer
        .weak_step(&ENG, &batch, abnormal, &mut head, &cfg, 0.1)
        .unwrap();
    // The second step's gradients, at the parameters and head the first left.
    let params = trainer.params.clone();
    let before = head.clone();
    let report = trainer
        .weak_step(&ENG, &batch, abnormal, &mut head, &cfg, 0.1)
        .unwrap();
    assert!(
        trainer.g2.iter().all(|&g| g == 0.0),
        "the weak step leaves g2 at zero"
    );
    assert_ne!(head.weights, before.weights, "the head was not updated");

    let dim = config.feature_dim();
    let loss = |p: &[f64], w: &[f64]| -> Eval {
        let mut pattern = Vec::new();
        let mut value = 0.0;
        for view in [&batch.pos_i, &batch.pos_j] {
            let (h, kinks) = reference_features(&net, p, None, view, n, crop);
            pattern.extend(kinks);
            for i in 0..n {
                let f = (0..dim).map(|d| w[d] * h[d * n + i]).sum::<f64>() + w[dim];
                value += bce(f, i < abnormal) / (2 * n) as f64;
            }
        }
        Eval { value, pattern }
    };
    let want = loss(&to_f64(&params), &before.weights).value;
    assert!(
        (report.loss as f64 - want).abs() <= 1e-4 * want,
        "weak loss {} vs reference {want}",
        report.loss
    );
    // The head: central differences in f64, coordinate by coordinate.
    let params64 = to_f64(&params);
    for k in 0..=dim {
        let step = 1e-5;
        let mut plus = before.weights.clone();
        let mut minus = before.weights.clone();
        plus[k] += step;
        minus[k] -= step;
        let fd = (loss(&params64, &plus).value - loss(&params64, &minus).value) / (2.0 * step);
        let an = head.grad[k];
        // The analytic side takes h from the engine's f32 forward pass.
        assert!(
            (fd - an).abs() <= 1e-3 * fd.abs().max(1e-3),
            "head gradient {k}: analytic {an}, finite difference {fd}"
        );
    }
    // The encoder, along g1's direction, a random one and a few tensors' own.
    let scale = param_scale(&net, &params);
    let mut rng = rng(174);
    let grad = &trainer.g1;
    let dirs = whole_and_tensor_directions(
        &mut rng,
        &net,
        grad,
        &[
            "encoder.0.weight",
            "encoder.4.0.conv2.weight",
            "encoder.7.0.bn2.bias",
        ],
        &scale,
    );
    let projector = net.param("projector.fc.0.weight").unwrap().range();
    assert!(
        grad[projector].iter().all(|&g| g == 0.0),
        "the projector is not trained"
    );
    let f = |p: &[f64]| loss(p, &before.weights);
    check_f64("weak baseline g1", &params, grad, NET_STEP, &dirs, f);
}
