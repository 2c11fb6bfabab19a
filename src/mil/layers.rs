//! What both MIL heads are built of, in f64 over row-major matrices: named parameter tensors
//! in one flat vector with PyTorch's initializations, linear layers and their backward,
//! softmax, and the cross-entropy of two-class logits.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::matmul::{Mat, gemm};

/// How a parameter tensor starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Standard normal (`torch.randn`).
    Normal,
    /// Uniform in +-1/sqrt(fan_in), as `nn.Linear` initializes weights and biases.
    Uniform { fan_in: usize },
    /// The Euclidean norm of another tensor (weight normalization's `g = |v|` at creation).
    NormOf(Range<usize>),
}

/// A named tensor of the flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTensor {
    /// Its `state_dict` name.
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    pub init: Init,
}

/// Lays tensors out one after the other in a flat vector.
#[derive(Default)]
pub struct TensorTable {
    pub tensors: Vec<ParamTensor>,
}

impl TensorTable {
    /// Appends the tensor `name` and returns where it lives.
    pub fn take(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> Range<usize> {
        let start = self.len();
        let range = start..start + shape.iter().product::<usize>();
        self.tensors.push(ParamTensor {
            name: name.into(),
            shape: shape.to_vec(),
            range: range.clone(),
            init,
        });
        range
    }

    /// A `Linear(inputs, outputs)` layer named `name.weight` and `name.bias`.
    pub fn linear(&mut self, name: &str, inputs: usize, outputs: usize) -> Linear {
        let init = Init::Uniform { fan_in: inputs };
        Linear {
            weight: self.take(format!("{name}.weight"), &[outputs, inputs], init.clone()),
            bias: self.take(format!("{name}.bias"), &[outputs], init),
        }
    }

    pub fn len(&self) -> usize {
        self.tensors.last().map_or(0, |t| t.range.end)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Draws every tensor of `tensors` as its [`Init`] says, in order, from ChaCha8 seeded with
/// `seed`; norms are taken after every other tensor is drawn.
pub fn init_params(tensors: &[ParamTensor], seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = vec![0.0; tensors.last().map_or(0, |t| t.range.end)];
    for t in tensors {
        let values = &mut params[t.range.clone()];
        match t.init {
            Init::Normal => values
                .iter_mut()
                .for_each(|p| *p = rng.sample(StandardNormal)),
            Init::Uniform { fan_in } => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                values
                    .iter_mut()
                    .for_each(|p| *p = rng.random_range(-bound..bound));
            }
            Init::NormOf(_) => {}
        }
    }
    for t in tensors {
        if let Init::NormOf(of) = &t.init {
            let norm = params[of.clone()].iter().map(|v| v * v).sum::<f64>().sqrt();
            params[t.range.clone()].fill(norm);
        }
    }
    params
}

/// Where a `Linear(inputs, outputs)` layer's weight (`outputs x inputs`) and bias live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linear {
    pub weight: Range<usize>,
    pub bias: Range<usize>,
}

impl Linear {
    fn outputs(&self) -> usize {
        self.bias.len()
    }

    fn inputs(&self) -> usize {
        self.weight.len() / self.outputs()
    }

    /// `x W^T + b` for the rows of `x` (`n x inputs`): `n x outputs`.
    pub fn forward(&self, params: &[f64], x: &[f64]) -> Vec<f64> {
        let (i, o) = (self.inputs(), self.outputs());
        let n = x.len() / i;
        let mut y: Vec<f64> = params[self.bias.clone()].repeat(n);
        gemm(
            &mut y,
            o,
            true,
            Mat::rows(x, n, i),
            Mat::rows(&params[self.weight.clone()], o, i).t(),
        );
        y
    }

    /// Adds the parameter gradients of `dy` (`n x outputs`) at input `x`:
    /// `dW += dy^T x`, `db += sum over rows of dy`.
    pub fn backward_params(&self, x: &[f64], dy: &[f64], grads: &mut [f64]) {
        let (i, o) = (self.inputs(), self.outputs());
        let n = dy.len() / o;
        gemm(
            &mut grads[self.weight.clone()],
            i,
            true,
            Mat::rows(dy, n, o).t(),
            Mat::rows(x, n, i),
        );
        let db = &mut grads[self.bias.clone()];
        for row in dy.chunks_exact(o) {
            db.iter_mut().zip(row).for_each(|(g, d)| *g += d);
        }
    }

    /// Adds the input gradient `dy W` to `dx` (`n x inputs`).
    pub fn backward_input(&self, params: &[f64], dy: &[f64], dx: &mut [f64]) {
        let (i, o) = (self.inputs(), self.outputs());
        let n = dy.len() / o;
        gemm(
            dx,
            i,
            true,
            Mat::rows(dy, n, o),
            Mat::rows(&params[self.weight.clone()], o, i),
        );
    }
}

/// The product `lhs rhs` as a new row-major matrix.
pub(crate) fn product(lhs: Mat<f64>, rhs: Mat<f64>) -> Vec<f64> {
    let mut out = vec![0.0; lhs.rows * rhs.cols];
    gemm(&mut out, rhs.cols, false, lhs, rhs);
    out
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax of `v` in place (shifted by its maximum).
pub fn softmax(v: &mut [f64]) {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    v.iter_mut().for_each(|x| *x = (*x - max).exp());
    let total: f64 = v.iter().sum();
    v.iter_mut().for_each(|x| *x /= total);
}

/// Backward of `y = softmax(x)`: `dx = y * (dy - y . dy)`.
pub fn softmax_backward(y: &[f64], dy: &[f64]) -> Vec<f64> {
    let dot: f64 = y.iter().zip(dy).map(|(y, d)| y * d).sum();
    y.iter().zip(dy).map(|(y, d)| y * (d - dot)).collect()
}

/// Cross-entropy of two-class logits `z` against class `target`, and its gradient
/// `softmax(z) - onehot(target)`.
pub fn cross_entropy(z: [f64; 2], target: usize) -> (f64, [f64; 2]) {
    let mut p = z;
    softmax(&mut p);
    let lse = z[0].max(z[1]) + (-(z[0] - z[1]).abs()).exp().ln_1p();
    let mut grad = p;
    grad[target] -= 1.0;
    (lse - z[target], grad)
}

/// Index of the largest value (the first of equals).
pub fn argmax(v: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.into_iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}
