//! The twin harness: a test body written once, generic over the engine, run on the CPU engine
//! (the reference) and on the CUDA engine against it.
//!
//! A [`Case`] runs its ops on any engine and returns its results as named [`Output`]s, each
//! with the [`Tolerance`] the CUDA engine is held to. [`Twin::check`] runs the case on the CPU
//! engine; where there is a GPU it runs it twice on the CUDA engine, requires the two runs to
//! agree bit for bit (every kernel is deterministic) and each output to agree with the CPU's
//! within its tolerance, printing every error it measured. Without a GPU the CPU run still
//! executes the body, and the GPU part prints why it is skipped.

use anyhow::{Result, ensure};
use slam_ags::engine::Engine;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::{CudaEngine, MatmulMode};

use super::metrics::{
    max_error_over_peak, max_error_over_peak_or_one, max_error_per_column, rel_l2_error,
};

/// How close an output of the CUDA engine must be to the CPU engine's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// Bit for bit: the same f32 operations in the same order.
    Bits,
    /// Relative L2 error below `tol` and the largest error below `10 tol` (relative to the
    /// largest value), everything finite.
    RelL2(f64),
    /// The largest error relative to `max(1, largest value)` at most `tol`; a NaN fails.
    PeakOrOne(f64),
    /// Feature-major `[dim, n]` values: the largest error relative to each column's largest
    /// value below `tol`.
    Columns { n: usize, tol: f64 },
    /// Each value's error relative to `max(|want|, floor)` below `tol`.
    Relative { floor: f64, tol: f64 },
    /// Each value's error over `scale` below `tol`.
    Scaled { scale: f64, tol: f64 },
}

/// One named result of a case, downloaded to the host.
#[derive(Clone, Debug)]
pub struct Output {
    pub name: String,
    pub values: Vec<f64>,
    pub tol: Tolerance,
}

impl Output {
    pub fn new(name: impl Into<String>, values: &[f32], tol: Tolerance) -> Self {
        Self::f64(name, values.iter().map(|&v| v as f64).collect(), tol)
    }

    pub fn f64(name: impl Into<String>, values: Vec<f64>, tol: Tolerance) -> Self {
        Self {
            name: name.into(),
            values,
            tol,
        }
    }

    /// The error measured against `want` (0 for bit-identical values under [`Tolerance::Bits`]),
    /// and whether it is within the tolerance.
    fn compare(&self, want: &[f64]) -> (f64, bool) {
        let got = &self.values;
        let per_value = |scale: &dyn Fn(f64) -> f64| {
            got.iter()
                .zip(want)
                .map(|(g, w)| (g - w).abs() / scale(*w))
                .fold(0.0f64, |m, e| if e.is_nan() { f64::NAN } else { m.max(e) })
        };
        match self.tol {
            Tolerance::Bits => {
                let differ = got
                    .iter()
                    .zip(want)
                    .filter(|(g, w)| g.to_bits() != w.to_bits())
                    .count();
                (differ as f64, differ == 0)
            }
            Tolerance::RelL2(tol) => {
                let (g32, w32): (Vec<f32>, Vec<f32>) = got
                    .iter()
                    .zip(want)
                    .map(|(&g, &w)| (g as f32, w as f32))
                    .unzip();
                let (l2, max) = (rel_l2_error(&g32, &w32), max_error_over_peak(got, want));
                let finite = got.iter().all(|v| v.is_finite());
                (l2, finite && l2 < tol && max < 10.0 * tol)
            }
            Tolerance::PeakOrOne(tol) => {
                let e = max_error_over_peak_or_one(got, want);
                (e, e <= tol)
            }
            Tolerance::Columns { n, tol } => {
                let e = max_error_per_column(got, want, n);
                (e, e < tol)
            }
            Tolerance::Relative { floor, tol } => {
                let e = per_value(&|w| w.abs().max(floor));
                (e, e < tol)
            }
            Tolerance::Scaled { scale, tol } => {
                let e = per_value(&|_| scale);
                (e, e < tol)
            }
        }
    }
}

/// A test body written once for every engine.
pub trait Case {
    /// What the case is, for messages.
    fn name(&self) -> String;
    /// Runs the case on `eng` and returns its results.
    fn run<E: Engine>(&self, eng: &E) -> Result<Vec<Output>>;
}

/// The CUDA engine a test checks its cases on, if there is a GPU.
pub struct Twin {
    cuda: Option<CudaEngine>,
}

impl Twin {
    /// The CUDA engine with products in `mode`; without a GPU, a twin that checks the CPU side
    /// only (the reason printed).
    pub fn new(mode: MatmulMode) -> Self {
        Self {
            cuda: super::cuda(mode),
        }
    }

    /// The CUDA engine, for cases that need it directly.
    pub fn cuda(&self) -> Option<&CudaEngine> {
        self.cuda.as_ref()
    }

    /// Runs `case` on both engines and holds the CUDA results to the CPU's (see the module
    /// docs).
    pub fn check(&self, case: &impl Case) -> Result<()> {
        let name = case.name();
        let want = case.run(&CpuEngine)?;
        let Some(cuda) = &self.cuda else {
            return Ok(());
        };
        let got = case.run(cuda)?;
        let again = case.run(cuda)?;
        ensure!(
            got.len() == want.len(),
            "{name}: the engines gave different outputs"
        );
        for ((g, w), a) in got.iter().zip(&want).zip(&again) {
            ensure!(
                g.name == w.name && g.values.len() == w.values.len(),
                "{name}: output {} has {} values on the GPU, {} ({}) on the CPU",
                g.name,
                g.values.len(),
                w.values.len(),
                w.name
            );
            let (error, ok) = g.compare(&w.values);
            println!("{name} {}: error {error:.2e} ({:?})", g.name, g.tol);
            ensure!(ok, "{name} {}: error {error:e} beyond {:?}", g.name, g.tol);
            let repeated = g
                .values
                .iter()
                .zip(&a.values)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            ensure!(repeated, "{name} {}: two GPU runs differ", g.name);
        }
        Ok(())
    }
}
