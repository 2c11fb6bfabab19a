//! PAMIL, the reference's prototype-based attention MIL head (adapted there from Liu et al.),
//! as the reference module computes it, quirks included (docs/METHOD.md section 7.3), with
//! its hand-derived backward in f64.
//!
//! For a bag X (n x D), prototypes P (p x D), rownorm(x) = x / max(|x|, 1e-12) per row:
//!   Q = rownorm(relu(fc(P))),  H = rownorm(relu(fc(X)))                 p x L, n x L
//!   PA = sigmoid(att_b(H)) tanh(att_a(Q))^T                              n x p
//!   Araw = (att_c(PA))^T,  A = softmax of each row of Araw over the instances   2 x n
//!   M = rownorm(A H),  logit_c = w_c . M_c + b_c,  w_c = g_c v_c / |v_c|
//! With proto_pred: s_j = max_i PA[i, j], s /= max_j s_j, pi = softmax(s),
//!   proto_logits = proto_pred_classifier(pi Q), logits = (1 - w) logits + w proto_logits.
//! Training loss: CE(logits, y) + l_clst (1 - mean_i max_j S) + l_pclst (1 - mean_j max_i S)
//!   with S = softmax of each row of PA over the prototypes; plus, with proto_pred,
//!   l_er KL(softmax(proto_logits) (held constant) || softmax(bag logits) + 1e-8); plus, with
//!   inst_pred, l_inst times the mean over both classes of the instance classifiers' CE on
//!   the k instances of highest (and, for the bag's class, lowest) abnormal-class attention.

use std::ops::Range;

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::layers::{
    Init, Linear, ParamTensor, TensorTable, argmax, cross_entropy, product, sigmoid, softmax,
    softmax_backward,
};
use crate::checkpoint::TensorFile;
use crate::matmul::Mat;

/// The two classes: 0 normal, 1 abnormal.
const CLASSES: usize = 2;
/// `F.normalize`'s floor on a row's norm.
const NORM_EPS: f64 = 1e-12;
/// The floor ERLoss adds to the bag probabilities before their log.
const ER_EPS: f64 = 1e-8;

/// How the prototypes start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProtoInit {
    /// Standard normal, as the reference.
    Normal,
    /// The centres of a k-means clustering of the training instances (PAMIL's authors' way).
    Kmeans,
}

/// The weights of PAMIL's training losses and the instance sampling (training only).
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PamilLosses {
    /// Instances per side the instance classifiers train on (with --inst-pred); capped by
    /// the bag size.
    #[arg(long, default_value_t = 8)]
    pub k_sample: usize,
    /// Weight of the instance-to-prototype clustering loss.
    #[arg(long, default_value_t = 0.005)]
    pub lambda_clst: f64,
    /// Weight of the prototype-to-instance clustering loss.
    #[arg(long, default_value_t = 0.005)]
    pub lambda_proto_clst: f64,
    /// Weight of the KL loss between the prototype and the bag predictions (with --proto-pred).
    #[arg(long, default_value_t = 0.1)]
    pub lambda_er: f64,
    /// Weight of the instance classifiers' loss (with --inst-pred).
    #[arg(long, default_value_t = 0.5)]
    pub lambda_inst: f64,
}

/// PAMIL's settings, as the reference's flags.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PamilSettings {
    /// Number of prototypes.
    #[arg(long, default_value_t = 10)]
    pub prototypes: usize,
    /// Add the prototype prediction: mixed into the bag logits, and the KL loss between them.
    #[arg(long)]
    pub proto_pred: bool,
    /// Weight of the prototype logits in the mix (with --proto-pred).
    #[arg(long, default_value_t = 0.5)]
    pub proto_weight: f64,
    /// Add the instance classifiers and their loss.
    #[arg(long)]
    pub inst_pred: bool,
    #[command(flatten)]
    pub losses: PamilLosses,
    /// How the prototypes start: normal (the reference) or kmeans of the training instances.
    #[arg(long, value_enum, default_value_t = ProtoInit::Normal)]
    pub proto_init: ProtoInit,
}

