//! The patch store's pixels on the GPU, for the fused view kernel.
//!
//! Two modes, chosen once ([`Residency`]):
//!
//! - **Resident**: the store's whole pixel array (u8 HWC patches, as packed) is uploaded once
//!   when it fits in free device memory next to what the caller reserves for the rest of the
//!   run; the kernel then reads every patch by its store index. Nothing moves per step but
//!   the 48-byte view records.
//! - **Streamed**: otherwise. Each step's distinct patches are gathered on the host from the
//!   memory-mapped store into pinned (page-locked) memory and copied to the device on a copy
//!   stream of their own, into one of two slots used in turn (double buffering). Events order
//!   the three parties without blocking the compute stream:
//!     - `copied` (copy stream): the slot's device copy is complete. The compute stream waits
//!       for it before the kernel reads the slot; the host waits for it before it gathers
//!       into the slot's pinned buffer again (two steps later, long done in practice).
//!     - `consumed` (compute stream): the last kernel reading the slot is done (first recorded
//!       right after the slot's allocation on the compute stream, so that the first copy also
//!       waits for the allocation). The copy stream waits for it before overwriting the slot.
//!
//!   So staging step k+1 (host gather, then the asynchronous copy) runs while the GPU still
//!   computes step k: call [`DeviceStore::stage`] for the next step before waiting for the
//!   current one. At most two steps may be staged and not yet rendered.
//!
//! In both modes the sampling indices are made on the host and the pixels only ever travel
//! host to device: nothing comes back.

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rayon::prelude::*;

use super::records::{aug_shape, view_table};
use crate::data::input::augment::{AugmentConfig, ViewJob};
use crate::data::store::{PatchSize, PatchStore};
use crate::engine::cuda::{CudaEngine, DevSlice, DevViewMut};

/// Where the pixels live.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Resident when it fits, else streamed.
    Auto,
    /// Resident, or an error saying how much memory is missing.
    Resident,
    /// Streamed through pinned double buffers even when the store would fit.
    Streamed,
}

/// The pixels of one [`PatchStore`] on the device; see the module docs.
pub struct DeviceStore {
    size: PatchSize,
    patches: usize,
    fingerprint: String,
    bytes: usize,
    mode: Mode,
    summary: String,
}

enum Mode {
    Resident(CudaSlice<u8>),
    Streamed(Box<Streamer>),
}

struct Streamer {
    copy: Arc<CudaStream>,
    slots: [Slot; 2],
    next: usize,
    /// Distinct patches one step may stage.
    capacity: usize,
}

struct Slot {
    host: PinnedHostSlice<u8>,
    dev: CudaSlice<u8>,
    copied: CudaEvent,
    consumed: CudaEvent,
    /// Staged and not yet rendered: the generation of its [`Staged`].
    pending: Option<u64>,
    generation: u64,
}

/// The patches of one step, ready for [`DeviceStore::render`] (which consumes it).
#[must_use = "a staged step is rendered with DeviceStore::render"]
pub struct Staged {
    /// The streaming slot and its generation; None when resident.
    slot: Option<(usize, u64)>,
    /// The distinct store indices, sorted: in streaming mode, patch `patches[i]` is at
    /// position `i` of the slot.
    patches: Vec<u32>,
}

impl Staged {
    /// The distinct store indices this step reads, sorted.
    pub fn patches(&self) -> &[u32] {
        &self.patches
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 30)
}

