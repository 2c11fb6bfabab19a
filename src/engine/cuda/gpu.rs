//! The CUDA runtime: one device, its context, one stream, cuBLAS, and the embedded kernels
//! loaded once.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::augment::AugmentKernels;
use super::blas::MatmulMode;
use super::conv::ConvKernels;
use super::conv_igemm::ConvIgemmKernels;
use super::linear::LinearKernels;
use super::norm::NormKernels;
use super::pool::PoolKernels;
use super::view::{DevView, DevViewMut};
use super::{KernelFile, kernel_file};
use crate::engine::check_len;

/// Why [`Gpu::new`] failed. The first two mean "no GPU here"; the others, a broken setup.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (the CUDA engine needs an NVIDIA GPU \
         and its driver; use the CPU engine instead)"
    )]
    NoDriver,
    #[error("no usable CUDA device {ordinal}: {source}")]
    NoDevice { ordinal: usize, source: DriverError },
    #[error(
        "cuBLAS could not be loaded (libcublas.so, from the CUDA toolkit or the nvidia-cublas wheel): put it on LD_LIBRARY_PATH"
    )]
    NoCublas,
    #[error(
        "kernels/{file}.cu has no fatbin in this binary (built without nvcc) and NVRTC \
         (libnvrtc.so) could not be loaded to compile it"
    )]
    NoNvrtc { file: &'static str },
    #[error("NVRTC failed to compile kernels/{file}.cu: {log}")]
    Compile { file: &'static str, log: String },
    #[error("CUDA driver call failed while {what}: {source}")]
    Driver { what: String, source: DriverError },
    #[error("cuBLAS failed to start: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

impl GpuError {
    /// True when the machine simply has no GPU (no driver library, or no device).
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, GpuError::NoDriver | GpuError::NoDevice { .. })
    }
}

fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> GpuError {
    move |source| GpuError::Driver {
        what: what.into(),
        source,
    }
}

/// Where a kernel file's code came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// The nvcc fatbin embedded at build time.
    Fatbin,
    /// Compiled at start with NVRTC from the embedded source.
    Nvrtc,
}

/// Grid of `ags_dots_partial`: a constant, so that the reduction's order, and therefore its
/// result, is the same on every GPU (see kernels/ags.cu).
pub(super) const AGS_DOTS_GRID: u32 = 1024;
/// `AGS_DOTS_BLOCK` of kernels/ags.cu.
pub const AGS_DOTS_BLOCK: u32 = 256;
/// `AGS_UPDATE_BLOCK` of kernels/ags.cu.
pub const AGS_UPDATE_BLOCK: u32 = 256;
/// `LOSS_BLOCK` of kernels/loss.cu.
pub const LOSS_BLOCK: u32 = 256;
/// `LOSS_COLS` of kernels/loss.cu: samples per block of its column kernels.
pub const LOSS_COLS: u32 = 8;

/// The functions of kernels/ags.cu, and the resident grid (blocks per multiprocessor at
/// `AGS_UPDATE_BLOCK` threads, times the multiprocessors) of each elementwise one.
pub(super) struct AgsKernels {
    pub dots_partial: CudaFunction,
    pub dots_finalize: CudaFunction,
    pub sgd_step: CudaFunction,
    pub sgd_step_grid: u32,
    pub combine: CudaFunction,
    pub combine_grid: u32,
}

/// The functions of kernels/loss.cu.
pub(super) struct LossKernels {
    pub normalize: CudaFunction,
    pub ntxent_softmax: CudaFunction,
    pub ntxent_backward: CudaFunction,
    pub cohesion_rowsum: CudaFunction,
    pub cohesion_backward: CudaFunction,
}

/// Device scratch reused across calls: the AGS partial sums, the host-facing results, and the
/// loss intermediates for the last batch shape.
pub(super) struct Scratch {
    /// `3 * AGS_DOTS_GRID` partial sums of `ags_dots_partial`.
    pub partials: CudaSlice<f64>,
    /// `{g1.g2, |g1|^2, |g2|^2}` for [`Gpu::grad_dots`].
    pub dots: CudaSlice<f64>,
    /// The loss for [`Gpu::ntxent`] and [`Gpu::cohesion`].
    pub loss: CudaSlice<f32>,
    /// The losses' intermediates, allocated for the last batch shape.
    pub losses: Option<super::loss::LossScratch>,
}