impl Default for PamilSettings {
    /// The reference's defaults.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let command = Self::augment_args(clap::Command::new("pamil"));
        Self::from_arg_matches(&command.get_matches_from(["pamil"])).expect("the defaults parse")
    }
}

impl PamilSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.prototypes >= 1, "--prototypes must be at least 1");
        ensure!(self.losses.k_sample >= 1, "--k-sample must be at least 1");
        ensure!(
            (0.0..=1.0).contains(&self.proto_weight),
            "--proto-weight must be between 0 and 1, not {}",
            self.proto_weight
        );
        let l = &self.losses;
        for (flag, v) in [
            ("--lambda-clst", l.lambda_clst),
            ("--lambda-proto-clst", l.lambda_proto_clst),
            ("--lambda-er", l.lambda_er),
            ("--lambda-inst", l.lambda_inst),
        ] {
            ensure!(
                v >= 0.0 && v.is_finite(),
                "{flag} must be a non-negative number, not {v}"
            );
        }
        Ok(())
    }

    /// The head these settings build over `input_dim` features with `hidden` and
    /// `attention` units.
    pub fn config(&self, input_dim: usize, hidden: usize, attention: usize) -> PamilConfig {
        PamilConfig {
            input_dim,
            hidden,
            attention,
            prototypes: self.prototypes,
            proto_pred: self.proto_pred,
            inst_pred: self.inst_pred,
            proto_weight: self.proto_weight,
        }
    }
}

/// The shape of a PAMIL head and its optional branches.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PamilConfig {
    /// Feature size D of an instance.
    pub input_dim: usize,
    /// Size L of `fc` (512 in the reference's "small" and "big").
    pub hidden: usize,
    /// Size of the gated attention branches (256 "small", 384 "big").
    pub attention: usize,
    /// Number p of prototypes.
    pub prototypes: usize,
    pub proto_pred: bool,
    pub inst_pred: bool,
    /// Weight of the prototype logits in the mix (with `proto_pred`).
    pub proto_weight: f64,
}

/// A weight-normalized `Linear(L, 1)`: `w = g v / |v|`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightNormLinear {
    pub bias: Range<usize>,
    /// `parametrizations.weight.original0`, `[1, 1]`.
    pub g: Range<usize>,
    /// `parametrizations.weight.original1`, `[1, L]`.
    pub v: Range<usize>,
}

/// Where each tensor lives in the flat parameter vector. The tensors the curriculum freezes
/// come first (`..frozen`).
#[derive(Clone, Debug)]
pub struct PamilLayout {
    pub proto: Range<usize>,
    pub fc: Linear,
    pub proto_pred: Option<Linear>,
    pub attention_a: Linear,
    pub attention_b: Linear,
    pub attention_c: Linear,
    pub classifiers: [WeightNormLinear; CLASSES],
    pub instance: Option<[Linear; CLASSES]>,
    /// End of the tensors whose name contains "proto" or "fc": the reference freezes those
    /// (`proto`, `fc.0`, and `proto_pred_classifier.0` too, by that substring match).
    pub frozen: usize,
    pub tensors: Vec<ParamTensor>,
}

impl PamilLayout {
    fn new(c: &PamilConfig) -> Self {
        let (d, l, a, p) = (c.input_dim, c.hidden, c.attention, c.prototypes);
        let mut t = TensorTable::default();
        let proto = t.take("proto", &[p, d], Init::Normal);
        let fc = t.linear("fc.0", d, l);
        let proto_pred = c
            .proto_pred
            .then(|| t.linear("proto_pred_classifier.0", l, CLASSES));
        let frozen = t.len();
        let attention_a = t.linear("attention_net.attention_a.0", l, a);
        let attention_b = t.linear("attention_net.attention_b.0", l, a);
        let attention_c = t.linear("attention_net.attention_c", p, CLASSES);
        let mut classifier = |c: usize| {
            let name = format!("classifiers.{c}");
            let fan_in = Init::Uniform { fan_in: l };
            let bias = t.take(format!("{name}.bias"), &[1], fan_in.clone());
            let v = t.take(
                format!("{name}.parametrizations.weight.original1"),
                &[1, l],
                fan_in,
            );
            let g = t.take(
                format!("{name}.parametrizations.weight.original0"),
                &[1, 1],
                Init::NormOf(v.clone()),
            );
            WeightNormLinear { bias, g, v }
        };
        let classifiers = [classifier(0), classifier(1)];
        let instance = c
            .inst_pred
            .then(|| [0, 1].map(|c| t.linear(&format!("instance_classifiers.{c}"), l, CLASSES)));
        Self {
            proto,
            fc,
            proto_pred,
            attention_a,
            attention_b,
            attention_c,
            classifiers,
            instance,
            frozen,
            tensors: t.tensors,
        }
    }

