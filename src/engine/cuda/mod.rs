//! The CUDA engine: a runtime on cudarc (driver API, NVRTC fallback, cuBLAS) and its kernels.
//!
//! Every `kernels/*.cu` is embedded in the binary: its source always, and the fatbin that
//! `build.rs` compiled with nvcc (SASS for sm_80 and sm_90, plus compute_90 PTX that newer
//! GPUs JIT-compile) when nvcc was found at build time. A kernel file without a fatbin is
//! compiled at run time from its source with NVRTC, so the crate builds without the CUDA
//! toolkit. Build with `SLAM_REQUIRE_NVCC=1` to make a missing nvcc or a kernel compile
//! error fail the build instead (CI does).
//!
//! The kernel sources include no headers so that NVRTC compiles them as they are.
//!
//! [`CudaEngine`] (`runtime.rs`) opens a device and loads each kernel file once, through the
//! `KernelSet` (declared by `kernel_set!`) of the file that launches it. Each op family is
//! implemented in its own file, next to its kernels' launch code: `conv.rs` (kernels/conv.cu + cuBLAS),
//! `norm.rs`, `pool.rs`, `linear.rs`, `loss.rs`, `update.rs` (kernels/ags.cu); each kernel has
//! the CPU engine's op as its twin (`tests/cuda_*.rs` hold them against each other).
//! [`CudaEngine::augment`] renders training views from u8 patches on the device (twin: the
//! CPU augmentation's `render_batch`, held against it by `tests/cuda_augment.rs`). The CUDA
//! libraries are loaded at run time: on a machine without them [`CudaEngine::new`] returns
//! [`GpuError::NoDriver`] and nothing else touches CUDA. Kernel variants under development
//! live in `dev/cuda`, outside the engine.

mod augment;
mod blas;
mod conv;
mod linear;
mod loss;
mod norm;
mod pool;
pub(crate) mod runtime;
mod update;
mod view;

pub use augment::{AUGMENT_BLOCK, AugShape, AugView, check_augment};
pub use blas::MatmulMode;
pub use conv::CONV_BLOCK;
pub use linear::LINEAR_BLOCK;
pub use loss::{LOSS_BLOCK, LOSS_COLS, PairLoss};
pub use norm::{NORM_BLOCK, NORM_CHUNK};
pub use pool::POOL_BLOCK;
pub use runtime::{CudaEngine, GpuError, KernelSource, compile_cubin};
pub use update::{AGS_DOTS_BLOCK, AGS_UPDATE_BLOCK};
pub use view::{DevSlice, DevView, DevViewMut};

/// One embedded `.cu` file.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// The file stem, e.g. `ags` for `kernels/ags.cu`.
    pub name: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
    /// The nvcc-compiled fatbin, or None when the build had no nvcc (or it failed on this
    /// file without `SLAM_REQUIRE_NVCC`).
    pub fatbin: Option<&'static [u8]>,
}

/// Every kernel file of the engine (`kernels/*.cu`), sorted by name.
pub const KERNEL_FILES: &[KernelFile] = include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel file `kernels/<name>.cu`, if there is one.
pub fn kernel_file(name: &str) -> Option<&'static KernelFile> {
    KERNEL_FILES.iter().find(|k| k.name == name)
}
