//! The network: its modules and where every tensor lives: the flat parameter buffer (in the order of the
//! PyTorch reference model's `parameters()`), the flat running-statistics buffer, and the
//! reference `state_dict` names and shapes of both.

use std::ops::Range;

use super::config::{NetConfig, STAGES};
use crate::engine::Conv2d;

/// One named tensor inside a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl TensorEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// A convolution without bias: its weight view `[Cout, Cin, k, k]` and geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub weight: Range<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvParams {
    /// This convolution over `batch` images of `h x w`.
    pub fn shape(&self, batch: usize, (h, w): (usize, usize)) -> Conv2d {
        Conv2d::new(
            batch,
            (self.in_channels, self.out_channels),
            (h, w),
            (self.kernel, self.stride, self.pad),
        )
    }
}

/// A BatchNorm2d: views of `[weight; bias]` in the parameters and `[running_mean;
/// running_var]` in the running statistics, and its index among all batch norms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BnParams {
    pub affine: Range<usize>,
    pub running: Range<usize>,
    pub channels: usize,
    pub index: usize,
}

/// torchvision's BasicBlock: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, the
/// shortcut a 1x1 convolution + batch norm when the stride or the channels change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicBlock {
    pub conv1: ConvParams,
    pub bn1: BnParams,
    pub conv2: ConvParams,
    pub bn2: BnParams,
    pub downsample: Option<(ConvParams, BnParams)>,
}

/// A linear layer: the view `[weight; bias]`, weight `[out, in]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearParams {
    pub weight_bias: Range<usize>,
    pub in_features: usize,
    pub out_features: usize,
}

/// The whole network's structure and tensor layout.
#[derive(Clone, Debug)]
pub struct Network {
    pub config: NetConfig,
    /// Trainable tensors in `parameters()` order; offsets into the parameter buffer.
    pub params: Vec<TensorEntry>,
    /// `running_mean` and `running_var` of every batch norm; offsets into the running
    /// statistics buffer.
    pub running: Vec<TensorEntry>,
    /// Module name of every batch norm (for its `num_batches_tracked`).
    pub batch_norms: Vec<String>,
    pub stem_conv: ConvParams,
    pub stem_bn: BnParams,
    pub blocks: Vec<BasicBlock>,
    pub proj_hidden: LinearParams,
    pub proj_out: LinearParams,
}

struct Builder {
    params: Vec<TensorEntry>,
    running: Vec<TensorEntry>,
    batch_norms: Vec<String>,
    param_len: usize,
    running_len: usize,
}

impl Builder {
    fn param(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let entry = TensorEntry {
            name,
            shape,
            offset: self.param_len,
        };
        self.param_len += entry.len();
        let range = entry.range();
        self.params.push(entry);
        range
    }

    fn running(&mut self, name: String, channels: usize) -> Range<usize> {
        let entry = TensorEntry {
            name,
            shape: vec![channels],
            offset: self.running_len,
        };
        self.running_len += channels;
        let range = entry.range();
        self.running.push(entry);
        range
    }

    fn conv(
        &mut self,
        name: String,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
    ) -> ConvParams {
        ConvParams {
            weight: self.param(format!("{name}.weight"), vec![cout, cin, kernel, kernel]),
            in_channels: cin,
            out_channels: cout,
            kernel,
            stride,
            pad: kernel / 2,
        }
    }

    fn bn(&mut self, name: String, channels: usize) -> BnParams {
        let weight = self.param(format!("{name}.weight"), vec![channels]);
        let bias = self.param(format!("{name}.bias"), vec![channels]);
        let mean = self.running(format!("{name}.running_mean"), channels);
        let var = self.running(format!("{name}.running_var"), channels);
        self.batch_norms.push(name);
        BnParams {
            affine: weight.start..bias.end,
            running: mean.start..var.end,
            channels,
            index: self.batch_norms.len() - 1,
        }
    }

    fn linear(&mut self, name: &str, fin: usize, fout: usize) -> LinearParams {
        let weight = self.param(format!("{name}.weight"), vec![fout, fin]);
        let bias = self.param(format!("{name}.bias"), vec![fout]);
        LinearParams {
            weight_bias: weight.start..bias.end,
            in_features: fin,
            out_features: fout,
        }
    }
}