    pub fn len(&self) -> usize {
        self.tensors.last().map_or(0, |t| t.range.end)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows after ReLU (or pooling) and after row normalization, kept for the backward.
#[derive(Clone, Debug)]
struct Normalized {
    /// Before the normalization.
    raw: Vec<f64>,
    /// Each row's norm, unclamped.
    norms: Vec<f64>,
    out: Vec<f64>,
}

impl Normalized {
    fn new(raw: Vec<f64>, cols: usize) -> Self {
        let mut out = raw.clone();
        let norms = out
            .chunks_exact_mut(cols)
            .map(|row| {
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                row.iter_mut().for_each(|v| *v /= norm.max(NORM_EPS));
                norm
            })
            .collect();
        Self { raw, norms, out }
    }

    /// The gradient at `raw` of `dout`: `(dout - (dout . out) out) / |x|` per row, or
    /// `dout / eps` where the floor holds the norm.
    fn backward(&self, dout: &[f64]) -> Vec<f64> {
        let cols = self.out.len() / self.norms.len();
        let mut draw = dout.to_vec();
        for ((d, y), &norm) in draw
            .chunks_exact_mut(cols)
            .zip(self.out.chunks_exact(cols))
            .zip(&self.norms)
        {
            if norm > NORM_EPS {
                let dot: f64 = d.iter().zip(y).map(|(d, y)| d * y).sum();
                d.iter_mut()
                    .zip(y)
                    .for_each(|(d, y)| *d = (*d - dot * y) / norm);
            } else {
                d.iter_mut().for_each(|d| *d /= NORM_EPS);
            }
        }
        draw
    }

    /// [`Self::backward`] followed by the ReLU that produced `raw`.
    fn backward_relu(&self, dout: &[f64]) -> Vec<f64> {
        let mut d = self.backward(dout);
        d.iter_mut()
            .zip(&self.raw)
            .for_each(|(d, &r)| *d = if r > 0.0 { *d } else { 0.0 });
        d
    }
}

/// The prototype branch's prediction, kept for the backward.
#[derive(Clone, Debug)]
struct ProtoPrediction {
    /// Per prototype, the instance of its largest `PA` entry.
    best: Vec<usize>,
    /// `s_j = max_i PA[i, j]`, before the division.
    scores: Vec<f64>,
    /// The prototype of the largest score.
    top: usize,
    /// `pi = softmax(s / s_top)`.
    weights: Vec<f64>,
    /// `pi Q`.
    pooled: Vec<f64>,
    logits: [f64; 2],
}

/// Everything the forward pass keeps for the backward.
#[derive(Clone, Debug)]
pub struct PamilForward {
    pub n: usize,
    q: Normalized,
    h: Normalized,
    /// `tanh(att_a(Q))`, p x A.
    ta: Vec<f64>,
    /// `sigmoid(att_b(H))`, n x A.
    sb: Vec<f64>,
    /// `PA`, n x p.
    pub proto_a: Vec<f64>,
    /// `Araw`, 2 x n.
    pub a_raw: Vec<f64>,
    /// `A`: each row of `Araw` softmaxed over the instances, 2 x n.
    pub attention: Vec<f64>,
    m: Normalized,
    /// The per-class classifiers' logits, before the prototype mix.
    pub bag_logits: [f64; 2],
    proto: Option<ProtoPrediction>,
    /// The final logits (after the mix when `proto_pred`).
    pub logits: [f64; 2],
}

impl PamilForward {
    /// `softmax(logits)`: probabilities of normal and abnormal.
    pub fn probabilities(&self) -> [f64; 2] {
        let mut p = self.logits;
        softmax(&mut p);
        p
    }

    /// The reference's prediction: the argmax of the logits (normal on a tie).
    pub fn predicts_abnormal(&self) -> bool {
        self.logits[1] > self.logits[0]
    }

    /// The abnormal-class attention `A[1, :]`.
    pub fn abnormal_attention(&self) -> &[f64] {
        &self.attention[self.n..]
    }
}

/// Every loss of one bag.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PamilLossValues {
    pub ce: f64,
    pub clst: f64,
    pub proto_clst: f64,
    /// With `proto_pred`.
    pub er: Option<f64>,
    /// With `inst_pred`.
    pub inst: Option<f64>,
    /// The weighted sum that is trained.
    pub total: f64,
}

/// The PAMIL head; parameters live in a flat vector laid out by [`PamilLayout`].
#[derive(Clone, Debug)]
pub struct Pamil {
    pub config: PamilConfig,
    pub layout: PamilLayout,
}

impl Pamil {
    pub fn new(config: PamilConfig) -> Self {
        Self {
            layout: PamilLayout::new(&config),
            config,
        }
    }