/// One CUDA device with its context, a stream every op is queued on (in order), a cuBLAS
/// handle on that stream, and the embedded kernels, loaded once.
///
/// Ops take device views ([`DevView`], [`DevViewMut`]) of cudarc buffers ([`CudaSlice`]) and are
/// asynchronous unless they return a host value. Errors of a kernel that faults show up at
/// the next call that waits for the device (a download, [`Gpu::synchronize`]).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    sources: Vec<(&'static str, KernelSource)>,
    pub(super) ags: AgsKernels,
    pub(super) loss: LossKernels,
    pub(super) norm: NormKernels,
    pub(super) pool: PoolKernels,
    pub(super) conv: ConvKernels,
    pub(super) conv_igemm: ConvIgemmKernels,
    pub(super) linear: LinearKernels,
    pub(super) augment: AugmentKernels,
    scratch: Mutex<Scratch>,
    /// The [`MatmulMode`] of the layers' products, as its index.
    matmul_mode: AtomicU8,
}

impl Gpu {
    /// Opens CUDA device `ordinal`. Never panics: without the driver library, without a
    /// device, without cuBLAS, or when a kernel cannot be loaded, returns an error that says
    /// which.
    pub fn new(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only tries to load the library; touches no CUDA state. cudarc panics on the
        // first driver call when the library is missing, so this check comes first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|source| GpuError::NoDevice { ordinal, source })?;
        // SAFETY: before any allocation. Every op runs on the one stream below, in order, so
        // cudarc's cross-stream events are not needed (and the engine's raw views skip them).
        unsafe { ctx.disable_event_tracking() };
        // SAFETY: as above, for cuBLAS.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::NoCublas);
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?;

        let mut sources = Vec::new();
        let mut module = |name: &'static str| -> Result<Arc<CudaModule>, GpuError> {
            let file = kernel_file(name).expect("build.rs embeds every kernels/*.cu");
            let (module, source) = load_module(&ctx, file, compute_capability)?;
            sources.push((name, source));
            Ok(module)
        };
        let function = load_function;
        let sm_count = sm_count.max(1) as u32;
        let resident = |f: &CudaFunction| {
            f.occupancy_max_active_blocks_per_multiprocessor(AGS_UPDATE_BLOCK, 0, None)
                .map(|blocks| blocks.max(1) * sm_count)
                .map_err(driver("reading a kernel's occupancy"))
        };
        let m = module("ags")?;
        let (sgd_step, combine) = (function(&m, "ags_sgd_step")?, function(&m, "ags_combine")?);
        let ags = AgsKernels {
            dots_partial: function(&m, "ags_dots_partial")?,
            dots_finalize: function(&m, "ags_dots_finalize")?,
            sgd_step_grid: resident(&sgd_step)?,
            sgd_step,
            combine_grid: resident(&combine)?,
            combine,
        };
        let m = module("loss")?;
        let loss = LossKernels {
            normalize: function(&m, "loss_normalize")?,
            ntxent_softmax: function(&m, "ntxent_softmax")?,
            ntxent_backward: function(&m, "ntxent_backward")?,
            cohesion_rowsum: function(&m, "cohesion_rowsum")?,
            cohesion_backward: function(&m, "cohesion_backward")?,
        };
        let norm = NormKernels::load(&module("norm")?)?;
        let pool = PoolKernels::load(&module("pool")?)?;
        let conv = ConvKernels::load(&module("conv")?)?;
        let conv_igemm = ConvIgemmKernels::load(&module("conv_igemm")?)?;
        let linear = LinearKernels::load(&module("linear")?)?;
        keep_freed_memory(&ctx)?;

        let augment = AugmentKernels::load(&module("augment")?)?;

