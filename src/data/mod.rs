//! Everything between images on disk and the float batches the engines consume: the packed
//! patch store, building stores from image folders, bags and synthetic cytology, the
//! balanced sampler and the augmentation. Knows no engine.

pub mod augment;
pub mod bags;
pub mod batch;
pub mod pack;
pub mod plan;
pub mod rng;
pub mod sampler;
pub mod store;
pub mod synth;
pub mod tile;

pub use store::{Bag, BagLabel, PatchSize, PatchStore, StoreSummary, StoreWriter};