    pub fn param_len(&self) -> usize {
        self.layout.len()
    }

    /// The reference's initialization: prototypes standard normal, `nn.Linear`'s uniform
    /// for every layer, `g = |v|` for the weight-normalized classifiers.
    pub fn init(&self, seed: u64) -> Vec<f64> {
        super::layers::init_params(&self.layout.tensors, seed)
    }

    /// Forward pass over a bag `x` of n instances (n x D, row-major; n >= 1).
    pub fn forward(&self, params: &[f64], x: &[f64]) -> PamilForward {
        let c = &self.config;
        let lay = &self.layout;
        let (d, l, a, p) = (c.input_dim, c.hidden, c.attention, c.prototypes);
        let n = x.len() / d;
        assert!(
            n > 0 && x.len() == n * d,
            "a bag of {} values is not n >= 1 rows of {d}",
            x.len()
        );
        let relu = |mut v: Vec<f64>| {
            v.iter_mut().for_each(|v| *v = v.max(0.0));
            v
        };
        let q = Normalized::new(relu(lay.fc.forward(params, &params[lay.proto.clone()])), l);
        let h = Normalized::new(relu(lay.fc.forward(params, x)), l);
        let mut ta = lay.attention_a.forward(params, &q.out);
        ta.iter_mut().for_each(|v| *v = v.tanh());
        let mut sb = lay.attention_b.forward(params, &h.out);
        sb.iter_mut().for_each(|v| *v = sigmoid(*v));
        let proto_a = product(Mat::rows(&sb, n, a), Mat::rows(&ta, p, a).t());
        let a_raw = transpose(&lay.attention_c.forward(params, &proto_a), n, CLASSES);
        let mut attention = a_raw.clone();
        attention.chunks_exact_mut(n).for_each(softmax);
        let pooled = product(Mat::rows(&attention, CLASSES, n), Mat::rows(&h.out, n, l));
        let m = Normalized::new(pooled, l);
        let bag_logits = [0, 1].map(|class| {
            let cls = &lay.classifiers[class];
            let w = weight_norm(params, cls);
            let row = &m.out[class * l..(class + 1) * l];
            params[cls.bias.start] + w.iter().zip(row).map(|(w, m)| w * m).sum::<f64>()
        });
        let proto = lay.proto_pred.as_ref().map(|classifier| {
            let best: Vec<usize> = (0..p)
                .map(|j| argmax((0..n).map(|i| proto_a[i * p + j])))
                .collect();
            let scores: Vec<f64> = best
                .iter()
                .enumerate()
                .map(|(j, &i)| proto_a[i * p + j])
                .collect();
            let top = argmax(scores.iter().copied());
            let mut weights: Vec<f64> = scores.iter().map(|s| s / scores[top]).collect();
            softmax(&mut weights);
            let mut pooled = vec![0.0; l];
            for (w, row) in weights.iter().zip(q.out.chunks_exact(l)) {
                pooled.iter_mut().zip(row).for_each(|(m, q)| *m += w * q);
            }
            let logits = classifier.forward(params, &pooled);
            ProtoPrediction {
                best,
                scores,
                top,
                weights,
                pooled,
                logits: [logits[0], logits[1]],
            }
        });
        let logits = match &proto {
            None => bag_logits,
            Some(pp) => {
                let w = c.proto_weight;
                [0, 1].map(|k| bag_logits[k] * (1.0 - w) + pp.logits[k] * w)
            }
        };
        PamilForward {
            n,
            q,
            h,
            ta,
            sb,
            proto_a,
            a_raw,
            attention,
            m,
            bag_logits,
            proto,
            logits,
        }
    }