impl Network {
    /// The layout of `config`. Module names follow the reference model: the encoder is
    /// `nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4, avgpool)`, so its convolution
    /// is `encoder.0`, its batch norm `encoder.1` and stage `i` is `encoder.{4+i}`; the
    /// projector is `projector.fc = Sequential(Linear, ReLU, Linear)`.
    pub fn new(config: NetConfig) -> Self {
        let mut b = Builder {
            params: Vec::new(),
            running: Vec::new(),
            batch_norms: Vec::new(),
            param_len: 0,
            running_len: 0,
        };
        let stem_conv = b.conv("encoder.0".into(), 3, config.width, 7, 2);
        let stem_bn = b.bn("encoder.1".into(), config.width);
        let mut blocks = Vec::new();
        let mut cin = config.width;
        for stage in 0..STAGES {
            let cout = config.stage_channels(stage);
            for block in 0..config.blocks[stage] {
                let name = format!("encoder.{}.{block}", 4 + stage);
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                let conv1 = b.conv(format!("{name}.conv1"), cin, cout, 3, stride);
                let bn1 = b.bn(format!("{name}.bn1"), cout);
                let conv2 = b.conv(format!("{name}.conv2"), cout, cout, 3, 1);
                let bn2 = b.bn(format!("{name}.bn2"), cout);
                let downsample = (stride != 1 || cin != cout).then(|| {
                    let conv = b.conv(format!("{name}.downsample.0"), cin, cout, 1, stride);
                    (conv, b.bn(format!("{name}.downsample.1"), cout))
                });
                blocks.push(BasicBlock {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    downsample,
                });
                cin = cout;
            }
        }
        let d = config.feature_dim();
        let proj_hidden = b.linear("projector.fc.0", d, d);
        let proj_out = b.linear("projector.fc.2", d, config.out_dim);
        Self {
            config,
            params: b.params,
            running: b.running,
            batch_norms: b.batch_norms,
            stem_conv,
            stem_bn,
            blocks,
            proj_hidden,
            proj_out,
        }
    }

    /// Length of the flat parameter buffer (and of the gradients and momentum).
    pub fn param_len(&self) -> usize {
        self.params.last().map_or(0, |e| e.range().end)
    }

    /// Length of the flat running-statistics buffer.
    pub fn running_len(&self) -> usize {
        self.running.last().map_or(0, |e| e.range().end)
    }

    /// The parameter called `name` (a reference `state_dict` name): its named view.
    pub fn param(&self, name: &str) -> Option<&TensorEntry> {
        self.params.iter().find(|e| e.name == name)
    }

    /// Every convolution in the network, in order.
    pub fn convs(&self) -> impl Iterator<Item = &ConvParams> {
        std::iter::once(&self.stem_conv).chain(self.blocks.iter().flat_map(|b| {
            [&b.conv1, &b.conv2]
                .into_iter()
                .chain(b.downsample.as_ref().map(|(c, _)| c))
        }))
    }

    /// Every batch norm in the network, in order.
    pub fn bns(&self) -> impl Iterator<Item = &BnParams> {
        std::iter::once(&self.stem_bn).chain(self.blocks.iter().flat_map(|b| {
            [&b.bn1, &b.bn2]
                .into_iter()
                .chain(b.downsample.as_ref().map(|(_, n)| n))
        }))
    }

    pub fn linears(&self) -> [&LinearParams; 2] {
        [&self.proj_hidden, &self.proj_out]
    }

    /// Every convolution of one forward pass of `batch` images at `crop x crop`, in order
    /// (the max pool after the stem included in the following inputs).
    pub fn conv_shapes(&self, batch: usize, crop: usize) -> Vec<Conv2d> {
        let stem = self.stem_conv.shape(batch, (crop, crop));
        let mut size = (stem.out_h() + 2 - 3) / 2 + 1; // max pool 3x3/2, pad 1
        let mut convs = vec![stem];
        for block in &self.blocks {
            if let Some((conv, _)) = &block.downsample {
                convs.push(conv.shape(batch, (size, size)));
            }
            let first = block.conv1.shape(batch, (size, size));
            size = first.out_h();
            convs.push(first);
            convs.push(block.conv2.shape(batch, (size, size)));
        }
        convs
    }

    /// Multiply-adds of one image's forward pass at `crop x crop` in the convolutions and
    /// linear layers (a backward pass costs about twice as many).
    pub fn forward_macs(&self, crop: usize) -> u64 {
        let convs: u64 = self
            .conv_shapes(1, crop)
            .iter()
            .map(|s| s.macs() as u64)
            .sum();
        convs
            + self
                .linears()
                .iter()
                .map(|l| (l.in_features * l.out_features) as u64)
                .sum::<u64>()
    }

    /// An upper estimate of the host memory, in bytes, of a training step whose larger
    /// task has `batch` images at `crop x crop`: both passes' kept activations (each
    /// convolution's output and its batch norm's), the backward's temporaries, and the five
    /// flat buffers (parameters, momentum, g1, g2, running statistics).
    pub fn step_memory_bytes(&self, batch: usize, crop: usize) -> u64 {
        let convs = self.conv_shapes(1, crop);
        let per_image: u64 = convs.iter().map(|s| 2 * s.out_len() as u64).sum();
        let largest = convs.iter().map(|s| s.out_len() as u64).max().unwrap_or(0);
        let input = (3 * crop * crop) as u64;
        let floats = 2 * batch as u64 * (per_image + input)
            + 4 * batch as u64 * largest
            + 5 * self.param_len() as u64;
        4 * floats
    }
}