impl DeviceStore {
    /// Puts `store` on `gpu`'s device. `max_step_patches` bounds the distinct patches one
    /// step reads (what each streaming slot holds); `reserve_bytes` is the device memory the
    /// caller keeps for everything else (network, activations), which residency must leave
    /// free.
    pub fn new(
        gpu: &CudaEngine,
        store: &PatchStore,
        residency: Residency,
        max_step_patches: usize,
        reserve_bytes: usize,
    ) -> Result<Self> {
        ensure!(!store.is_empty(), "the patch store holds no patches");
        ensure!(
            max_step_patches >= 1,
            "a step must be allowed at least one patch"
        );
        let size = store.patch_size();
        let pixels = store.pixels();
        let bytes = pixels.len();
        let ctx = gpu.stream().context();
        ctx.bind_to_thread()?;
        let (free, total) =
            cudarc::driver::result::mem_get_info().context("reading free device memory")?;
        let fits = bytes.saturating_add(reserve_bytes) <= free;
        let need = format!(
            "the store's pixels are {:.2} GiB ({} patches of {size}); the device has {:.2} GiB \
             free of {:.2} GiB, {:.2} GiB of it reserved for the run",
            gib(bytes),
            store.len(),
            gib(free),
            gib(total),
            gib(reserve_bytes)
        );
        let resident = match residency {
            Residency::Auto => fits,
            Residency::Streamed => false,
            Residency::Resident if fits => true,
            Residency::Resident => bail!(
                "the patch store does not fit on the GPU: {need}; stream it instead (Residency::Auto or Streamed)"
            ),
        };
        let (mode, summary) = if resident {
            let dev = gpu
                .upload(pixels)
                .with_context(|| format!("uploading the patch store: {need}"))?;
            (
                Mode::Resident(dev),
                format!("resident: uploaded once; {need}"),
            )
        } else {
            let capacity = max_step_patches.min(store.len());
            let slot_bytes = capacity * size.bytes();
            let slot = || -> Result<Slot> {
                let slot = Slot {
                    // SAFETY: written by the gather before any copy reads it.
                    host: unsafe { ctx.alloc_pinned::<u8>(slot_bytes) }
                        .context("allocating pinned host memory for streaming")?,
                    // SAFETY: written by the copy before any kernel reads it.
                    dev: unsafe { gpu.stream().alloc::<u8>(slot_bytes) }?,
                    copied: ctx.new_event(None)?,
                    consumed: ctx.new_event(None)?,
                    pending: None,
                    generation: 0,
                };
                // The device buffer comes from the compute stream's pool: the copy stream's
                // first write must wait for that allocation, as every later one waits for the
                // last kernel reading the slot. Recording `consumed` here orders both.
                slot.consumed.record(gpu.stream())?;
                Ok(slot)
            };
            let streamer = Streamer {
                copy: ctx.new_stream()?,
                slots: [slot()?, slot()?],
                next: 0,
                capacity,
            };
            let summary = format!(
                "streamed: two pinned slots of {capacity} patches ({:.1} MiB each) copied per \
                 step on a copy stream; {need}",
                slot_bytes as f64 / f64::from(1 << 20)
            );
            (Mode::Streamed(Box::new(streamer)), summary)
        };
        Ok(Self {
            size,
            patches: store.len(),
            fingerprint: store.fingerprint(),
            bytes,
            mode,
            summary,
        })
    }

    /// True when the whole store is on the device.
    pub fn is_resident(&self) -> bool {
        matches!(self.mode, Mode::Resident(_))
    }

