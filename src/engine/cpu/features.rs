//! What the CPU engine runs on: the processor's name and numbers, the SIMD level its
//! matrix products were dispatched to at run time (the `gemm` crate picks its kernels from
//! the CPU's features when the program starts), and how it runs the convolutions.

/// The processor and the SIMD level the engine's products use on it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuInfo {
    /// `model name` of `/proc/cpuinfo` (the architecture's name elsewhere).
    pub model: String,
    /// `family F model M` (x86), when the system says.
    pub family_model: Option<String>,
    /// The widest vector instructions the products use here.
    pub simd: &'static str,
    /// How the convolutions run here: the direct AVX-512 kernels (the stride-1 3x3 layers,
    /// the stem's weight gradient) where they apply, or unfolded products throughout.
    pub convolutions: &'static str,
}

impl CpuInfo {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        let family_model = match (field("cpu family"), field("model")) {
            (Some(family), Some(model)) => Some(format!("family {family} model {model}")),
            _ => None,
        };
        Self {
            model: field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            family_model,
            simd: matmul_simd(),
            convolutions: if super::simd::available() {
                "direct AVX-512 kernels where they apply"
            } else {
                "unfolded products"
            },
        }
    }
}

impl std::fmt::Display for CpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.model)?;
        if let Some(numbers) = &self.family_model {
            write!(f, " ({numbers})")?;
        }
        write!(
            f,
            ", products in {}, convolutions by {}",
            self.simd, self.convolutions
        )
    }
}

/// The SIMD level of the `gemm` crate's f32 kernels on this CPU, as its run-time dispatch
/// chooses them.
fn matmul_simd() -> &'static str {
    // gemm's own order: AVX-512F kernels (built in by its `x86-v4` feature), else FMA.
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "AVX2 + FMA";
        }
        "scalar code (no FMA)"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}