    /// Every loss of the bag `x` with label `abnormal`, and their weighted total's gradient
    /// with respect to every parameter added to `grads`.
    pub fn backward(
        &self,
        params: &[f64],
        x: &[f64],
        f: &PamilForward,
        abnormal: bool,
        losses: &PamilLosses,
        grads: &mut [f64],
    ) -> PamilLossValues {
        let c = &self.config;
        let lay = &self.layout;
        let (l, a, p, n) = (c.hidden, c.attention, c.prototypes, f.n);
        let y = abnormal as usize;

        // CE on the final logits: dlogits = softmax(logits) - onehot(y).
        let (ce, dlogits) = cross_entropy(f.logits, y);
        let mut dbag = dlogits;
        let mut dq = vec![0.0; p * l];
        let mut dpa = vec![0.0; n * p];
        let mut er = None;
        if let (Some(pp), Some(classifier)) = (&f.proto, &lay.proto_pred) {
            let w = c.proto_weight;
            dbag = dlogits.map(|d| d * (1.0 - w));
            let dproto_logits = dlogits.map(|d| d * w);
            // KL with t = softmax(proto_logits) held constant and P = softmax(bag) + eps:
            // dKL/dP_c = -t_c / P_c, then through the softmax.
            let (mut t, mut prob) = (pp.logits, f.bag_logits);
            softmax(&mut t);
            softmax(&mut prob);
            er = Some(
                (0..CLASSES)
                    .map(|k| t[k] * (t[k].ln() - (prob[k] + ER_EPS).ln()))
                    .sum(),
            );
            let dprob: Vec<f64> = (0..CLASSES)
                .map(|k| -losses.lambda_er * t[k] / (prob[k] + ER_EPS))
                .collect();
            let der = softmax_backward(&prob, &dprob);
            dbag.iter_mut().zip(&der).for_each(|(d, e)| *d += e);

            Self::proto_prediction_backward(
                params,
                f,
                pp,
                classifier,
                &dproto_logits,
                (&mut dq, &mut dpa),
                grads,
            );
        }

        // logit_c = w_c . M_c + b_c with w_c = g v / |v|:
        // dg = dw . v / |v|,  dv = g / |v| (dw - (dw . v^) v^),  dw = dlogit_c M_c.
        let mut dm = vec![0.0; CLASSES * l];
        for (class, cls) in lay.classifiers.iter().enumerate() {
            let d = dbag[class];
            let m_row = &f.m.out[class * l..(class + 1) * l];
            grads[cls.bias.start] += d;
            let v = &params[cls.v.clone()];
            let g = params[cls.g.start];
            let norm = v.iter().map(|v| v * v).sum::<f64>().sqrt();
            let dw_dot_v: f64 = m_row.iter().zip(v).map(|(m, v)| d * m * v).sum::<f64>() / norm;
            grads[cls.g.start] += dw_dot_v;
            for ((gv, (&m, &vk)), dmk) in grads[cls.v.clone()]
                .iter_mut()
                .zip(m_row.iter().zip(v))
                .zip(&mut dm[class * l..(class + 1) * l])
            {
                *gv += g / norm * (d * m - dw_dot_v * vk / norm);
                *dmk = d * g * vk / norm;
            }
        }
        // M = rownorm(A H): dA = dMraw H^T, dH = A^T dMraw; then each row's softmax.
        let dpooled = f.m.backward(&dm);
        let dattention = product(
            Mat::rows(&dpooled, CLASSES, l),
            Mat::rows(&f.h.out, n, l).t(),
        );
        let mut dh = product(
            Mat::rows(&f.attention, CLASSES, n).t(),
            Mat::rows(&dpooled, CLASSES, l),
        );
        let da_raw: Vec<f64> = f
            .attention
            .chunks_exact(n)
            .zip(dattention.chunks_exact(n))
            .flat_map(|(a, d)| softmax_backward(a, d))
            .collect();
        // Araw^T = att_c(PA).
        let da_raw_t = transpose(&da_raw, CLASSES, n);
        lay.attention_c
            .backward_params(&f.proto_a, &da_raw_t, grads);
        lay.attention_c.backward_input(params, &da_raw_t, &mut dpa);

        let (clst, proto_clst) = clustering_losses(&f.proto_a, p, losses, &mut dpa);

        // PA = SB TA^T: dSB = dPA TA, dTA = dPA^T SB; sigmoid' = s (1 - s), tanh' = 1 - t^2.
        let mut dsb = product(Mat::rows(&dpa, n, p), Mat::rows(&f.ta, p, a));
        let mut dta = product(Mat::rows(&dpa, n, p).t(), Mat::rows(&f.sb, n, a));
        dsb.iter_mut()
            .zip(&f.sb)
            .for_each(|(d, s)| *d *= s * (1.0 - s));
        dta.iter_mut()
            .zip(&f.ta)
            .for_each(|(d, t)| *d *= 1.0 - t * t);
        lay.attention_b.backward_params(&f.h.out, &dsb, grads);
        lay.attention_b.backward_input(params, &dsb, &mut dh);
        lay.attention_a.backward_params(&f.q.out, &dta, grads);
        lay.attention_a.backward_input(params, &dta, &mut dq);

        let inst = lay
            .instance
            .is_some()
            .then(|| self.instance_loss(params, f, y, losses, grads, &mut dh));

        // H = rownorm(relu(fc(X))), Q = rownorm(relu(fc(proto))).
        let dh_raw = f.h.backward_relu(&dh);
        lay.fc.backward_params(x, &dh_raw, grads);
        let dq_raw = f.q.backward_relu(&dq);
        let proto = &params[lay.proto.clone()];
        lay.fc.backward_params(proto, &dq_raw, grads);
        lay.fc
            .backward_input(params, &dq_raw, &mut grads[lay.proto.clone()]);

        let total = ce
            + losses.lambda_clst * clst
            + losses.lambda_proto_clst * proto_clst
            + er.map_or(0.0, |e| losses.lambda_er * e)
            + inst.map_or(0.0, |i| losses.lambda_inst * i);
        PamilLossValues {
            ce,
            clst,
            proto_clst,
            er,
            inst,
            total,
        }
    }

