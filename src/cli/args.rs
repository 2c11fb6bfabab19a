//! Arguments shared by several commands.

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};

use crate::engine::cuda::{CudaEngine, MatmulMode};
use crate::gpu_data::{DeviceViews, Residency};
use crate::model::ModelState;
use crate::model::optim::Sgd;
use crate::model::{NetConfig, StepConfig, Surgery};
use crate::pretrain::{Observer, Run};

/// The network's shape.
#[derive(Args, Clone, Debug)]
pub struct ArchArgs {
    /// Architecture: resnet18 (the reference), resnet10 or resnet34.
    #[arg(long, default_value = "resnet18")]
    pub arch: String,
    /// Channels of the stem and first stage (the reference: 64); overrides the preset's.
    #[arg(long)]
    pub width: Option<usize>,
    /// BasicBlocks in each of the four stages, e.g. 2,2,2,2; overrides the preset's.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<usize>>,
    /// Size of the projector's output z (the reference: 512).
    #[arg(long)]
    pub out_dim: Option<usize>,
}

impl ArchArgs {
    pub fn config(&self) -> Result<NetConfig> {
        let mut config = NetConfig::named(&self.arch)?;
        if let Some(width) = self.width {
            config.width = width;
        }
        if let Some(blocks) = &self.blocks {
            config.blocks = blocks.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("--blocks takes 4 numbers (one per stage), got {blocks:?}")
            })?;
        }
        if let Some(out_dim) = self.out_dim {
            config.out_dim = out_dim;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Hyper-parameters of a training step; the defaults are the reference's, from
/// [`StepConfig::default`].
#[derive(Args, Clone, Debug)]
pub struct StepArgs {
    /// How the two task gradients are combined.
    #[arg(long, value_enum, default_value_t = StepConfig::default().surgery)]
    pub surgery: Surgery,
    /// Learning rate of this step.
    #[arg(long, default_value_t = Sgd::default().lr)]
    pub lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = Sgd::default().momentum)]
    pub momentum: f32,
    /// Weight decay on every parameter.
    #[arg(long, default_value_t = Sgd::default().weight_decay)]
    pub weight_decay: f32,
    /// Temperature of both losses.
    #[arg(long, default_value_t = StepConfig::default().temperature)]
    pub temperature: f32,
}

impl StepArgs {
    pub fn config(&self) -> Result<StepConfig> {
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0,
            "--lr must be a finite non-negative number, got {}",
            self.lr
        );
        ensure!(
            self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
            "--momentum must be in [0, 1), got {}",
            self.momentum
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be a finite non-negative number, got {}",
            self.weight_decay
        );
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--temperature must be positive, got {}",
            self.temperature
        );
        Ok(StepConfig {
            surgery: self.surgery,
            sgd: Sgd {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            temperature: self.temperature,
        })
    }
}

/// Where the step runs.
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

/// How the CUDA engine's layer products use the tensor cores.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matmul {
    /// Full f32 multiplies: matches the CPU engine to f32 rounding.
    Exact,
    /// TF32 tensor cores (f32 in and out), as PyTorch's allow_tf32.
    Tf32,
    /// bf16 tensor cores (f32 in and out, f32 accumulation).
    Bf16,
}

impl From<Matmul> for MatmulMode {
    fn from(m: Matmul) -> Self {
        match m {
            Matmul::Exact => MatmulMode::Exact,
            Matmul::Tf32 => MatmulMode::Tf32,
            Matmul::Bf16 => MatmulMode::Bf16,
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
    pub matmul: Option<Matmul>,
}

impl EngineArgs {
    /// Opens the GPU for `--device cuda`, with `default` unless --matmul is given; reports
    /// the device on stderr.
    pub fn open_cuda(&self, default: Matmul) -> Result<CudaEngine> {
        let mode = self.matmul.unwrap_or(default);
        let eng = CudaEngine::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
        eng.set_matmul_mode(mode.into());
        let (major, minor) = eng.compute_capability();
        eprintln!(
            "cuda engine: {} (sm_{major}{minor}, {} SMs), {:?} products",
            eng.device_name(),
            eng.sm_count(),
            mode
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
}

/// Where the CUDA engine's training views are rendered.
#[derive(Args, Clone, Copy, Debug)]
pub struct GpuViewArgs {
    /// With --device cuda: render the views on the GPU (device: the fused kernel, from the
    /// store's pixels on the GPU) or on the CPU and upload them (host).
    #[arg(long, value_enum, default_value_t = ViewsOn::Device)]
    pub views: ViewsOn,
    /// With --views device: keep the store's pixels on the GPU (resident), copy each step's
    /// patches through pinned double buffers (streamed), or resident when they fit (auto).
    #[arg(long, value_enum, default_value_t = ResidencyArg::Auto)]
    pub residency: ResidencyArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewsOn {
    Device,
    Host,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidencyArg {
    Auto,
    Resident,
    Streamed,
}

impl From<ResidencyArg> for Residency {
    fn from(r: ResidencyArg) -> Self {
        match r {
            ResidencyArg::Auto => Residency::Auto,
            ResidencyArg::Resident => Residency::Resident,
            ResidencyArg::Streamed => Residency::Streamed,
        }
    }
}

impl GpuViewArgs {
    /// Trains `run` on the GPU with the views where these arguments say.
    pub fn train(
        &self,
        eng: &CudaEngine,
        run: &mut Run,
        observer: &mut dyn Observer,
    ) -> Result<ModelState> {
        match self.views {
            ViewsOn::Host => run.train(eng, observer),
            ViewsOn::Device => {
                let mut views = DeviceViews::new(
                    eng,
                    run.store(),
                    self.residency.into(),
                    run.config.batch,
                    run.step_bytes() as usize,
                )?;
                eprintln!("views on the GPU: {}", views.summary());
                run.train_with(eng, observer, &mut views)
            }
        }
    }

    /// Fails for settings that only the CUDA engine takes.
    pub fn check(&self, engine: &EngineArgs) -> Result<()> {
        ensure!(
            engine.device == Device::Cuda
                || (self.views == ViewsOn::Device && self.residency == ResidencyArg::Auto),
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
