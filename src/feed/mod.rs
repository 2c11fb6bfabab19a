//! Feeding an engine: where a training step's four views come from. Every source renders the
//! same views for the same (seed, step, patches), the CPU augmentation being the reference:
//! [`HostViews`] renders them on the host and uploads them (any engine); on the CUDA engine,
//! [`DeviceViews`] renders them with the fused view kernel from the store's pixels on the
//! device ([`DeviceStore`]: resident, or streamed double-buffered), from the CPU-drawn view
//! parameters as the kernel's records (`records.rs`). [`Feed`] is an engine that knows how it
//! is fed; the pretraining loop asks it for its source.

mod records;
mod store;
mod views;

use anyhow::Result;
use clap::{Args, ValueEnum};

pub use records::{aug_shape, aug_view, view_table};
pub use store::{DeviceStore, Residency, Staged};
pub use views::DeviceViews;

use crate::data::PatchStore;
use crate::data::input::batch::{Augmenter, Views};
use crate::data::input::sampler::SampledBatch;
use crate::engine::Engine;
use crate::engine::cpu::CpuEngine;
use crate::model::StepBatch;

/// Where a step's four views come from: rendered from the sampled patches with the run's
/// augmentation, on the engine, in its channel-major layout.
pub trait ViewSource<E: Engine> {
    fn render(
        &mut self,
        eng: &E,
        augmenter: &Augmenter,
        store: &PatchStore,
        sampled: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<StepBatch<E>>;
}

/// Views rendered on the host by the CPU augmentation, then uploaded.
pub struct HostViews;

impl<E: Engine> ViewSource<E> for HostViews {
    fn render(
        &mut self,
        eng: &E,
        augmenter: &Augmenter,
        store: &PatchStore,
        sampled: &SampledBatch,
        step: u64,
        views: Views,
    ) -> Result<StepBatch<E>> {
        StepBatch::upload(eng, &augmenter.render(store, sampled, step, views)?)
    }
}

/// Where the CUDA engine's training views are rendered.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewsOn {
    /// By the fused view kernel, from the store's pixels on the GPU.
    Device,
    /// By the CPU augmentation, then uploaded.
    Host,
}

/// How the views reach the CUDA engine (the CPU engine always renders them itself).
#[derive(Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewSettings {
    /// With --device cuda: render the views on the GPU (device: the fused kernel, from the
    /// store's pixels on the GPU) or on the CPU and upload them (host).
    #[arg(long, value_enum, default_value_t = ViewSettings::default().views)]
    pub views: ViewsOn,
    /// With --views device: keep the store's pixels on the GPU (resident), copy each step's
    /// patches through pinned double buffers (streamed), or resident when they fit (auto).
    #[arg(long, value_enum, default_value_t = ViewSettings::default().residency)]
    pub residency: Residency,
}

impl Default for ViewSettings {
    fn default() -> Self {
        Self {
            views: ViewsOn::Device,
            residency: Residency::Auto,
        }
    }
}

/// An engine that knows how its training views are rendered.
pub trait Feed: Engine {
    /// The view source for a run on `store` with at most `batch` patches a step, which needs
    /// `step_bytes` of the engine's memory besides the views.
    fn view_source(
        &self,
        settings: &ViewSettings,
        store: &PatchStore,
        batch: usize,
        step_bytes: u64,
    ) -> Result<Box<dyn ViewSource<Self> + '_>>;
}

impl Feed for CpuEngine {
    /// Always [`HostViews`]: the CPU engine has no device to render on.
    fn view_source(
        &self,
        _settings: &ViewSettings,
        _store: &PatchStore,
        _batch: usize,
        _step_bytes: u64,
    ) -> Result<Box<dyn ViewSource<Self> + '_>> {
        Ok(Box::new(HostViews))
    }
}