    /// The prototype prediction's backward from `dproto_logits`: its classifier's gradient,
    /// and what reaches `Q` and `PA` (through `pi Q` and the scores' maxima) added to
    /// `dq` and `dpa`.
    fn proto_prediction_backward(
        params: &[f64],
        f: &PamilForward,
        pp: &ProtoPrediction,
        classifier: &Linear,
        dproto_logits: &[f64],
        (dq, dpa): (&mut [f64], &mut [f64]),
        grads: &mut [f64],
    ) {
        let p = pp.weights.len();
        let l = f.q.out.len() / p;
        // proto_logits = W (pi Q) + b;  d(pi Q) = W^T dlogits.
        classifier.backward_params(&pp.pooled, dproto_logits, grads);
        let mut dpooled = vec![0.0; l];
        classifier.backward_input(params, dproto_logits, &mut dpooled);
        // pi Q: dpi_j = dpooled . Q_j,  dQ_j += pi_j dpooled.
        let dweights: Vec<f64> =
            f.q.out
                .chunks_exact(l)
                .map(|row| row.iter().zip(&dpooled).map(|(q, d)| q * d).sum())
                .collect();
        for (dq_row, &wj) in dq.chunks_exact_mut(l).zip(&pp.weights) {
            dq_row
                .iter_mut()
                .zip(&dpooled)
                .for_each(|(g, d)| *g += wj * d);
        }
        // pi = softmax(s / s_top): ds_j += dz_j / s_top, ds_top -= sum_j dz_j s_j / s_top^2;
        // s_j = PA[best_j, j].
        let dz = softmax_backward(&pp.weights, &dweights);
        let top = pp.scores[pp.top];
        let mut ds: Vec<f64> = dz.iter().map(|d| d / top).collect();
        ds[pp.top] -= dz.iter().zip(&pp.scores).map(|(d, s)| d * s).sum::<f64>() / (top * top);
        for (j, (&i, d)) in pp.best.iter().zip(&ds).enumerate() {
            dpa[i * p + j] += d;
        }
    }

