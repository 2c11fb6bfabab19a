//! Training-time input: from a loaded [`PatchStore`] to the float views of a step.
//!
//! - [`sampler`]: the balanced sampler, which patches each batch holds.
//! - [`rng`]: Philox4x32-10 view keys, the counter-based draws the CPU and CUDA share.
//! - [`augment`]: a view's random parameters and its rendering (reference ops and the fused
//!   path).
//! - [`batch`]: a sampled batch to the four views of a training step.
//!
//! [`PatchStore`]: crate::data::PatchStore

pub mod augment;
pub mod batch;
pub mod rng;
pub mod sampler;
