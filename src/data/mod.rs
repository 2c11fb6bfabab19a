//! Everything between images on disk and the float batches the engines consume. Knows no
//! engine.
//!
//! - [`store`]: the packed patch store (reader and writer), the one format both halves share.
//! - [`build`]: building stores offline: image folders ([`build::pack`]), bags of labelled
//!   cells ([`build::bags`], planned by [`build::plan`]), whole slides ([`build::tile`]) and
//!   synthetic cytology ([`build::synth`]).
//! - [`input`]: training-time input: the balanced sampler ([`input::sampler`]), the
//!   counter-based view keys ([`input::rng`]), the augmentation ([`input::augment`]) and the
//!   step's views ([`input::batch`]).

pub mod build;
pub mod input;
pub mod store;

pub use store::{Bag, BagLabel, PatchSize, PatchStore, StoreSummary, StoreWriter};