        let alloc = "allocating scratch buffers";
        let scratch = Scratch {
            partials: stream
                .alloc_zeros(3 * AGS_DOTS_GRID as usize)
                .map_err(driver(alloc))?,
            dots: stream.alloc_zeros(3).map_err(driver(alloc))?,
            loss: stream.alloc_zeros(1).map_err(driver(alloc))?,
            losses: None,
        };
        Ok(Gpu {
            ctx,
            stream,
            blas,
            name,
            compute_capability,
            sm_count,
            sources,
            ags,
            loss,
            norm,
            pool,
            conv,
            conv_igemm,
            linear,
            augment,
            scratch: Mutex::new(scratch),
            matmul_mode: AtomicU8::new(MatmulMode::Exact as u8),
        })
    }

    /// How the layers' products use the tensor cores from now on ([`MatmulMode::Exact`]
    /// after [`Gpu::new`]).
    pub fn set_matmul_mode(&self, mode: MatmulMode) {
        self.matmul_mode.store(mode as u8, Ordering::Relaxed);
    }

    pub fn matmul_mode(&self) -> MatmulMode {
        match self.matmul_mode.load(Ordering::Relaxed) {
            m if m == MatmulMode::Tf32 as u8 => MatmulMode::Tf32,
            m if m == MatmulMode::Bf16 as u8 => MatmulMode::Bf16,
            _ => MatmulMode::Exact,
        }
    }

    /// An uninitialized device buffer for an op's intermediates, from the stream-ordered
    /// pool (which keeps freed memory, so a step's buffers are reused by the next step).
    pub(super) fn scratch_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller writes the values before it reads them.
        Ok(unsafe { self.stream.alloc::<f32>(len) }?)
    }

    /// `(free, total)` bytes of device memory.
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        self.ctx.bind_to_thread()?;
        let (free, total) = cudarc::driver::result::mem_get_info()?;
        Ok((free as u64, total as u64))
    }

    /// Restarts [`Gpu::peak_memory_bytes`] from what is in use now.
    pub fn reset_peak_memory(&self) -> Result<()> {
        self.set_pool_attribute(
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }

    /// The most device memory the stream-ordered pool (every buffer the engine allocates)
    /// has had in use since [`Gpu::new`] or [`Gpu::reset_peak_memory`].
    pub fn peak_memory_bytes(&self) -> Result<u64> {
        use cudarc::driver::sys;
        let mut value = 0u64;
        // SAFETY: reads one u64 attribute of this device's default pool.
        unsafe {
            sys::cuMemPoolGetAttribute(
                self.default_pool()?,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value) as *mut u64 as *mut std::ffi::c_void,
            )
            .result()?;
        }
        Ok(value)
    }

    fn default_pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool> {
        self.ctx.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: writes one handle.
        unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }
            .result()?;
        Ok(pool)
    }

    fn set_pool_attribute(
        &self,
        attr: cudarc::driver::sys::CUmemPool_attribute,
        mut value: u64,
    ) -> Result<()> {
        // SAFETY: sets one u64 attribute of this device's default pool.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                self.default_pool()?,
                attr,
                (&mut value) as *mut u64 as *mut std::ffi::c_void,
            )
            .result()?;
        }
        Ok(())
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor), e.g. (9, 0).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Each kernel file and whether it came from the embedded fatbin or NVRTC.
    pub fn kernel_sources(&self) -> &[(&'static str, KernelSource)] {
        &self.sources
    }

    /// The driver's CUDA version, e.g. (13, 0).
    pub fn driver_version(&self) -> Result<(i32, i32)> {
        let mut v = 0;
        // SAFETY: writes one int; the driver library is loaded (a Gpu exists).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result()?;
        Ok((v / 1000, (v % 1000) / 10))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A zero-filled device buffer.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.empty();
        }
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// A buffer of no values. The driver refuses empty allocations, so it owns one value it
    /// never exposes (and frees it when dropped).
    fn empty<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
    ) -> Result<CudaSlice<T>> {
        let ptr = self.stream.alloc_zeros::<T>(1)?.leak();
        // SAFETY: `ptr` is a live allocation of one T on this stream (zeroed); the slice of
        // length 0 takes it over and frees it on drop.
        Ok(unsafe { self.stream.upgrade_device_ptr(ptr, 0) })
    }

    /// A device copy of `host`.
    pub fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.empty();
        }
        Ok(self.stream.clone_htod(host)?)
    }

    /// A host copy of `src`; waits for the work queued before it.
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        src: DevView<'_, T>,
    ) -> Result<Vec<T>> {
        let mut host = vec![T::default(); src.len()];
        if host.is_empty() {
            return Ok(host);
        }
        // SAFETY: `src` is a live device range of `host.len()` values; the copy is complete
        // when the stream has synchronized, before `host` is returned.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut host,
                *src.ptr(),
                self.stream.cu_stream(),
            )?;
        }
        self.stream.synchronize()?;
        Ok(host)
    }

    /// Zeroes `dst` (queued on the stream).
    pub fn fill_zero<T>(&self, dst: DevViewMut<'_, T>) -> Result<()> {
        // SAFETY: `dst` is a live device range of `dst.len()` values.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                *dst.ptr(),
                0,
                dst.len() * size_of::<T>(),
                self.stream.cu_stream(),
            )?;
        }
        Ok(())
    }

    /// `dst = src` on the device (queued on the stream).
    pub fn copy<T>(&self, src: DevView<'_, T>, dst: DevViewMut<'_, T>) -> Result<()> {
        check_len("copy destination", dst.len(), src.len())?;
        // SAFETY: two live device ranges of the same length; a stream-ordered copy.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                *dst.ptr(),
                *src.ptr(),
                src.len() * size_of::<T>(),
                self.stream.cu_stream(),
            )?;
        }
        Ok(())
    }

    /// Waits for every queued op; reports a kernel fault as an error.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Milliseconds of device time that the work `f` queues takes, measured with CUDA events
    /// recorded before and after it on the stream.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(timed)?;
        let end = self.ctx.new_event(timed)?;
        start.record(&self.stream)?;
        f()?;
        end.record(&self.stream)?;
        Ok(start.elapsed_ms(&end)?)
    }

    pub(super) fn scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic while holding it leaves only device buffers, which stay valid.
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks for an elementwise pass over `n` values: enough for one float4 per thread,
    /// capped at the kernel's resident grid `max_blocks` (one wave; the grid-stride loop does
    /// the rest).
    pub(super) fn elementwise_grid(n: usize, max_blocks: u32) -> LaunchConfig {
        let per_block = 4 * AGS_UPDATE_BLOCK as usize;
        let blocks = n.div_ceil(per_block).clamp(1, max_blocks as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (AGS_UPDATE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Function `name` of a loaded kernel file.
pub(super) fn load_function(
    module: &Arc<CudaModule>,
    name: &str,
) -> Result<CudaFunction, GpuError> {
    module
        .load_function(name)
        .map_err(driver(format!("loading kernel {name}")))
}

/// Makes the device's default memory pool keep what is freed instead of returning it at each
/// synchronization: the buffers a training step allocates are then served from the pool on
/// every later step, which plans the activation memory once per shape in effect.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    let what = "configuring the memory pool";
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device; `threshold` outlives the call.
    unsafe {
        ctx.bind_to_thread().map_err(driver(what))?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(driver(what))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(driver(what))?;
    }
    Ok(())
}

/// The kernel file's embedded fatbin, else its source compiled with NVRTC for this device.
fn load_module(
    ctx: &Arc<CudaContext>,
    file: &'static KernelFile,
    (major, minor): (i32, i32),
) -> Result<(Arc<CudaModule>, KernelSource), GpuError> {
    let (ptx, source) = match file.fatbin {
        Some(fatbin) => (Ptx::from_binary(fatbin.to_vec()), KernelSource::Fatbin),
        None => {
            // SAFETY: only tries to load the library (cudarc panics on a missing one).
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err(GpuError::NoNvrtc { file: file.name });
            }
            let opts = CompileOptions {
                options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(file.source, opts).map_err(|e| {
                let log = match e {
                    CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                    other => other.to_string(),
                };
                GpuError::Compile {
                    file: file.name,
                    log,
                }
            })?;
            (ptx, KernelSource::Nvrtc)
        }
    };
    let module = ctx
        .load_module(ptx)
        .map_err(driver(format!("loading kernels/{}.cu", file.name)))?;
    Ok((module, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU every entry point fails through `Gpu::new` with a clear error (and no
    /// panic); with one, a device that does not exist is reported as such.
    #[test]
    fn gpu_new_reports_a_missing_gpu_clearly() {
        // SAFETY: only tries to load the library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        let err = match Gpu::new(if driver_present { 1 << 20 } else { 0 }) {
            Ok(gpu) => panic!("device 2^20 opened: {}", gpu.name()),
            Err(err) => err,
        };
        assert!(err.is_no_gpu(), "{err}");
        let msg = err.to_string();
        if driver_present {
            assert!(matches!(err, GpuError::NoDevice { .. }), "{msg}");
            assert!(msg.contains("no usable CUDA device 1048576"), "{msg}");
        } else {
            assert!(matches!(err, GpuError::NoDriver), "{msg}");
            assert!(
                msg.contains("libcuda.so") && msg.contains("CPU engine"),
                "{msg}"
            );
            println!("no GPU here, as expected: {msg}");
        }
    }
}