    /// The instance classifiers' loss (mean over both classes) and its gradient: class c
    /// trains on the k instances of highest abnormal-class attention (target 1 when the bag
    /// is of class c, else 0) and, for the bag's class, the k of lowest (target 0). Both
    /// classes rank by the abnormal row of `A`, as the reference does.
    fn instance_loss(
        &self,
        params: &[f64],
        f: &PamilForward,
        label: usize,
        losses: &PamilLosses,
        grads: &mut [f64],
        dh: &mut [f64],
    ) -> f64 {
        let classifiers = self.layout.instance.as_ref().expect("with inst_pred");
        let l = self.config.hidden;
        let k = losses.k_sample.min(f.n);
        let ranking = f.abnormal_attention();
        let mut order: Vec<usize> = (0..f.n).collect();
        order.sort_by(|&i, &j| ranking[j].total_cmp(&ranking[i]));
        let top = &order[..k];
        let bottom: Vec<usize> = order.iter().rev().take(k).copied().collect();
        let mut total = 0.0;
        for (class, classifier) in classifiers.iter().enumerate() {
            let samples: Vec<(usize, usize)> = if class == label {
                top.iter()
                    .map(|&i| (i, 1))
                    .chain(bottom.iter().map(|&i| (i, 0)))
                    .collect()
            } else {
                top.iter().map(|&i| (i, 0)).collect()
            };
            let rows: Vec<f64> = samples
                .iter()
                .flat_map(|&(i, _)| f.h.out[i * l..(i + 1) * l].iter().copied())
                .collect();
            let logits = classifier.forward(params, &rows);
            let scale = losses.lambda_inst / CLASSES as f64 / samples.len() as f64;
            let mut dlogits = Vec::with_capacity(logits.len());
            for (z, &(_, target)) in logits.chunks_exact(CLASSES).zip(&samples) {
                let (loss, d) = cross_entropy([z[0], z[1]], target);
                total += loss / samples.len() as f64;
                dlogits.extend(d.map(|d| d * scale));
            }
            classifier.backward_params(&rows, &dlogits, grads);
            let mut drows = vec![0.0; rows.len()];
            classifier.backward_input(params, &dlogits, &mut drows);
            for (&(i, _), d) in samples.iter().zip(drows.chunks_exact(l)) {
                dh[i * l..(i + 1) * l]
                    .iter_mut()
                    .zip(d)
                    .for_each(|(g, d)| *g += d);
            }
        }
        total / CLASSES as f64
    }

