//! Gated-attention MIL (ABMIL, Ilse et al. 2018) with its hand-derived backward, in f64.
//!
//! For a bag of n instances x_i (rows of X, n x D):
//!   h_i = ReLU(W1 x_i + b1)                         (hidden, L)
//!   t_i = tanh(V h_i + bv),  s_i = sigmoid(U h_i + bu)   (attention, A)
//!   e_i = w . (t_i * s_i) + bw,  a = softmax_i(e)
//!   m = sum_i a_i h_i,  logit = c . m + c0,  p = sigmoid(logit)
//! trained on the bag label y with binary cross-entropy on the logit.

use std::ops::Range;

use super::layers::{Init, ParamTensor, init_params, sigmoid, softmax};
use crate::matmul::{Mat, gemm};

/// Sizes of the MIL head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MilConfig {
    /// Feature size D of an instance.
    pub input_dim: usize,
    /// Hidden size L of the instance embedding h.
    pub hidden: usize,
    /// Size A of the gated attention branch.
    pub attention: usize,
}

impl MilConfig {
    /// `(D, L, A)`: input, hidden and attention sizes, as the formulas name them.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.input_dim, self.hidden, self.attention)
    }
}

/// Where each tensor lives in the flat parameter vector. V and U are adjacent (and so are
/// their biases), so both gate branches come out of one product `[V; U] h`.
#[derive(Clone, Debug)]
pub struct MilLayout {
    pub w1: Range<usize>,
    pub b1: Range<usize>,
    /// `[V; U]`: 2A x L.
    pub gates: Range<usize>,
    /// `[bv; bu]`: 2A.
    pub gate_bias: Range<usize>,
    pub w: Range<usize>,
    pub bw: Range<usize>,
    pub c: Range<usize>,
    pub c0: Range<usize>,
}

impl MilLayout {
    fn new(config: MilConfig) -> Self {
        let (d, l, a) = config.dims();
        let mut next = 0;
        let mut take = |len: usize| {
            next += len;
            next - len..next
        };
        Self {
            w1: take(l * d),
            b1: take(l),
            gates: take(2 * a * l),
            gate_bias: take(2 * a),
            w: take(a),
            bw: take(1),
            c: take(l),
            c0: take(1),
        }
    }

    pub fn len(&self) -> usize {
        self.c0.end
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each tensor with the name, shape and initialization (fan-in) PyTorch's `nn.Linear`
    /// layers would have.
    pub fn tensors(&self, config: MilConfig) -> Vec<ParamTensor> {
        let (d, l, a) = config.dims();
        [
            ("embed.weight", &self.w1, d, vec![l, d]),
            ("embed.bias", &self.b1, d, vec![l]),
            ("gates.weight", &self.gates, l, vec![2 * a, l]),
            ("gates.bias", &self.gate_bias, l, vec![2 * a]),
            ("attention.weight", &self.w, a, vec![1, a]),
            ("attention.bias", &self.bw, a, vec![1]),
            ("classifier.weight", &self.c, l, vec![1, l]),
            ("classifier.bias", &self.c0, l, vec![1]),
        ]
        .into_iter()
        .map(|(name, range, fan_in, shape)| ParamTensor {
            name: name.to_owned(),
            shape,
            range: range.clone(),
            init: Init::Uniform { fan_in },
        })
        .collect()
    }
}

/// Everything the forward pass keeps for the backward.
#[derive(Clone, Debug)]
pub struct MilForward {
    pub n: usize,
    /// n x L, after the ReLU.
    pub h: Vec<f64>,
    /// n x 2A: tanh branch in the first A columns, sigmoid branch in the last A.
    pub gates: Vec<f64>,
    /// Attention weights a (n, sum to one).
    pub attention: Vec<f64>,
    /// Attention logits e (n): the per-instance scores, before the softmax.
    pub scores: Vec<f64>,
    /// The bag embedding m (L).
    pub bag: Vec<f64>,
    pub logit: f64,
}

impl MilForward {
    /// Probability that the bag is abnormal.
    pub fn probability(&self) -> f64 {
        sigmoid(self.logit)
    }
}

/// Binary cross-entropy of a logit against label y, stable for large |logit|.
pub fn bce_with_logit(logit: f64, label: bool) -> f64 {
    logit.max(0.0) - logit * (label as u8 as f64) + (-logit.abs()).exp().ln_1p()
}

/// The gated-attention MIL head; parameters live in a flat vector laid out by [`MilLayout`].
#[derive(Clone, Debug)]
pub struct AbMil {
    pub config: MilConfig,
    pub layout: MilLayout,
}

impl AbMil {
    pub fn new(config: MilConfig) -> Self {
        Self {
            config,
            layout: MilLayout::new(config),
        }
    }

    pub fn param_len(&self) -> usize {
        self.layout.len()
    }

    /// PyTorch's `nn.Linear` initialization: weights and biases uniform in +-1/sqrt(fan_in).
    pub fn init(&self, seed: u64) -> Vec<f64> {
        init_params(&self.layout.tensors(self.config), seed)
    }

