//! The op families every engine implements, one trait per file: its shapes, the argument
//! structs of its ops (named buffers instead of long positional lists), the checks of those
//! buffers (written once, so every engine reports the same errors) and, in each method's
//! documentation, the formula it computes.

pub mod conv;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod update;

use anyhow::{Result, ensure};

/// Fails unless `got == want`, naming the buffer.
pub fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "{what}: expected {want} values, got {got}");
    Ok(())
}
