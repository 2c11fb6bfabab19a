//! The CUDA runtime: one device, its context, one stream, cuBLAS, and the embedded kernels
//! loaded once; [`CudaEngine`] is the [`Backend`] on them (the op families are implemented in
//! their own files: `conv.rs`, `norm.rs`, `pool.rs`, `linear.rs`, `loss.rs`, `update.rs`).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Result;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use super::augment::AugmentKernels;
use super::blas::MatmulMode;
use super::conv::ConvKernels;
use super::linear::LinearKernels;
use super::loss::LossKernels;
use super::norm::NormKernels;
use super::pool::PoolKernels;
use super::update::AgsKernels;
use super::view::{DevSlice, DevView, DevViewMut};
use super::{KernelFile, kernel_file};
use crate::engine::{Backend, Memory, ViewLen, check_len};

/// Why [`CudaEngine::new`] failed. The first two mean "no GPU here"; the others, a broken setup.
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

pub(super) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> GpuError {
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

/// The functions of one `kernels/<FILE>.cu` (and any device state they keep), loaded once
/// when the engine starts. Every kernel file has one, declared by [`kernel_set!`] next to the
/// ops that launch it.
pub(super) trait KernelSet: Sized {
    /// The file stem: `norm` for `kernels/norm.cu`.
    const FILE: &'static str;
    fn load(module: &LoadedModule<'_>) -> Result<Self, GpuError>;
}

/// Declares the [`KernelSet`] of one kernel file: a struct holding each of its functions,
/// loaded by name, and any state its ops keep, each initialized from the loaded module:
///
/// ```text
/// kernel_set! {
///     /// The functions of kernels/pool.cu.
///     PoolKernels from "pool" {
///         max_forward = "maxpool_forward",
///         max_backward = "maxpool_backward",
///     }
///     state |m| { grid: u32 = m.resident_grid(...)?, }
/// }
/// ```
macro_rules! kernel_set {
    (
        $(#[$doc:meta])*
        $name:ident from $file:literal {
            $($function:ident = $kernel:literal,)*
        }
        $(state |$m:ident| { $($state:ident: $ty:ty = $init:expr,)* })?
    ) => {
        $(#[$doc])*
        pub(super) struct $name {
            $($function: cudarc::driver::CudaFunction,)*
            $($($state: $ty,)*)?
        }

        impl $crate::engine::cuda::runtime::KernelSet for $name {
            const FILE: &'static str = $file;

            fn load(
                module: &$crate::engine::cuda::runtime::LoadedModule<'_>,
            ) -> Result<Self, $crate::engine::cuda::GpuError> {
                $(let $m = module;)?
                Ok(Self {
                    $($function: module.function($kernel)?,)*
                    $($($state: $init,)*)?
                })
            }
        }
    };
}
pub(super) use kernel_set;

/// A kernel file loaded on the device, to take its functions from.
pub(super) struct LoadedModule<'a> {
    module: Arc<CudaModule>,
    stream: &'a Arc<CudaStream>,
    sm_count: u32,
}

impl LoadedModule<'_> {
    /// Function `name` of the file.
    pub fn function(&self, name: &str) -> Result<CudaFunction, GpuError> {
        self.module
            .load_function(name)
            .map_err(driver(format!("loading kernel {name}")))
    }

    /// The resident grid of `f` at `block` threads: blocks per multiprocessor times the
    /// multiprocessors (one wave of an elementwise pass).
    pub fn resident_grid(&self, f: &CudaFunction, block: u32) -> Result<u32, GpuError> {
        f.occupancy_max_active_blocks_per_multiprocessor(block, 0, None)
            .map(|blocks| blocks.max(1) * self.sm_count)
            .map_err(driver("reading a kernel's occupancy"))
    }

    /// The engine's stream, for buffers a kernel set keeps.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

/// One CUDA device with its context, a stream every op is queued on (in order), a cuBLAS
/// handle on that stream, and the embedded kernels, loaded once: the CUDA engine.
///
/// Ops take device views ([`DevView`], [`DevViewMut`]) of cudarc buffers ([`CudaSlice`]) and
/// are asynchronous unless they return a host value, so a training step waits for the device
/// only for the two losses and the surgery's inner products (plus the embedding spread it
/// logs). Errors of a kernel that faults show up at the next call that waits for the device
/// (a download, [`CudaEngine::synchronize`]).
pub struct CudaEngine {
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
    pub(super) linear: LinearKernels,
    pub(super) augment: AugmentKernels,
    /// The [`MatmulMode`] of the layers' products, as its index.
    matmul_mode: AtomicU8,
}

/// Loads kernel files for [`CudaEngine::new`], recording where each came from.
struct Loader<'a> {
    ctx: &'a Arc<CudaContext>,
    stream: &'a Arc<CudaStream>,
    compute_capability: (i32, i32),
    sm_count: u32,
    sources: Vec<(&'static str, KernelSource)>,
}

impl Loader<'_> {
    fn load<K: KernelSet>(&mut self) -> Result<K, GpuError> {
        let file = kernel_file(K::FILE).expect("build.rs embeds every kernels/*.cu");
        let (module, source) = load_module(self.ctx, file, self.compute_capability)?;
        self.sources.push((file.name, source));
        K::load(&LoadedModule {
            module,
            stream: self.stream,
            sm_count: self.sm_count,
        })
    }
}

impl CudaEngine {
    /// Opens CUDA device `ordinal` with exact products ([`MatmulMode::Exact`]; see
    /// [`CudaEngine::set_matmul_mode`]). Never panics: without the driver library, without a
    /// device, without cuBLAS, or when a kernel cannot be loaded, returns an error that says
    /// which.
    pub fn new(ordinal: usize) -> Result<CudaEngine, GpuError> {
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
        let sm_count = sm_count.max(1) as u32;
        keep_freed_memory(&ctx)?;
        let mut loader = Loader {
            ctx: &ctx,
            stream: &stream,
            compute_capability,
            sm_count,
            sources: Vec::new(),
        };
        let (ags, loss, norm, pool) = (
            loader.load()?,
            loader.load()?,
            loader.load()?,
            loader.load()?,
        );
        let (conv, linear, augment) = (loader.load()?, loader.load()?, loader.load()?);
        let sources = loader.sources;
        Ok(CudaEngine {
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
            linear,
            augment,
            matmul_mode: AtomicU8::new(MatmulMode::Exact as u8),
        })
    }

    /// Loads a kernel file that is not one of the engine's own (a kernel variant under
    /// development): its fatbin when it has one, else NVRTC on its source.
    pub fn load_module(
        &self,
        file: &'static KernelFile,
    ) -> Result<(Arc<CudaModule>, KernelSource), GpuError> {
        load_module(&self.ctx, file, self.compute_capability)
    }

    /// How the layers' products use the tensor cores from now on ([`MatmulMode::Exact`]
    /// after [`CudaEngine::new`]).
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

    /// An uninitialized device buffer for an op's intermediates or outputs, from the
    /// stream-ordered pool (which keeps freed memory, so a step's buffers are reused by the
    /// next step).
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
    pub fn device_name(&self) -> &str {
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
        // SAFETY: writes one int; the driver library is loaded (an engine exists).
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
}

impl Backend for CudaEngine {
    type Buf = CudaSlice<f32>;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn memory(&self) -> Result<Memory> {
        Ok(Memory::Device {
            free: self.memory_info()?.0,
        })
    }

    fn precision(&self) -> &'static str {
        match self.matmul_mode() {
            MatmulMode::Exact => "f32",
            MatmulMode::Tf32 => "tf32",
            MatmulMode::Bf16 => "bf16",
        }
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        CudaEngine::zeros(self, len)
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return self.empty();
        }
        self.scratch_f32(len)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        CudaEngine::upload(self, host)
    }

    fn download(&self, src: DevView<'_>) -> Result<Vec<f32>> {
        CudaEngine::download(self, src)
    }

    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a CudaSlice<f32>, range: Range<usize>) -> DevView<'a>
    where
        Self: 'a,
    {
        buf.dev().slice(range)
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaSlice<f32>, range: Range<usize>) -> DevViewMut<'a>
    where
        Self: 'a,
    {
        buf.dev_mut().slice_mut(range)
    }

    fn fill_zero(&self, dst: DevViewMut<'_>) -> Result<()> {
        CudaEngine::fill_zero(self, dst)
    }

    fn synchronize(&self) -> Result<()> {
        CudaEngine::synchronize(self)
    }

    fn reset_peak_memory(&self) -> Result<()> {
        self.set_pool_attribute(
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }

    /// The stream-ordered pool's high-water mark: every buffer the engine allocates.
    fn peak_memory_bytes(&self) -> Result<Option<u64>> {
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
        Ok(Some(value))
    }
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
    compute_capability: (i32, i32),
) -> Result<(Arc<CudaModule>, KernelSource), GpuError> {
    let (image, source) = match file.fatbin {
        Some(fatbin) => (fatbin.to_vec(), KernelSource::Fatbin),
        None => (
            compile_cubin(file, compute_capability)?,
            KernelSource::Nvrtc,
        ),
    };
    let module = ctx.load_module(Ptx::from_binary(image)).map_err(|source| {
        let what = match source_versions() {
            Some(versions) => format!("loading kernels/{}.cu ({versions})", file.name),
            None => format!("loading kernels/{}.cu", file.name),
        };
        GpuError::Driver { what, source }
    })?;
    Ok((module, source))
}

/// The NVRTC and driver versions, for messages about a module that would not load.
fn source_versions() -> Option<String> {
    let (mut major, mut minor, mut driver) = (0, 0, 0);
    // SAFETY: each call writes plain integers; the libraries are loaded (checked first).
    unsafe {
        if !cudarc::nvrtc::sys::is_culib_present() {
            return None;
        }
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
            .result()
            .ok()?;
        cudarc::driver::sys::cuDriverGetVersion(&mut driver)
            .result()
            .ok()?;
    }
    Some(format!(
        "NVRTC {major}.{minor}, driver CUDA {}.{}",
        driver / 1000,
        (driver % 1000) / 10
    ))
}

/// Compiles a kernel file with NVRTC to a cubin for `sm_{major}{minor}`: native code the
/// driver loads as it is. (PTX for `compute_XY` would be JIT-compiled by the driver, which
/// rejects PTX from an NVRTC newer than itself.) Needs no GPU.
pub fn compile_cubin(file: &KernelFile, (major, minor): (i32, i32)) -> Result<Vec<u8>, GpuError> {
    use cudarc::nvrtc::{result, sys};
    // SAFETY: only tries to load the library (cudarc panics on a missing one).
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoNvrtc { file: file.name });
    }
    let failed = |log: String| GpuError::Compile {
        file: file.name,
        log,
    };
    let src = std::ffi::CString::new(file.source).map_err(|e| failed(e.to_string()))?;
    let prog = result::create_program(&src, None).map_err(|e| failed(e.to_string()))?;
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    // SAFETY: `prog` was created above and is destroyed once, below; `src` outlives it.
    let cubin = unsafe {
        let compiled = result::compile_program(prog, &[arch.as_str()]).map_err(|e| {
            let log = result::get_program_log(prog)
                .map(|log| {
                    std::ffi::CStr::from_ptr(log.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            failed(format!("{e} ({arch}): {log}"))
        });
        let cubin = compiled.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| failed(e.to_string()))?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                .result()
                .map_err(|e| failed(e.to_string()))?;
            Ok(cubin)
        });
        let _ = result::destroy_program(prog);
        cubin
    }?;
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU every entry point fails through `CudaEngine::new` with a clear error (and no
    /// panic); with one, a device that does not exist is reported as such.
    #[test]
    fn gpu_new_reports_a_missing_gpu_clearly() {
        // SAFETY: only tries to load the library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        let err = match CudaEngine::new(if driver_present { 1 << 20 } else { 0 }) {
            Ok(gpu) => panic!("device 2^20 opened: {}", gpu.device_name()),
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