    /// The head saved in `file` under the reference's `state_dict` names after `prefix`
    /// (f64 or f32 tensors; the shape read off `proto`, `fc.0.weight` and
    /// `attention_net.attention_a.0.weight`, the branches off which tensors exist), with
    /// `proto_weight` (not part of a `state_dict`). Every tensor must be there with its
    /// shape, and no other.
    pub fn read(file: &TensorFile, prefix: &str, proto_weight: f64) -> Result<(Self, Vec<f64>)> {
        let shape = |name: &str| file.shape(&format!("{prefix}{name}"));
        let two = |name: &str| -> Result<[usize; 2]> {
            match shape(name)?[..] {
                [r, c] => Ok([r, c]),
                ref other => bail!("{prefix}{name} has shape {other:?}, expected two dimensions"),
            }
        };
        let [prototypes, input_dim] = two("proto")?;
        let [hidden, _] = two("fc.0.weight")?;
        let [attention, _] = two("attention_net.attention_a.0.weight")?;
        let names = file.names();
        let has = |name: &str| names.iter().any(|n| *n == format!("{prefix}{name}"));
        let config = PamilConfig {
            input_dim,
            hidden,
            attention,
            prototypes,
            proto_pred: has("proto_pred_classifier.0.weight"),
            inst_pred: has("instance_classifiers.0.weight"),
            proto_weight,
        };
        ensure!(
            [input_dim, hidden, attention, prototypes]
                .iter()
                .all(|&s| (1..=1 << 16).contains(&s)),
            "implausible PAMIL sizes {config:?}"
        );
        let model = Self::new(config);
        let mut params = vec![0.0; model.param_len()];
        for t in &model.layout.tensors {
            let name = format!("{prefix}{}", t.name);
            let shape = file.shape(&name)?;
            ensure!(
                shape == t.shape,
                "{name} has shape {shape:?}; a PAMIL head of {config:?} has {:?}",
                t.shape
            );
            let values = match file.tensor::<f64>(&name) {
                Ok((v, _)) => v,
                Err(_) => file
                    .tensor::<f32>(&name)?
                    .0
                    .into_iter()
                    .map(f64::from)
                    .collect(),
            };
            params[t.range.clone()].copy_from_slice(&values);
        }
        let ours = model.layout.tensors.len();
        let theirs = names.iter().filter(|n| n.starts_with(prefix)).count();
        ensure!(
            theirs == ours,
            "{theirs} tensors where a PAMIL head of {config:?} has {ours}"
        );
        Ok((model, params))
    }
}

/// The clustering losses of `PA` (`n x p`), `1 - mean_i max_j S` and `1 - mean_j max_i S`
/// with `S` the softmax of each row; their weighted gradient added to `dpa`: the maxima of
/// the rows (weight `-l_clst / n` each) and of the columns (`-l_pclst / p` each), then the
/// softmax.
fn clustering_losses(
    proto_a: &[f64],
    p: usize,
    losses: &PamilLosses,
    dpa: &mut [f64],
) -> (f64, f64) {
    let n = proto_a.len() / p;
    let mut s = proto_a.to_vec();
    s.chunks_exact_mut(p).for_each(softmax);
    // The maximum of each row and of each column of S, as (instance, prototype).
    let row_max: Vec<(usize, usize)> = (0..n)
        .map(|i| (i, argmax(s[i * p..(i + 1) * p].iter().copied())))
        .collect();
    let col_max: Vec<(usize, usize)> = (0..p)
        .map(|j| (argmax((0..n).map(|i| s[i * p + j])), j))
        .collect();
    let mut ds = vec![0.0; n * p];
    let mut loss = |maxima: &[(usize, usize)], weight: f64| {
        let count = maxima.len() as f64;
        for &(i, j) in maxima {
            ds[i * p + j] -= weight / count;
        }
        1.0 - maxima.iter().map(|&(i, j)| s[i * p + j]).sum::<f64>() / count
    };
    let clst = loss(&row_max, losses.lambda_clst);
    let proto_clst = loss(&col_max, losses.lambda_proto_clst);
    for ((dpa_row, s_row), ds_row) in dpa
        .chunks_exact_mut(p)
        .zip(s.chunks_exact(p))
        .zip(ds.chunks_exact(p))
    {
        let d = softmax_backward(s_row, ds_row);
        dpa_row.iter_mut().zip(d).for_each(|(g, d)| *g += d);
    }
    (clst, proto_clst)
}

/// `w = g v / |v|` of a weight-normalized classifier.
fn weight_norm(params: &[f64], cls: &WeightNormLinear) -> Vec<f64> {
    let v = &params[cls.v.clone()];
    let scale = params[cls.g.start] / v.iter().map(|v| v * v).sum::<f64>().sqrt();
    v.iter().map(|v| v * scale).collect()
}

/// The transpose of a `rows x cols` row-major matrix.
fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| x[r * cols + c]))
        .collect()
}
