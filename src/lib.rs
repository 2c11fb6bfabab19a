//! SLAM-AGS pretraining: slide-label aware multi-task learning with adaptive gradient
//! surgery, on a pure-Rust CPU reference engine and handwritten CUDA kernels.
//!
//! Layout of the crate:
//! - [`engine`]: the [`engine::Engine`] trait and its implementations (`cpu`, `cuda`);
//!   engines know tensors and ops, nothing about the network or the command line.
//! - [`model`]: the network defined once (flat parameter layout with named views, forward
//!   and hand-derived backward), the losses' use, gradient surgery and the optimizer,
//!   generic over the engine.
//! - [`data`]: the packed patch store, image folders and synthetic data to stores, the
//!   balanced sampler and the augmentation that turns patches into batches; knows no engine.
//! - [`gpu_data`]: the glue between the two: the CPU-drawn views as the CUDA view kernel's
//!   records, and the store's pixels on the GPU (resident, or streamed double-buffered).
//! - [`pretrain`]: a pretraining run: sampler, augmentation and step in a loop, with metrics,
//!   checkpoints and exact resume.
//! - [`embed`]: a trained model over every patch of a store, and the embeddings file.
//! - [`mil`]: downstream gated-attention multiple-instance learning and its metrics.
//! - [`memory`]: the memory a command may plan for, checked before work starts.
//! - [`plots`]: PNG charts of runs and results.
//! - [`checkpoint`]: safetensors checkpoints with the PyTorch reference model's names.
//! - [`cli`]: the `slam` command line.

pub mod atomic;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod embed;
pub mod engine;
pub mod gpu_data;
pub(crate) mod matmul;
pub mod memory;
pub mod mil;
pub mod model;
pub mod plots;
pub mod pretrain;
