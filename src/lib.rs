//! SLAM-AGS pretraining: slide-label aware multi-task learning with adaptive gradient
//! surgery, on a pure-Rust CPU reference engine and handwritten CUDA kernels.
//!
//! Layout of the crate (docs/ARCHITECTURE.md draws it), from the bottom up:
//! - [`engine`]: the [`engine::Engine`] trait (storage plus one trait per op family) and its
//!   implementations (`cpu`, `cuda`); engines know tensors and ops, nothing about the
//!   network, the data or the command line.
//! - [`data`]: the packed patch store; building stores offline (image folders, bags at a
//!   witness rate, synthetic cytology, whole slides) and training-time input (the balanced
//!   sampler, the augmentation, batches); knows no engine.
//! - [`model`]: the network defined once (flat parameter layout with named views, forward
//!   and hand-derived backward), the losses' use, gradient surgery and the step, generic
//!   over the engine.
//! - [`feed`]: where a step's views come from on each engine (host rendering, or the store's
//!   pixels on the GPU and the fused view kernel).
//! - [`pretrain`]: a pretraining run: sampler, augmentation and step in a loop, with metrics,
//!   checkpoints and exact resume.
//! - [`embed`]: a trained model over every patch of a store, and the embeddings file.
//! - [`mil`]: downstream multiple-instance learning heads (gated attention, and the
//!   reference's PAMIL) and their metrics.
//! - [`eval`]: instance-level evaluation of embeddings (linear probe, anomaly scores,
//!   retrieval, spread), no MIL head needed.
//! - [`pipeline`]: the programs the command line runs (the demo, the step dump, the
//!   benchmarks), as library functions.
//! - [`memory`]: the memory a command may plan for, checked before work starts.
//! - [`plots`]: PNG charts of runs and results.
//! - [`checkpoint`]: safetensors checkpoints with the PyTorch reference model's names.
//! - [`cli`]: the `slam` command line: parses, calls the library, prints.

pub mod atomic;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod embed;
pub mod engine;
pub mod eval;
pub mod feed;
pub(crate) mod matmul;
pub mod memory;
pub mod mil;
pub mod model;
pub mod pipeline;
pub mod plots;
pub mod pretrain;
