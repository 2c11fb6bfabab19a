//! The training step's views rendered on the GPU: the CUDA engine's [`ViewSource`], from the
//! store's pixels on the device, and how the CUDA engine is fed ([`Feed`]).

use anyhow::Result;

use super::{
    DeviceStore, Feed, FeedPlan, HostViews, Residency, Source, StepInput, ViewSettings, ViewSource,
    ViewsOn,
};
use crate::data::PatchStore;
use crate::data::input::augment::ViewJob;
use crate::engine::Backend;
use crate::engine::cuda::{CudaEngine, DevSlice};
use crate::model::StepBatch;

/// Renders each step's four views with the fused kernel: the same jobs (and so the same
/// random parameters) the CPU augmentation renders, into one device buffer, then split into
/// the step's four batches by device copies (0.3 GB per step at the reference batch, about
/// 0.1 ms of copy bandwidth; a network input that could take an offset would save it).
pub struct DeviceViews {
    store: DeviceStore,
}

impl DeviceViews {
    /// Puts `store`'s pixels on the engine's GPU (see [`DeviceStore::new`]).
    pub fn new(
        eng: &CudaEngine,
        store: &PatchStore,
        residency: Residency,
        max_step_patches: usize,
        reserve_bytes: usize,
    ) -> Result<Self> {
        let store = DeviceStore::new(eng, store, residency, max_step_patches, reserve_bytes)?;
        Ok(Self { store })
    }

    /// One line for the log: where the pixels are and how much memory they take.
    pub fn summary(&self) -> &str {
        self.store.summary()
    }
}

impl ViewSource<CudaEngine> for DeviceViews {
    fn render(&mut self, eng: &CudaEngine, i: &StepInput<'_>) -> Result<StepBatch<CudaEngine>> {
        let (augmenter, store) = (i.augmenter, i.store);
        let jobs = augmenter.jobs(store, i.sampled, i.step, i.views)?;
        let groups: Vec<&[ViewJob]> = jobs.iter().map(Vec::as_slice).collect();
        let crop = augmenter.config.crop;
        let total = jobs.iter().map(Vec::len).sum::<usize>() * 3 * crop * crop;
        let mut all = eng.alloc(total)?;
        let ranges =
            self.store
                .render_now(eng, store, &augmenter.config, &groups, all.dev_mut())?;
        let parts = ranges
            .into_iter()
            .map(|range| -> Result<_> {
                let mut part = eng.alloc(range.len())?;
                eng.copy(all.dev().slice(range), part.dev_mut())?;
                Ok(part)
            })
            .collect::<Result<Vec<_>>>()?;
        let [pos_i, pos_j, neg_i, neg_j]: [_; 4] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("four views"))?;
        Ok(StepBatch {
            pos_i,
            pos_j,
            neg_i,
            neg_j,
            n_pos: jobs[0].len(),
            n_neg: jobs[2].len(),
            crop,
        })
    }
}

impl Feed for CudaEngine {
    fn view_source(&self, views: &ViewSettings, plan: FeedPlan<'_>) -> Result<Source<'_, Self>> {
        Ok(match views.views {
            ViewsOn::Host => Box::new(HostViews),
            ViewsOn::Device => {
                let reserve = plan.step_bytes as usize;
                let views =
                    DeviceViews::new(self, plan.store, views.residency, plan.batch, reserve)?;
                eprintln!("views on the GPU: {}", views.summary());
                Box::new(views)
            }
        })
    }
}
