//! The SLAM-AGS model, written once against the [`crate::engine::Engine`] trait: network
//! shape and layout, initialization, the forward and backward passes, gradient surgery, the
//! optimizer and the training step.

pub mod config;
pub mod network;
pub mod optim;
mod passes;
pub mod state;
pub mod step;
pub mod surgery;
pub mod weak;

pub use config::{NetConfig, NetSpec};
pub use network::Network;
pub use passes::{Activations, BN_EPS, BN_MOMENTUM};
pub use state::ModelState;
pub use step::{StepBatch, StepConfig, StepReport, Trainer};
pub use surgery::Surgery;
pub use weak::WeakHead;