    /// Bytes of the store's pixels.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// One line for the log: the mode, the store's size and the device memory.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// Makes the distinct patches of `patches` (store indices) readable on the device for the
    /// next [`DeviceStore::render`]. Streaming: gathers them into the next slot's pinned
    /// buffer and queues the copy on the copy stream, ordered after the last kernel that
    /// read that slot; returns without waiting for the copy.
    pub fn stage(&mut self, store: &PatchStore, patches: &[u32]) -> Result<Staged> {
        ensure!(
            store.len() == self.patches
                && store.patch_size() == self.size
                && store.fingerprint() == self.fingerprint,
            "{} is not the store this DeviceStore was made from",
            store.path().display()
        );
        let mut unique = patches.to_vec();
        unique.sort_unstable();
        unique.dedup();
        if let Some(&last) = unique.last() {
            ensure!(
                (last as usize) < self.patches,
                "patch {last} is out of range for a store of {} patches",
                self.patches
            );
        }
        let s = match &mut self.mode {
            Mode::Resident(_) => {
                return Ok(Staged {
                    slot: None,
                    patches: unique,
                });
            }
            Mode::Streamed(s) => s,
        };
        ensure!(
            unique.len() <= s.capacity,
            "a step reads {} distinct patches; the streaming slots hold {}",
            unique.len(),
            s.capacity
        );
        let index = s.next;
        let slot = &mut s.slots[index];
        ensure!(
            slot.pending.is_none(),
            "two steps are staged and not rendered: render one before staging another"
        );
        let bytes = self.size.bytes();
        let len = unique.len() * bytes;
        // The slot's previous copy must be done before its pinned buffer is rewritten.
        slot.copied.synchronize()?;
        let host = &mut slot.host.as_mut_slice()?[..len];
        host.par_chunks_mut(bytes)
            .zip(&unique)
            .for_each(|(dst, &p)| dst.copy_from_slice(store.patch(p as usize)));
        s.copy.wait(&slot.consumed)?;
        let mut dev = slot.dev.dev_mut();
        // SAFETY: `len` bytes fit the slot's device buffer; the pinned source is not written
        // again before `copied` completes (synchronized above, two steps later) and outlives
        // the copy (Drop synchronizes the copy stream).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                *dev.reborrow().ptr(),
                &*host,
                s.copy.cu_stream(),
            )?;
        }
        slot.copied.record(&s.copy)?;
        slot.generation += 1;
        slot.pending = Some(slot.generation);
        s.next ^= 1;
        Ok(Staged {
            slot: Some((index, slot.generation)),
            patches: unique,
        })
    }

    /// Renders `groups` of views (each group one `[3, n, crop, crop]` batch, back to back in
    /// `out`) from the staged patches; queued on the GPU's stream. Returns each group's range
    /// in `out`. Every job must read a patch that `staged` holds.
    pub fn render(
        &mut self,
        gpu: &CudaEngine,
        staged: Staged,
        cfg: &AugmentConfig,
        groups: &[&[ViewJob]],
        out: DevViewMut<'_>,
    ) -> Result<Vec<std::ops::Range<usize>>> {
        let shape = aug_shape(cfg, self.size)?;
        let find = |p: u32| -> Result<u32> {
            match staged.patches.binary_search(&p) {
                Ok(i) => Ok(i as u32),
                Err(_) => bail!("patch {p} was not staged for this step"),
            }
        };
        match &mut self.mode {
            Mode::Resident(pixels) => {
                ensure!(
                    staged.slot.is_none(),
                    "a streamed step given to a resident store"
                );
                let (table, ranges) = view_table(groups, cfg.crop, |p| {
                    find(p)?;
                    Ok(p)
                })?;
                gpu.augment(pixels.dev(), &shape, &table, out)?;
                Ok(ranges)
            }
            Mode::Streamed(s) => {
                let Some((index, generation)) = staged.slot else {
                    bail!("a resident step given to a streamed store");
                };
                let slot = &mut s.slots[index];
                ensure!(
                    slot.pending == Some(generation),
                    "this staged step is stale: its slot was staged again"
                );
                slot.pending = None;
                let (table, ranges) = view_table(groups, cfg.crop, find)?;
                gpu.stream().wait(&slot.copied)?;
                let len = staged.patches.len() * self.size.bytes();
                let launched = gpu.augment(slot.dev.dev().slice(0..len), &shape, &table, out);
                // Recorded even after a refused launch, so the slot never waits forever.
                slot.consumed.record(gpu.stream())?;
                launched?;
                Ok(ranges)
            }
        }
    }

    /// [`DeviceStore::stage`] then [`DeviceStore::render`] for the patches the jobs read.
    pub fn render_now(
        &mut self,
        gpu: &CudaEngine,
        store: &PatchStore,
        cfg: &AugmentConfig,
        groups: &[&[ViewJob]],
        out: DevViewMut<'_>,
    ) -> Result<Vec<std::ops::Range<usize>>> {
        let patches: Vec<u32> = groups
            .iter()
            .flat_map(|g| g.iter().map(|j| j.patch))
            .collect();
        let staged = self.stage(store, &patches)?;
        self.render(gpu, staged, cfg, groups, out)
    }
}

impl Drop for DeviceStore {
    fn drop(&mut self) {
        if let Mode::Streamed(s) = &self.mode {
            // The pinned buffers must outlive the copies reading them. Errors here would
            // have been reported by the next synchronizing call; nothing to do with them.
            let _ = s.copy.synchronize();
        }
    }
}
