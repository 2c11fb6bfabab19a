//! The programs the command line runs, as library functions a Rust user can call without the
//! CLI: the demo ([`demo`]) and the experiments it is one of ([`experiment`]), the step dump ([`dump`]) and the benchmarks ([`mod@bench`], [`layers`],
//! [`kernels`]). Each takes its settings as one struct (which is also the command's flags)
//! and returns what it measured; the CLI only parses, opens the engine, calls and prints.

pub mod bench;
pub mod demo;
pub mod dump;
pub mod experiment;
pub mod kernels;
pub mod layers;
