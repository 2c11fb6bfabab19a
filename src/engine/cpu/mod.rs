//! The CPU engine: pure Rust, the numerical reference every other engine is held to.
//!
//! Buffers are `Vec<f32>`, views are slices. Ops run on rayon's global pool (its size is
//! set with `RAYON_NUM_THREADS`); matrix products go through the `gemm` crate
//! (`crate::matmul`). Reductions accumulate in f64 in a fixed order, so results do not
//! depend on the thread count. Each op family is implemented in its own file.

mod conv;
mod conv3x3;
mod features;
mod linear;
mod loss;
mod norm;
mod pool;
mod reduce;
mod scratch;
mod simd;
mod stem;
mod update;

use std::ops::Range;

pub use features::CpuInfo;
pub use update::grad_dots;

use super::{Backend, Result};

/// `dy = 0` where the ReLU's output `y <= 0`: back through the ReLU, in place. Written as a
/// bit mask rather than a branch, which vectorizes (a branch on random signs mispredicts
/// half the time and made this the batch-norm backward's slowest loop).
fn relu_mask(dy: &mut [f32], y: &[f32]) {
    for (g, &y) in dy.iter_mut().zip(y) {
        let keep = ((y <= 0.0) as u32).wrapping_sub(1);
        *g = f32::from_bits(g.to_bits() & keep);
    }
}

/// The CPU engine. Stateless: every op runs on the calling thread and rayon's pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuEngine;

impl Backend for CpuEngine {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![f32::NAN; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }

    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32]
    where
        Self: 'a,
    {
        &buf[range]
    }

    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32]
    where
        Self: 'a,
    {
        &mut buf[range]
    }

    fn fill_zero(&self, dst: &mut [f32]) -> Result<()> {
        dst.fill(0.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::relu_mask;

    #[test]
    fn relu_mask_zeroes_where_the_output_was_not_positive() {
        let y = [-1.0, 0.0, -0.0, 2.0, f32::NAN, f32::MIN_POSITIVE];
        let mut dy = [1.0, 2.0, 3.0, 4.0, 5.0, -6.0];
        relu_mask(&mut dy, &y);
        // `y <= 0` is false for NaN: its gradient passes, as in the branch it replaces.
        assert_eq!(dy, [0.0, 0.0, 0.0, 4.0, 5.0, -6.0]);
        assert!(dy[..3].iter().all(|g| g.is_sign_positive()));
    }
}
