//! Building patch stores offline, from image folders, labelled cell crops, whole slides or
//! nothing at all (synthetic cytology), each written through a [`StoreWriter`]. Nothing here
//! runs during training.
//!
//! - [`pack`]: image folders to a store (`slam pack`), and the image-file side shared with
//!   `bags` and `tile`: finding, labelling and decoding images.
//! - [`bags`]: bags at a chosen witness rate from folders of cell crops (`slam bags`).
//! - [`plan`]: which cell goes into which bag and split; shared by `bags` and `synth`.
//! - [`tile`]: whole slides to one bag each (`slam tile`).
//! - [`synth`]: procedural cytology datasets (`slam synth`).
//!
//! [`StoreWriter`]: crate::data::StoreWriter

pub mod bags;
pub mod pack;
pub mod plan;
pub mod synth;
pub mod tile;
