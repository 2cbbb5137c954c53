//! The CUDA backend: kernels from `kernels/*.cu` (compiled by build.rs, embedded as fatbins),
//! launched on one stream through cudarc with the driver loaded at run time.
//!
//! Every tensor of a backend instance has one storage type `E`: f16 (the fast path; tensor-core
//! GEMMs) or f32 (an exactness mode, within 1e-4 of the CPU oracle). Arithmetic inside kernels is
//! f32. One file per op family, mirroring `kernels/`. Every driver call and launch is checked; a
//! machine without a driver, without a GPU or without compiled kernels gets an error, never a
//! panic.

mod attention;
mod conv;
mod layout;
mod linear;
mod norm;
mod tokens;
mod volume;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{
    self, CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUmemPool_attribute,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut,
    DeviceRepr, DriverError, LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::f16;
use rayon::prelude::*;

use crate::backend::cpu::CpuBackend;
use crate::backend::{
    Backend, BackendTensor, ClickUpdate, Conv3d, ConvTranspose3d, FeedForward, InstanceNorm,
    KernelTime, LabelAssignment, LayerNorm, Linear, Mlp,
};
use crate::error::{Error, Result};
use crate::geometry::{Label, Region};
use crate::tensor::Tensor;
use layout::Layout;

mod compiled {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Token rows per block of the fused head kernels (fused_rows() in kernels/mma.cuh, a warp per
/// 16 rows): 128 where the device lets a block have the shared memory they need, else 64.
const FUSED_ROWS: [usize; 2] = [128, 64];

/// A storage type of the CUDA backend.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + Unpin + 'static {
    /// Suffix of the kernels instantiated for this type (`crop_f16`).
    const SUFFIX: &'static str;
    /// The dense-layer kernel for this type.
    const LINEAR_KERNEL: &'static str;
    /// Whether this type's GEMMs run on tensor cores (mma.sync), with the fused kernels built on them.
    const TENSOR_CORES: bool;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const SUFFIX: &'static str = "f32";
    const LINEAR_KERNEL: &'static str = "linear_simt_f32";
    const TENSOR_CORES: bool = false;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const SUFFIX: &'static str = "f16";
    const LINEAR_KERNEL: &'static str = "linear_mma_f16";
    const TENSOR_CORES: bool = true;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// A tensor in device memory: its logical shape, and how its values are laid out there.
pub struct CudaTensor<E> {
    shape: Vec<usize>,
    data: CudaSlice<E>,
    layout: Layout,
}

impl<E: Element> BackendTensor for CudaTensor<E> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// Three extents passed to kernels by value (`Dims3` in kernels/common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims3 {
    z: i64,
    y: i64,
    x: i64,
}

// SAFETY: plain C struct of three i64, laid out like the kernels' `Dims3`.
unsafe impl DeviceRepr for Dims3 {}

impl From<[usize; 3]> for Dims3 {
    fn from(d: [usize; 3]) -> Self {
        Dims3 {
            z: d[0] as i64,
            y: d[1] as i64,
            x: d[2] as i64,
        }
    }
}

/// A driver error in words, with its code: "out of memory (CUDA_ERROR_OUT_OF_MEMORY)".
fn driver(e: DriverError) -> Error {
    let words = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown driver error".into());
    Error::Backend {
        backend: "cuda",
        message: format!("{words} ({:?})", e.0),
    }
}

/// The device's default memory pool, which stream-ordered allocations (cuMemAllocAsync) use.
fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` receives the handle of the context's own device's pool.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(driver)?;
    Ok(pool)
}

/// A loaded kernel and its name (for `kernel_times`).
#[derive(Clone)]
pub(crate) struct Kernel {
    function: CudaFunction,
    name: Arc<str>,
}

impl Kernel {
    /// How many of its blocks (of `threads` threads and `shared` bytes of dynamic shared memory)
    /// one multiprocessor runs at once, registers included: the driver's occupancy count, at
    /// least 1.
    fn blocks_per_multiprocessor(&self, threads: u32, shared: usize) -> Result<usize> {
        let blocks = self
            .function
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
            .map_err(driver)?;
        Ok((blocks as usize).max(1))
    }
}

impl Deref for Kernel {
    type Target = CudaFunction;
    fn deref(&self) -> &CudaFunction {
        &self.function
    }
}

/// The launches timed by `kernel_times`: each kernel's name and the events around it.
type TimedLaunches = Vec<(Arc<str>, CudaEvent, CudaEvent)>;

/// A launch being built (cudarc's builder, whose `arg` it takes), timed while the backend
/// times kernels.
pub(crate) struct Launch<'a> {
    args: LaunchArgs<'a>,
    name: &'a Arc<str>,
    timed: &'a Mutex<Option<TimedLaunches>>,
}

impl<'a> Deref for Launch<'a> {
    type Target = LaunchArgs<'a>;
    fn deref(&self) -> &LaunchArgs<'a> {
        &self.args
    }
}

impl DerefMut for Launch<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.args
    }
}

impl Launch<'_> {
    /// Launches the kernel with the arguments given.
    ///
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments are the kernel's, in its order and types,
    /// and `cfg` is a launch it supports on the buffers given.
    pub(crate) unsafe fn launch(
        mut self,
        cfg: LaunchConfig,
    ) -> std::result::Result<(), DriverError> {
        // SAFETY: the caller's.
        let events = unsafe { self.args.launch(cfg) }?;
        if let Some((start, end)) = events {
            let mut timed = self.timed.lock().expect("kernel timing lock");
            if let Some(launches) = timed.as_mut() {
                launches.push((self.name.clone(), start, end));
            }
        }
        Ok(())
    }
}

/// The CUDA backend on one GPU, storing tensors as `E`. Clones share the stream and the kernel
/// caches (several models on one GPU).
#[derive(Clone)]
pub struct CudaBackend<E: Element = f16> {
    stream: Arc<CudaStream>,
    device: String,
    multiprocessors: usize,
    /// Shared memory a block may have once its kernel allows it (bytes).
    shared_memory_optin: usize,
    /// Whether the kernels with a wgmma path take it: the GPU runs the sm_90a cubins (compute
    /// capability 9.0 exactly: the driver picks them only there), and TIS_CUDA_WGMMA is not 0
    /// (which keeps them on mma.sync, to time one against the other on the same card).
    wgmma: bool,
    modules: Arc<Mutex<HashMap<&'static str, Arc<CudaModule>>>>,
    functions: Arc<Mutex<HashMap<String, Kernel>>>,
    /// The launches of the work `kernel_times` runs, while it runs.
    timed: Arc<Mutex<Option<TimedLaunches>>>,
    poison: bool,
    _storage: PhantomData<E>,
}

impl<E: Element> CudaBackend<E> {
    /// Opens GPU `ordinal`. Fails, saying why, when the build has no kernels, the machine has no
    /// CUDA driver, or the GPU cannot be opened.
    pub fn new(ordinal: usize) -> Result<Self> {
        let unavailable = |message: String| Error::Backend {
            backend: "cuda",
            message,
        };
        if compiled::KERNELS.is_empty() {
            return Err(unavailable(
                "built without CUDA kernels (nvcc was not found when tis was built; set NVCC or CUDA_HOME)".into(),
            ));
        }
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(driver)?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "GPU {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        // One stream, ops in order: cudarc's per-buffer event tracking is not needed.
        // SAFETY: called before this context allocates anything.
        unsafe { ctx.disable_event_tracking() };
        // Buffers come from the device's default memory pool (stream-ordered allocation), which
        // by default hands its free memory back to the driver at every synchronisation: each
        // click or tile after one would map its buffers anew. The pool keeps it instead (as
        // PyTorch's caching allocator does); `available_memory` trims it before it counts.
        if ctx.has_async_alloc() {
            let mut keep = u64::MAX;
            // SAFETY: the attribute takes a u64, which `keep` is.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    default_pool(&ctx)?,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )
            }
            .result()
            .map_err(driver)?;
        }
        let attribute = |a| ctx.attribute(a).map_err(driver).map(|v| v as usize);
        let multiprocessors =
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared_memory_optin =
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let capability = (
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        Ok(CudaBackend {
            device: ctx.name().map_err(driver)?,
            stream: ctx.default_stream(),
            multiprocessors,
            shared_memory_optin,
            wgmma: capability == (9, 0) && std::env::var("TIS_CUDA_WGMMA").as_deref() != Ok("0"),
            modules: Arc::new(Mutex::new(HashMap::new())),
            functions: Arc::new(Mutex::new(HashMap::new())),
            timed: Arc::new(Mutex::new(None)),
            poison: false,
            _storage: PhantomData,
        })
    }

    /// For tests: every output buffer starts as NaN, so an element a kernel fails to write shows.
    pub fn poison_outputs(mut self) -> Self {
        self.poison = true;
        self
    }

    /// The GPU's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// A kernel of `kernels/{module}.cu`, loaded once and cached.
    fn function(&self, module: &'static str, name: &str) -> Result<Kernel> {
        let mut functions = self.functions.lock().expect("kernel cache lock");
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let mut modules = self.modules.lock().expect("module cache lock");
        let loaded = match modules.get(module) {
            Some(m) => m.clone(),
            None => {
                let (_, image) = compiled::KERNELS
                    .iter()
                    .find(|(stem, _)| *stem == module)
                    .ok_or_else(|| Error::Backend {
                        backend: "cuda",
                        message: format!(
                            "kernel file {module}.cu was not compiled into this build"
                        ),
                    })?;
                let m = self
                    .stream
                    .context()
                    .load_module(Ptx::from_binary(image.to_vec()))
                    .map_err(driver)?;
                modules.insert(module, m.clone());
                m
            }
        };
        let f = Kernel {
            function: loaded.load_function(name).map_err(driver)?,
            name: name.into(),
        };
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The storage-typed instance of a kernel template (`crop` → `crop_f16`).
    fn kernel(&self, module: &'static str, base: &str) -> Result<Kernel> {
        self.function(module, &format!("{base}_{}", E::SUFFIX))
    }

    /// A launch of `kernel` on the backend's stream, its arguments to be given.
    fn launch_builder<'a>(&'a self, kernel: &'a Kernel) -> Launch<'a> {
        let mut args = self.stream.launch_builder(&kernel.function);
        if self.timed.lock().expect("kernel timing lock").is_some() {
            args.record_kernel_launch(CUevent_flags::CU_EVENT_DEFAULT);
        }
        Launch {
            args,
            name: &kernel.name,
            timed: &self.timed,
        }
    }

    /// An uninitialised buffer (NaN when poisoning), for outputs kernels overwrite entirely.
    fn output(&self, shape: Vec<usize>) -> Result<CudaTensor<E>> {
        Ok(CudaTensor {
            data: self.uninitialised(shape.iter().product())?,
            shape,
            layout: Layout::Standard,
        })
    }

    /// `len` uninitialised values (every bit set when poisoning: NaN in f16 and f32), for
    /// buffers that kernels overwrite entirely.
    fn uninitialised<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller's kernel writes every element before anything reads it (the
        // poisoned test mode checks exactly that).
        let mut data = unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(driver)?;
        if self.poison {
            self.fill_bytes(&mut data, 0xFF)?;
        }
        Ok(data)
    }

    /// A zeroed tensor of any element type (the storage type, or the f32 of sums).
    fn zeroed<T: Element>(&self, shape: &[usize]) -> Result<CudaTensor<T>> {
        Ok(CudaTensor {
            shape: shape.to_vec(),
            data: self.scratch(shape.iter().product())?,
            layout: Layout::Standard,
        })
    }

    fn scratch<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(driver)
    }

    fn fill_bytes<T: DeviceRepr>(&self, data: &mut CudaSlice<T>, byte: u8) -> Result<()> {
        let bytes = data.num_bytes();
        let (ptr, _sync) = data.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `bytes` bytes of this stream's allocation.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, byte, bytes, self.stream.cu_stream())
        }
        .map_err(driver)
    }

    /// A grid-stride launch over `n` elements.
    fn elementwise(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 32 * self.multiprocessors.max(1));
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Whether the fused tensor-core head kernels (`assign_fused_f16_*`, `feed_forward_mma_f16_*`)
    /// take tokens of this width: f16 storage, a multiple of 16 up to 128.
    fn fused_head_width(width: usize) -> bool {
        E::TENSOR_CORES && width.is_multiple_of(16) && width <= 128
    }

    /// The launch of `name` (a fused head kernel) over `tokens` tokens, in blocks of the first
    /// of FUSED_ROWS whose `shared(rows)` bytes of dynamic shared memory the device allows (a
    /// warp per 16 rows), the shared memory allowed first.
    fn fused_launch(
        &self,
        name: &str,
        function: &Kernel,
        tokens: usize,
        shared: impl Fn(usize) -> usize,
    ) -> Result<LaunchConfig> {
        let rows = FUSED_ROWS
            .into_iter()
            .find(|&rows| shared(rows) <= self.shared_memory_optin)
            .ok_or_else(|| Error::Backend {
                backend: "cuda",
                message: format!(
                    "{name} needs {} bytes of shared memory per block of {} tokens; this GPU \
                     allows {}",
                    shared(FUSED_ROWS[1]),
                    FUSED_ROWS[1],
                    self.shared_memory_optin
                ),
            })?;
        let bytes = shared(rows);
        self.allow_shared_memory(function, bytes)?;
        // Their blocks are sized so that two share a multiprocessor (kernels/mma.cuh): ask for
        // the largest shared-memory carveout, which the driver would otherwise choose per launch
        // (a hint: it may still pick another split).
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )
            .map_err(driver)?;
        Ok(LaunchConfig {
            grid_dim: (tokens.div_ceil(rows) as u32, 1, 1),
            block_dim: (2 * rows as u32, 1, 1),
            shared_mem_bytes: bytes as u32,
        })
    }

    /// A fused head kernel with a wgmma twin and its launch over `tokens` tokens:
    /// `{wgmma}_f16_{width}` where the GPU runs the sm_90a cubins, the width is a multiple of 64
    /// and its `wgmma_shared` bytes fit (then its blocks are the first of FUSED_ROWS, 128 tokens,
    /// as the kernel expects), else `{mma}_f16_{width}` in blocks of the first FUSED_ROWS whose
    /// `shared(rows)` bytes fit.
    fn fused_head_kernel(
        &self,
        module: &'static str,
        [mma, wgmma]: [&str; 2],
        width: usize,
        tokens: usize,
        wgmma_shared: usize,
        shared: impl Fn(usize) -> usize,
    ) -> Result<(Kernel, LaunchConfig)> {
        let on_wgmma =
            self.wgmma && width.is_multiple_of(64) && wgmma_shared <= self.shared_memory_optin;
        let name = format!("{}_f16_{width}", if on_wgmma { wgmma } else { mma });
        let function = self.function(module, &name)?;
        let grid = self.fused_launch(&name, &function, tokens, |rows| {
            if on_wgmma { wgmma_shared } else { shared(rows) }
        })?;
        Ok((function, grid))
    }

    /// Allows `function` up to `bytes` of dynamic shared memory.
    fn allow_shared_memory(&self, function: &Kernel, bytes: usize) -> Result<()> {
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(driver)
    }

    fn download_labels(&self, labels: &CudaSlice<u16>) -> Result<Vec<Label>> {
        self.stream.clone_dtoh(labels).map_err(driver)
    }
}

impl<E: Element> Backend for CudaBackend<E> {
    type Tensor = CudaTensor<E>;
    type Accumulator = CudaTensor<f32>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }

    fn kernel_times(
        &self,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Vec<KernelTime>>> {
        // cudarc reads the times through cuEventElapsedTime_v2, which drivers have from CUDA 13 on
        // (its loader panics on a missing symbol).
        let mut version = 0;
        // SAFETY: writes the driver's version into `version`.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver)?;
        if version < 13000 {
            return Err(Error::Backend {
                backend: "cuda",
                message: format!(
                    "timing kernels needs a CUDA 13 driver; this one is CUDA {}.{}",
                    version / 1000,
                    version % 1000 / 10
                ),
            });
        }
        {
            let mut timed = self.timed.lock().expect("kernel timing lock");
            if timed.is_some() {
                return Err(Error::Session(
                    "kernel times are already being taken".into(),
                ));
            }
            *timed = Some(Vec::new());
        }
        let worked = work();
        let launches = self.timed.lock().expect("kernel timing lock").take();
        worked?;
        self.synchronize()?;
        let mut times: Vec<KernelTime> = Vec::new();
        for (name, start, end) in launches.unwrap_or_default() {
            let ms = f64::from(start.elapsed_ms(&end).map_err(driver)?);
            match times.iter_mut().find(|t| *t.name == *name) {
                Some(t) => {
                    t.launches += 1;
                    t.ms += ms;
                }
                None => times.push(KernelTime {
                    name: name.to_string(),
                    launches: 1,
                    ms,
                }),
            }
        }
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(Some(times))
    }

    fn available_memory(&self) -> Option<u64> {
        let ctx = self.stream.context();
        if ctx.has_async_alloc() {
            // The pool keeps freed buffers (see `new`): once the stream has freed them, give them
            // back, so that the driver counts them free.
            self.stream.synchronize().ok()?;
            // SAFETY: the pool is the device's default, which lives as long as the context.
            unsafe { sys::cuMemPoolTrimTo(default_pool(ctx).ok()?, 0) }
                .result()
                .ok()?;
        }
        ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn bytes_per_value(&self) -> u64 {
        std::mem::size_of::<E>() as u64
    }

    fn upload(&self, host: &Tensor) -> Result<CudaTensor<E>> {
        let values: Vec<E> = host.data().par_iter().map(|&v| E::from_f32(v)).collect();
        let data = if values.is_empty() {
            self.scratch(1)?
        } else {
            self.stream.clone_htod(&values).map_err(driver)?
        };
        Ok(CudaTensor {
            shape: host.shape().to_vec(),
            data,
            layout: Layout::Standard,
        })
    }

    fn upload_conv_weight(&self, host: &Tensor) -> Result<CudaTensor<E>> {
        layout::pack_weights(self, self.upload(host)?)
    }

    fn download(&self, tensor: &CudaTensor<E>) -> Result<Tensor> {
        // A channels-last volume comes down channels-first; packed weights are refused.
        let mut slot = None;
        let tensor = layout::volume_as(self, tensor, &mut slot, Layout::Standard)?;
        let len = tensor.shape.iter().product::<usize>();
        let values = self
            .stream
            .clone_dtoh(&tensor.data.slice(..len))
            .map_err(driver)?;
        Tensor::new(
            tensor.shape.clone(),
            values.par_iter().map(|&v| v.to_f32()).collect(),
        )
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor<E>> {
        self.zeroed(shape)
    }

    fn conv3d(&self, x: &CudaTensor<E>, conv: &Conv3d<CudaTensor<E>>) -> Result<CudaTensor<E>> {
        conv::conv3d(self, x, conv)
    }

    fn conv_transpose3d(
        &self,
        x: &CudaTensor<E>,
        conv: &ConvTranspose3d<CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        conv::conv_transpose3d(self, x, conv)
    }

    fn instance_norm_leaky_relu(
        &self,
        x: &mut CudaTensor<E>,
        norm: &InstanceNorm<CudaTensor<E>>,
    ) -> Result<()> {
        norm::instance_norm_leaky_relu(self, x, norm)
    }

    fn concat_channels(&self, a: &CudaTensor<E>, b: &CudaTensor<E>) -> Result<CudaTensor<E>> {
        volume::concat_channels(self, a, b)
    }

    fn conv3d_on_concat(
        &self,
        a: &CudaTensor<E>,
        b: &CudaTensor<E>,
        conv: &Conv3d<CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        conv::conv3d_on_concat(self, a, b, conv)
    }

    fn conv_norm_leaky_relu(
        &self,
        x: &CudaTensor<E>,
        second: Option<&CudaTensor<E>>,
        conv: &Conv3d<CudaTensor<E>>,
        norm: &InstanceNorm<CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        conv::conv_norm_leaky_relu(self, x, second, conv, norm)
    }

    fn crop(&self, x: &CudaTensor<E>, region: &Region) -> Result<CudaTensor<E>> {
        volume::crop(self, x, region)
    }

    fn flip(&self, x: &CudaTensor<E>, axes: &[usize]) -> Result<CudaTensor<E>> {
        volume::flip(self, x, axes)
    }

    fn add_assign(&self, acc: &mut CudaTensor<E>, x: &CudaTensor<E>) -> Result<()> {
        volume::add_assign(self, acc, x)
    }

    fn scale(&self, x: &mut CudaTensor<E>, factor: f32) -> Result<()> {
        volume::scale(self, x, factor)
    }

    fn accumulator(&self, shape: &[usize]) -> Result<CudaTensor<f32>> {
        self.zeroed(shape)
    }

    fn accumulate_weighted(
        &self,
        acc: &mut CudaTensor<f32>,
        tile: &CudaTensor<E>,
        weights: &CudaTensor<E>,
        region: &Region,
    ) -> Result<()> {
        volume::accumulate_weighted(self, acc, tile, weights, region)
    }

    fn divide_by_weights(
        &self,
        acc: CudaTensor<f32>,
        weight_sum: &CudaTensor<f32>,
    ) -> Result<CudaTensor<E>> {
        volume::divide_by_weights(self, acc, weight_sum)
    }

    fn softmax_channels(&self, x: &CudaTensor<E>) -> Result<CudaTensor<E>> {
        volume::softmax_channels(self, x)
    }

    fn argmax_channels(&self, x: &CudaTensor<E>) -> Result<Vec<Label>> {
        volume::argmax_channels(self, x)
    }

    /// On the GPU where x is stored in f16 (only the labels come down); f32 storage is rounded
    /// on the host.
    fn argmax_channels_f16(&self, x: &CudaTensor<E>) -> Result<Vec<Label>> {
        if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f16>() {
            self.argmax_channels(x)
        } else {
            CpuBackend.argmax_channels_f16(&self.download(x)?)
        }
    }

    fn input_tokens(
        &self,
        features: &CudaTensor<E>,
        roi: &Region,
        projection: &Linear<CudaTensor<E>>,
        pos_grid: &CudaTensor<E>,
    ) -> Result<CudaTensor<E>> {
        tokens::input_tokens(self, features, roi, projection, pos_grid)
    }

    fn region_tokens(&self, volume: &CudaTensor<E>, region: &Region) -> Result<CudaTensor<E>> {
        volume::region_tokens(self, volume, region)
    }

    fn add_positional_encoding(
        &self,
        x: &mut CudaTensor<E>,
        grid: &CudaTensor<E>,
        shape: [usize; 3],
    ) -> Result<()> {
        volume::add_positional_encoding(self, x, grid, shape)
    }

    fn gather_rows(&self, x: &CudaTensor<E>, rows: &[usize]) -> Result<CudaTensor<E>> {
        volume::gather_rows(self, x, rows)
    }

    fn linear(&self, x: &CudaTensor<E>, linear: &Linear<CudaTensor<E>>) -> Result<CudaTensor<E>> {
        linear::linear(self, x, linear)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor<E>,
        norm: &LayerNorm<CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        norm::layer_norm(self, x, norm)
    }

    fn layer_norm_linear(
        &self,
        x: &CudaTensor<E>,
        norm: &LayerNorm<CudaTensor<E>>,
        linear: &Linear<CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        norm::layer_norm_linear(self, x, norm, linear)
    }

    fn mlp(&self, x: &CudaTensor<E>, mlp: &Mlp<CudaTensor<E>>) -> Result<CudaTensor<E>> {
        linear::mlp(self, x, mlp)
    }

    fn feed_forward(&self, x: &mut CudaTensor<E>, ffn: &FeedForward<CudaTensor<E>>) -> Result<()> {
        linear::feed_forward(self, x, ffn)
    }

    fn attention(
        &self,
        q: &CudaTensor<E>,
        k: &CudaTensor<E>,
        v: &CudaTensor<E>,
        heads: usize,
    ) -> Result<CudaTensor<E>> {
        attention::attention(self, q, k, v, heads)
    }

    fn click_cross_attention(
        &self,
        x: &CudaTensor<E>,
        q: &CudaTensor<E>,
        norm: &LayerNorm<CudaTensor<E>>,
        key: &Linear<CudaTensor<E>>,
        value: &Linear<CudaTensor<E>>,
        heads: usize,
    ) -> Result<CudaTensor<E>> {
        attention::click_cross_attention(self, x, q, norm, key, value, heads)
    }

    fn click_update(
        &self,
        clicks: &mut CudaTensor<E>,
        attended: &CudaTensor<E>,
        update: &ClickUpdate<'_, CudaTensor<E>>,
    ) -> Result<CudaTensor<E>> {
        attention::click_update(self, clicks, attended, update)
    }

    fn label_assignment(
        &self,
        x: &mut CudaTensor<E>,
        click_keys: &CudaTensor<E>,
        click_values: &CudaTensor<E>,
        auto_embedding: &CudaTensor<E>,
        params: &LabelAssignment<'_, CudaTensor<E>>,
    ) -> Result<()> {
        attention::label_assignment(self, x, click_keys, click_values, auto_embedding, params)
    }

    fn argmax_rows(&self, x: &CudaTensor<E>) -> Result<Vec<Label>> {
        volume::argmax_rows(self, x)
    }
}