    /// Forward pass over a bag `x` of n instances (n x D, row-major).
    pub fn forward(&self, params: &[f64], x: &[f64]) -> MilForward {
        let (d, l, a) = self.config.dims();
        let lay = &self.layout;
        let n = x.len() / d;
        assert_eq!(
            x.len(),
            n * d,
            "bag features are not a multiple of the feature size"
        );
        assert!(n > 0, "an empty bag");

        let mut h = vec![0.0; n * l];
        gemm(
            &mut h,
            l,
            false,
            Mat::rows(x, n, d),
            Mat::rows(&params[lay.w1.clone()], l, d).t(),
        );
        for row in h.chunks_exact_mut(l) {
            for (v, b) in row.iter_mut().zip(&params[lay.b1.clone()]) {
                *v = (*v + b).max(0.0);
            }
        }
        let mut gates = vec![0.0; n * 2 * a];
        gemm(
            &mut gates,
            2 * a,
            false,
            Mat::rows(&h, n, l),
            Mat::rows(&params[lay.gates.clone()], 2 * a, l).t(),
        );
        let w = &params[lay.w.clone()];
        let bias = &params[lay.gate_bias.clone()];
        let scores: Vec<f64> = gates
            .chunks_exact_mut(2 * a)
            .map(|row| {
                let (t, s) = row.split_at_mut(a);
                let mut score = params[lay.bw.start];
                for k in 0..a {
                    t[k] = (t[k] + bias[k]).tanh();
                    s[k] = sigmoid(s[k] + bias[a + k]);
                    score += w[k] * t[k] * s[k];
                }
                score
            })
            .collect();
        let mut attention = scores.clone();
        softmax(&mut attention);

        let mut bag = vec![0.0; l];
        for (row, &weight) in h.chunks_exact(l).zip(&attention) {
            for (m, v) in bag.iter_mut().zip(row) {
                *m += weight * v;
            }
        }
        let c = &params[lay.c.clone()];
        let logit = params[lay.c0.start] + bag.iter().zip(c).map(|(m, c)| m * c).sum::<f64>();
        MilForward {
            n,
            h,
            gates,
            attention,
            scores,
            bag,
            logit,
        }
    }

    /// Adds the gradient of `bce_with_logit(forward.logit, label)` with respect to every
    /// parameter to `grads`, and returns that loss.
    pub fn backward(
        &self,
        params: &[f64],
        x: &[f64],
        forward: &MilForward,
        label: bool,
        grads: &mut [f64],
    ) -> f64 {
        let (d, l, a) = self.config.dims();
        let lay = &self.layout;
        let MilForward {
            n,
            h,
            gates,
            attention,
            bag,
            logit,
            ..
        } = forward;
        let n = *n;

        // logit = c . m + c0:  dc = dlogit m,  dm = dlogit c,  dlogit = p - y.
        let dlogit = sigmoid(*logit) - label as u8 as f64;
        let c = &params[lay.c.clone()];
        grads[lay.c0.start] += dlogit;
        for (g, m) in grads[lay.c.clone()].iter_mut().zip(bag) {
            *g += dlogit * m;
        }
        let dm: Vec<f64> = c.iter().map(|c| dlogit * c).collect();

        // m = sum_i a_i h_i:  da_i = dm . h_i;  softmax: de_i = a_i (da_i - sum_j a_j da_j).
        let da: Vec<f64> = h
            .chunks_exact(l)
            .map(|row| row.iter().zip(&dm).map(|(h, d)| h * d).sum())
            .collect();
        let mean: f64 = da.iter().zip(attention).map(|(d, a)| d * a).sum();
        let de: Vec<f64> = da
            .iter()
            .zip(attention)
            .map(|(d, a)| a * (d - mean))
            .collect();

        // e_i = w . (t_i s_i) + bw; t = tanh(.) so dt' = dt (1 - t^2); s = sigmoid(.) so
        // ds' = ds s (1 - s). The pre-activation gradients fill one n x 2A matrix.
        let w = &params[lay.w.clone()];
        let mut dpre = vec![0.0; n * 2 * a];
        for ((row, drow), &de) in gates
            .chunks_exact(2 * a)
            .zip(dpre.chunks_exact_mut(2 * a))
            .zip(&de)
        {
            let (t, s) = row.split_at(a);
            let (dt, ds) = drow.split_at_mut(a);
            for k in 0..a {
                grads[lay.w.start + k] += de * t[k] * s[k];
                let dg = de * w[k];
                dt[k] = dg * s[k] * (1.0 - t[k] * t[k]);
                ds[k] = dg * t[k] * s[k] * (1.0 - s[k]);
            }
            grads[lay.bw.start] += de;
        }
        for drow in dpre.chunks_exact(2 * a) {
            for (g, v) in grads[lay.gate_bias.clone()].iter_mut().zip(drow) {
                *g += v;
            }
        }
        // [V; U] h:  d[V; U] += dpre^T H,  dH = dpre [V; U] + a_i dm.
        gemm(
            &mut grads[lay.gates.clone()],
            l,
            true,
            Mat::rows(&dpre, n, 2 * a).t(),
            Mat::rows(h, n, l),
        );
        let mut dh = vec![0.0; n * l];
        gemm(
            &mut dh,
            l,
            false,
            Mat::rows(&dpre, n, 2 * a),
            Mat::rows(&params[lay.gates.clone()], 2 * a, l),
        );
        // h = ReLU(W1 x + b1): only active units pass the gradient.
        for ((drow, row), &weight) in dh.chunks_exact_mut(l).zip(h.chunks_exact(l)).zip(attention) {
            for ((dv, v), dm) in drow.iter_mut().zip(row).zip(&dm) {
                *dv = if *v > 0.0 { *dv + weight * dm } else { 0.0 };
            }
        }
        for drow in dh.chunks_exact(l) {
            for (g, v) in grads[lay.b1.clone()].iter_mut().zip(drow) {
                *g += v;
            }
        }
        gemm(
            &mut grads[lay.w1.clone()],
            d,
            true,
            Mat::rows(&dh, n, l).t(),
            Mat::rows(x, n, d),
        );
        bce_with_logit(*logit, label)
    }
}
