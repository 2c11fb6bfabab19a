//! The model's host-side state: what a checkpoint holds and what a step starts from.

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use super::config::NetConfig;
use super::network::Network;

/// Parameters, running statistics and batch counters of one network, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelState {
    pub config: NetConfig,
    /// Flat, in `parameters()` order (see [`Network::params`]).
    pub params: Vec<f32>,
    /// Flat running means and variances (see [`Network::running`]).
    pub running: Vec<f32>,
    /// `num_batches_tracked` of every batch norm (see [`Network::batch_norms`]).
    pub batches_tracked: Vec<i64>,
}

impl ModelState {
    /// A freshly initialized network, as torchvision and PyTorch initialize it:
    /// convolutions Kaiming-normal with `fan_out` and ReLU gain (`std = sqrt(2 / (Cout k k))`),
    /// batch norms weight 1 and bias 0 with running mean 0 and variance 1, linear layers
    /// PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weight and bias.
    /// The same seed always gives the same parameters (ChaCha8).
    pub fn init(config: NetConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let net = Network::new(config);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = vec![0.0f32; net.param_len()];
        for conv in net.convs() {
            let fan_out = conv.out_channels * conv.kernel * conv.kernel;
            let normal = Normal::new(0.0, (2.0 / fan_out as f64).sqrt())?;
            for p in &mut params[conv.weight.clone()] {
                *p = normal.sample(&mut rng) as f32;
            }
        }
        for bn in net.bns() {
            params[bn.affine.start..bn.affine.start + bn.channels].fill(1.0);
        }
        for lin in net.linears() {
            let bound = 1.0 / (lin.in_features as f64).sqrt();
            let uniform = Uniform::new_inclusive(-bound, bound)?;
            for p in &mut params[lin.weight_bias.clone()] {
                *p = uniform.sample(&mut rng) as f32;
            }
        }
        let mut running = vec![0.0f32; net.running_len()];
        for bn in net.bns() {
            running[bn.running.start + bn.channels..bn.running.end].fill(1.0);
        }
        Ok(Self {
            config,
            params,
            running,
            batches_tracked: vec![0; net.batch_norms.len()],
        })
    }

    /// Checks the buffers against the layout of `self.config`.
    pub fn validate(&self) -> Result<Network> {
        self.config.validate()?;
        let net = Network::new(self.config);
        ensure!(
            self.params.len() == net.param_len()
                && self.running.len() == net.running_len()
                && self.batches_tracked.len() == net.batch_norms.len(),
            "model state does not match the layout of {}",
            self.config
        );
        Ok(net)
    }
}
