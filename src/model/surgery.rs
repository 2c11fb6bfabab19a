//! Adaptive gradient surgery (AGS) in closed form.
//!
//! From `d = g1.g2`, `a = |g1|^2`, `b = |g2|^2` (one reduction pass):
//! each task's gradient is projected against the other's ORIGINAL gradient when they
//! conflict (`d < 0`): `g1' = g1 - d/b g2`, `g2' = g2 - d/a g1`, so
//! `g = g1' + g2' = (1 - c2) g1 + (1 - c1) g2` with `c1 = d/(b+eps)`, `c2 = d/(a+eps)`; AGS then
//! rescales `g` to the norm of the plain sum, `pre = |g1 + g2| = sqrt(a + b + 2d)`. The
//! result is `g = alpha g1 + beta g2` with two scalars, applied by one fused pass.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::engine::GradDots;

pub const EPS: f64 = 1e-10;

/// How the two task gradients are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Surgery {
    /// Project conflicting gradients, then rescale to `|g1 + g2|` (the method).
    Ags,
    /// Project conflicting gradients, no rescale (PCGrad).
    Pcgrad,
    /// The plain sum `g1 + g2`.
    None,
}

impl std::fmt::Display for Surgery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Surgery::Ags => "ags",
            Surgery::Pcgrad => "pcgrad",
            Surgery::None => "none",
        })
    }
}

/// The combination `g = alpha g1 + beta g2` and the figures worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Combination {
    pub alpha: f64,
    pub beta: f64,
    /// Whether the gradients were projected (they conflicted and the mode projects).
    pub fired: bool,
    /// `g1.g2 / (|g1| |g2|)` (0 when either is zero).
    pub cosine: f64,
    pub norm_g1: f64,
    pub norm_g2: f64,
    /// `|g1 + g2|`, the norm AGS restores.
    pub norm_sum: f64,
    /// `|g|` of the combined gradient.
    pub norm_combined: f64,
}

impl Surgery {
    /// The coefficients of `g = alpha g1 + beta g2` for these inner products.
    pub fn combine(self, dots: GradDots) -> Combination {
        let GradDots {
            g1g2: d,
            g1g1: a,
            g2g2: b,
        } = dots;
        let norm_sum = (a + b + 2.0 * d).max(0.0).sqrt();
        let cosine = if a > 0.0 && b > 0.0 {
            d / (a.sqrt() * b.sqrt())
        } else {
            0.0
        };
        let fired = self != Surgery::None && d < 0.0;
        let (c1, c2) = if fired {
            let c1 = if b == 0.0 { 0.0 } else { d / (b + EPS) };
            let c2 = if a == 0.0 { 0.0 } else { d / (a + EPS) };
            (c1, c2)
        } else {
            (0.0, 0.0)
        };
        let (w1, w2) = (1.0 - c2, 1.0 - c1);
        // |w1 g1 + w2 g2|^2 expanded in the inner products.
        let norm_projected = (w1 * w1 * a + w2 * w2 * b + 2.0 * w1 * w2 * d)
            .max(0.0)
            .sqrt();
        // The expansion cannot resolve a projected norm below its own rounding (exactly
        // opposed gradients project to zero): call that zero rather than blow the rounding
        // noise up to |g1 + g2|.
        let rounding_floor = 1e-6 * (w1.abs() * a.sqrt() + w2.abs() * b.sqrt());
        let scale = match self {
            _ if fired && norm_projected <= rounding_floor => 0.0,
            Surgery::Ags if norm_projected > 0.0 => norm_sum / (norm_projected + EPS),
            _ => 1.0,
        };
        Combination {
            alpha: w1 * scale,
            beta: w2 * scale,
            fired,
            cosine,
            norm_g1: a.sqrt(),
            norm_g2: b.sqrt(),
            norm_sum,
            norm_combined: norm_projected * scale,
        }
    }
}
