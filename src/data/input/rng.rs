//! Counter-based random numbers for the augmentation: Philox4x32-10 (Salmon et al. 2011, the
//! generator of cuRAND and Random123). A draw is a pure function of (seed, step, slot, view,
//! draw number), so the CPU and a CUDA kernel reproduce every draw bit for bit, in any order
//! and on any number of threads.
//!
//! The contract a CUDA kernel follows (all arithmetic on u32 wraps):
//!
//! ```text
//! round:  lo0,hi0 = M0 * c0 (64-bit product)      lo1,hi1 = M1 * c2
//!         c = [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]
//! 10 rounds; before rounds 2..=10 the key is bumped: k0 += W0, k1 += W1
//! M0 = 0xD2511F53  M1 = 0xCD9E8D57  W0 = 0x9E3779B9  W1 = 0xBB67AE85
//!
//! view key:  key     = [seed lo32, seed hi32]
//!            counter = [step lo32, step hi32, slot, (view << 8) | block]
//! draw k  =  philox(counter with block = k / 4, key)[k % 4]      (k < 1024)
//! ```

use anyhow::{Result, ensure};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: one 128-bit block of random bits per (counter, key).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        // CUDA: __umulhi(M, c) for the high word, M * c for the low one.
        let p0 = u64::from(M0) * u64::from(c0);
        let p1 = u64::from(M1) * u64::from(c2);
        (c0, c1, c2, c3) = (
            (p1 >> 32) as u32 ^ c1 ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ c3 ^ k1,
            p0 as u32,
        );
    }
    [c0, c1, c2, c3]
}

/// Names the random stream of one view: the training step, the sample's slot in the batch
/// and which of its views. Every field takes part in the Philox counter or key, so two keys
/// that differ anywhere draw independent streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub seed: u64,
    pub step: u64,
    pub slot: u32,
    /// At most [`ViewKey::MAX_VIEW`]: it shares counter word 3 with the 8-bit block number.
    pub view: u32,
}

impl ViewKey {
    /// Largest view number: 24 bits, the low 8 bits of counter word 3 number the block.
    pub const MAX_VIEW: u32 = (1 << 24) - 1;
    /// Draws a view may take: 256 blocks of 4 lanes.
    pub const MAX_DRAWS: usize = 1024;

    /// Philox key: `[seed lo32, seed hi32]`.
    pub fn philox_key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// Philox counter of one block: `[step lo32, step hi32, slot, (view << 8) | block]`.
    /// Views above [`ViewKey::MAX_VIEW`] would alias others; [`ViewKey::draws`] refuses them.
    pub fn counter(&self, block: u8) -> [u32; 4] {
        [
            self.step as u32,
            (self.step >> 32) as u32,
            self.slot,
            (self.view << 8) | u32::from(block),
        ]
    }

    /// Block `block` of this view's stream: draws `4 * block ..= 4 * block + 3`.
    pub fn block(&self, block: u8) -> [u32; 4] {
        philox4x32_10(self.counter(block), self.philox_key())
    }

    /// The first `N` draws of the stream: draw `k` is lane `k % 4` of block `k / 4`.
    pub fn draws<const N: usize>(&self) -> Result<[u32; N]> {
        const { assert!(N <= ViewKey::MAX_DRAWS, "a view has at most 1024 draws") };
        ensure!(
            self.view <= Self::MAX_VIEW,
            "view {} is above the largest view number {} (24 bits)",
            self.view,
            Self::MAX_VIEW
        );
        let mut out = [0; N];
        for (block, lanes) in out.chunks_mut(4).enumerate() {
            // N <= 1024 keeps block below 256.
            lanes.copy_from_slice(&self.block(block as u8)[..lanes.len()]);
        }
        Ok(out)
    }
}

/// Uniform in [0, 1): `(x >> 8) * 2^-24`. The top 24 bits are exact in an f32, so every
/// value is a multiple of 2^-24 and 1 is never reached.
pub fn unit_f32(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Uniform in [lo, hi]: `lo + u * (hi - lo)` with `u = unit_f32(x)`, every step rounded in
/// f32 (a CUDA kernel must not contract it to an FMA: use `__fadd_rn(lo, __fmul_rn(u,
/// __fsub_rn(hi, lo)))`). `hi` itself is reachable only through rounding.
pub fn uniform_f32(x: u32, lo: f32, hi: f32) -> f32 {
    lo + unit_f32(x) * (hi - lo)
}

/// Integer in [0, n): `(x * n) >> 32` in 64-bit arithmetic (Lemire's multiply-shift; 0 for
/// n = 0). CUDA: `__umulhi(x, n)`.
pub fn below(x: u32, n: u32) -> u32 {
    ((u64::from(x) * u64::from(n)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_hit_their_ends() {
        assert_eq!(unit_f32(0), 0.0);
        assert_eq!(unit_f32(u32::MAX), 1.0 - 2f32.powi(-24));
        assert_eq!(below(u32::MAX, 7), 6);
        assert_eq!(below(0, 7), 0);
        assert_eq!(below(u32::MAX, 0), 0);
        assert_eq!(uniform_f32(0, 0.9, 1.1), 0.9);
    }

    #[test]
    fn draws_refuse_aliasing_views() {
        let key = ViewKey {
            seed: 1,
            step: 2,
            slot: 3,
            view: ViewKey::MAX_VIEW + 1,
        };
        assert!(key.draws::<4>().is_err());
    }
}
