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

/// What one step's views are rendered from: the sampled patches of the store at `step`, with
/// the run's augmentation.
pub struct StepInput<'a> {
    pub augmenter: &'a Augmenter,
    pub store: &'a PatchStore,
    pub sampled: &'a SampledBatch,
    pub step: u64,
    pub views: Views,
}

/// Where a step's four views come from: rendered on the engine, in its channel-major layout.
pub trait ViewSource<E: Engine> {
    fn render(&mut self, eng: &E, input: &StepInput<'_>) -> Result<StepBatch<E>>;
}

/// A view source on its engine's borrow.
pub type Source<'a, E> = Box<dyn ViewSource<E> + 'a>;

/// Views rendered on the host by the CPU augmentation, then uploaded.
pub struct HostViews;

impl<E: Engine> ViewSource<E> for HostViews {
    fn render(&mut self, eng: &E, i: &StepInput<'_>) -> Result<StepBatch<E>> {
        let host = i.augmenter.render(i.store, i.sampled, i.step, i.views)?;
        StepBatch::upload(eng, &host)
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

/// What a run asks of its view source: its store, the most patches a step takes, and the
/// engine memory a step needs besides the views.
#[derive(Clone, Copy)]
pub struct FeedPlan<'a> {
    pub store: &'a PatchStore,
    pub batch: usize,
    pub step_bytes: u64,
}

/// An engine that knows how its training views are rendered.
pub trait Feed: Engine {
    /// The view source for a run, as `views` asks where the engine has a choice.
    fn view_source(&self, views: &ViewSettings, plan: FeedPlan<'_>) -> Result<Source<'_, Self>>;
}

impl Feed for CpuEngine {
    /// Always [`HostViews`]: the CPU engine has no device to render on.
    fn view_source(&self, _: &ViewSettings, _: FeedPlan<'_>) -> Result<Source<'_, Self>> {
        Ok(Box::new(HostViews))
    }
}
