//! The engine a command runs on: `--device` and `--matmul`, and opening it.

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};

use crate::engine::cuda::{CudaEngine, MatmulMode};
use crate::feed::ViewSettings;

/// Where the work runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The pure-Rust reference engine, on every core (or --threads).
    Cpu,
    /// The CUDA engine, on GPU 0 (choose another with CUDA_VISIBLE_DEVICES).
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// The engine a command runs on.
#[derive(Args, Clone, Copy, Debug)]
pub struct EngineArgs {
    /// Engine: cpu (the reference, runs anywhere) or cuda (an NVIDIA GPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// With --device cuda: exact, tf32 or bf16 products in the convolutions and linear
    /// layers (default: the command's, see --help).
    #[arg(long, value_enum)]
    pub matmul: Option<MatmulMode>,
}

impl EngineArgs {
    /// Opens the GPU for `--device cuda`, with `default` products unless --matmul is given;
    /// reports the device on stderr.
    pub fn open_cuda(&self, default: MatmulMode) -> Result<CudaEngine> {
        let mode = self.matmul.unwrap_or(default);
        let eng = CudaEngine::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
        eng.set_matmul_mode(mode);
        let (major, minor) = eng.compute_capability();
        eprintln!(
            "cuda engine: {} (sm_{major}{minor}, {} SMs), {mode:?} products",
            eng.device_name(),
            eng.sm_count(),
        );
        Ok(eng)
    }

    /// Fails for --matmul on the CPU engine, which has one mode.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.device == Device::Cuda || self.matmul.is_none(),
            "--matmul applies to --device cuda only (the CPU engine always multiplies in f32)"
        );
        Ok(())
    }

    /// Fails for view settings other than the defaults on the CPU engine, which renders its
    /// views itself.
    pub fn check_views(&self, views: &ViewSettings) -> Result<()> {
        ensure!(
            self.device == Device::Cuda || *views == ViewSettings::default(),
            "--views and --residency apply to --device cuda only"
        );
        Ok(())
    }
}

/// Runs `$body` with `$eng` bound to the engine `$args` (an [`EngineArgs`]) names: the CPU
/// engine, or the GPU opened with `$default` products unless --matmul says otherwise.
macro_rules! with_engine {
    ($args:expr, $default:expr, |$eng:ident| $body:expr) => {{
        let args: &$crate::cli::args::EngineArgs = &$args;
        args.check()?;
        match args.device {
            $crate::cli::args::Device::Cpu => {
                let $eng = &$crate::engine::cpu::CpuEngine;
                $body
            }
            $crate::cli::args::Device::Cuda => {
                let cuda = args.open_cuda($default)?;
                let $eng = &cuda;
                $body
            }
        }
    }};
}
pub(crate) use with_engine;
