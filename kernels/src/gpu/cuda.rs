//! A real GPU through cudarc's driver API (feature "cuda"), loaded dynamically: a machine
//! without CUDA builds and runs, and [`CudaDevice::new`] says plainly what is missing.
//! Every kernel file is compiled by NVRTC for the device's architecture when the device is
//! opened (PTX cached on disk, see `nvrtc::compile_cached`); freed memory is kept for reuse;
//! all work goes to the default stream (NCCL's sums run on a stream of their own, see
//! [`super::nccl`]).
//! Matrix products go through cuBLASLt when its library is there (`cublaslt.rs`, see
//! [`Device::gemm`]). With `CHINGU_PROFILE=events`, launches are bracketed by pooled events
//! read at the next synchronisation ([`Device::span_start`]).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{result, sys};

use super::buffer_cache::{size_class, BufferCache};
use super::cublaslt::Blas;
pub use super::cublaslt::{TUNE_ARRAYS_VAR, TUNE_CANDIDATES_VAR, TUNE_VAR};
use super::{nvrtc, sources, Device, DevicePtr, Gemm, GpuError};

/// One CUDA device with every kernel loaded.
pub struct CudaDevice {
    ordinal: usize,
    context: sys::CUcontext,
    label: String,
    arch: (i32, i32),
    functions: HashMap<String, sys::CUfunction>,
    /// Per kernel, the dynamic shared memory it was opted in to (absent: 48 KiB).
    shared_limits: HashMap<String, usize>,
    /// cuBLASLt, when libcublasLt could be loaded.
    blas: Option<Blas>,
    /// Freed allocations by size class, handed out again (see [`super::buffer_cache`]). Reuse is
    /// safe because every launch and copy is ordered on one stream.
    cache: std::sync::Mutex<BufferCache>,
    /// `CHINGU_PROFILE=events`' events (see [`Device::span_start`]).
    spans: Mutex<Spans>,
    /// Resident blocks by (function, threads, dynamic shared memory): the occupancy calculator
    /// asked once per launch size, not at every attention call.
    occupancy: Mutex<HashMap<(usize, u32, usize), Option<usize>>>,
    /// Pointer-array batches queued so far ([`Device::pointer_array_batches`]).
    pointer_array_batches: std::sync::atomic::AtomicUsize,
    /// [`Device::zeroed_counters`].
    counters: super::KeptCounters,
}

/// Timing events for `CHINGU_PROFILE=events`: ended spans not yet read, and events to reuse.
#[derive(Default)]
struct Spans {
    ended: Vec<(String, sys::CUevent, sys::CUevent)>,
    free: Vec<sys::CUevent>,
}

impl Spans {
    /// A free event, or a new one (context current).
    fn event(&mut self) -> Result<sys::CUevent, GpuError> {
        match self.free.pop() {
            Some(event) => Ok(event),
            None => result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(driver("cuEventCreate")),
        }
    }

    /// An event recorded now on the null stream.
    fn record(&mut self) -> Result<sys::CUevent, GpuError> {
        let event = self.event()?;
        // SAFETY: a live event of the current context; the null stream.
        match unsafe { result::event::record(event, std::ptr::null_mut()) } {
            Ok(()) => Ok(event),
            Err(e) => {
                self.free.push(event);
                Err(driver("cuEventRecord")(e))
            }
        }
    }
}

/// Oldest compute capability (major) the kernels are written for: sm_80.
const MIN_MAJOR: i32 = 8;

// SAFETY: the context is made current on whichever thread calls in; driver handles are
// thread-safe.
unsafe impl Send for CudaDevice {}
// SAFETY: as above.
unsafe impl Sync for CudaDevice {}

pub(super) fn driver(call: &str) -> impl FnOnce(result::DriverError) -> GpuError + '_ {
    move |e| GpuError::Driver { call: call.to_string(), message: format!("{e:?}") }
}

impl CudaDevice {
    /// cuBLASLt, or why there is none.
    fn blas(&self) -> Result<&Blas, GpuError> {
        self.blas.as_ref().ok_or_else(|| {
            GpuError::Missing(
                "cuBLASLt (libcublasLt.so) not found: GPU matrix products need the CUDA \
                 toolkit's cuBLAS libraries on the library path"
                    .into(),
            )
        })
    }

    /// True when the CUDA driver library can be loaded.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to open the library.
        unsafe { sys::is_culib_present() }
    }

    /// cuBLASLt's version (`cublasLtGetVersion`: 130002 for 13.0.2) where the library loads.
    pub fn cublaslt_version() -> Option<usize> {
        // SAFETY: only tries to open the library, then a plain query of it.
        unsafe { lt_sys::is_culib_present().then(|| lt_sys::cublasLtGetVersion()) }
    }

    /// Number of CUDA devices (0 without a driver).
    pub fn count() -> usize {
        if !Self::driver_present() || result::init().is_err() {
            return 0;
        }
        result::device::get_count().map(|n| n.max(0) as usize).unwrap_or(0)
    }

    /// Opens device `index mod count` for a trainer (`chingu train` takes 0, a launched rank
    /// its rank): the one place that turns "no GPU here" into a one-line reason.
    pub fn open_for(index: usize) -> Result<Self, GpuError> {
        match Self::count() {
            0 => Err(GpuError::Missing("no CUDA driver or device found".into())),
            count => Self::new(index % count),
        }
    }

    /// Opens device `ordinal` and compiles every kernel for its architecture.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !Self::driver_present() {
            return Err(GpuError::Missing(
                "no CUDA driver (libcuda.so) found: this machine has no NVIDIA GPU set up".into(),
            ));
        }
        result::init().map_err(driver("cuInit"))?;
        let count = result::device::get_count().map_err(driver("cuDeviceGetCount"))?;
        if ordinal as i32 >= count {
            return Err(GpuError::Missing(format!(
                "CUDA device {ordinal} asked for, {count} present"
            )));
        }
        let dev = result::device::get(ordinal as i32).map_err(driver("cuDeviceGet"))?;
        let name = result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
        // SAFETY: `dev` is a valid device handle (attributes need no context).
        let (major, minor) = unsafe {
            let attr =
                |a| result::device::get_attribute(dev, a).map_err(driver("cuDeviceGetAttribute"));
            (
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            )
        };
        // The attention kernels use mma.sync.m16n8k16 and the WMMA shapes of sm_80: an older
        // GPU would fail later, inside NVRTC or the module load, with a less useful message.
        if major < MIN_MAJOR {
            return Err(GpuError::Missing(format!(
                "CUDA device {ordinal} ({name}) is sm_{major}{minor}; chingu's kernels need \
                 compute capability {MIN_MAJOR}.0 or newer (Ampere, Ada or Hopper)"
            )));
        }
        // SAFETY: `dev` is a valid device handle.
        let context = unsafe {
            let context =
                result::primary_ctx::retain(dev).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            result::ctx::set_current(context).map_err(driver("cuCtxSetCurrent"))?;
            context
        };
        let mut functions = HashMap::new();
        for (file, source) in sources::FILES {
            // Files for another architecture (the Hopper-only ones elsewhere) are left out:
            // launching one of their kernels is an error that says so.
            let Some(arch) = sources::arch_for(file, major, minor) else { continue };
            let ptx = nvrtc::compile_cached(file, source, &arch)?;
            // SAFETY: NUL-terminated PTX; the module stays loaded for the process.
            let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }
                .map_err(driver("cuModuleLoadData"))?;
            for kernel in sources::kernel_names(source) {
                // A Hopper kernel is a trap on any other device: not loaded there, so
                // `has_kernel` says no and the launchers never pick it.
                if sources::hopper_only(&kernel) && (major, minor) != (9, 0) {
                    continue;
                }
                let c_name = CString::new(kernel.clone()).expect("kernel name");
                // SAFETY: `module` is loaded.
                let f = unsafe { result::module::get_function(module, c_name) }
                    .map_err(driver("cuModuleGetFunction"))?;
                functions.insert(kernel, f);
            }
        }
        // Opt every kernel in to the device's largest shared memory per block (the attention
        // kernels use bigger tiles with it); a kernel that refuses keeps the default 48 KiB.
        let optin = attr_optin(dev)?;
        let mut shared_limits = HashMap::new();
        for (name, &f) in &functions {
            use sys::CUfunction_attribute_enum as A;
            // SAFETY: `f` is a loaded function of the current context.
            let granted = unsafe {
                let fixed = result::function::get_function_attribute(
                    f,
                    A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )
                .unwrap_or(0)
                .max(0) as usize;
                let dynamic = optin.saturating_sub(fixed);
                result::function::set_function_attribute(
                    f,
                    A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic as i32,
                )
                .map(|()| dynamic)
            };
            if let Ok(dynamic) = granted {
                shared_limits.insert(name.clone(), dynamic.max(48 * 1024));
            }
        }
        // SAFETY: only tries to open the library.
        let blas = if unsafe { lt_sys::is_culib_present() } {
            Some(Blas::new(context, &format!("{name} sm_{major}{minor}"))?)
        } else {
            None
        };
        Ok(Self {
            ordinal,
            context,
            label: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
            arch: (major, minor),
            functions,
            shared_limits,
            blas,
            cache: std::sync::Mutex::new(BufferCache::default()),
            spans: Mutex::new(Spans::default()),
            occupancy: Mutex::new(HashMap::new()),
            pointer_array_batches: std::sync::atomic::AtomicUsize::new(0),
            counters: Default::default(),
        })
    }

    /// Compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Frees every cached allocation (after an out-of-memory, or to hand memory back).
    pub fn release_cached(&self) {
        let parked = self.cache.lock().expect("allocator").drain();
        if self.bind().is_ok() {
            for ptr in parked {
                // SAFETY: allocated by `alloc` and no longer referenced by any buffer.
                let _ = unsafe { result::free_sync(ptr) };
            }
        }
    }

    /// The device's primary context (for NCCL's streams and events).
    pub(super) fn context(&self) -> sys::CUcontext {
        self.context
    }

    /// Makes the device's context current on the calling thread.
    pub(super) fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: the context lives as long as the process (primary context retained).
        unsafe { result::ctx::set_current(self.context) }.map_err(driver("cuCtxSetCurrent"))
    }
}

/// The device's opt-in limit of shared memory per block (48 KiB where it has none).
fn attr_optin(dev: sys::CUdevice) -> Result<usize, GpuError> {
    let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
    // SAFETY: `dev` is a valid device handle.
    let bytes = unsafe { result::device::get_attribute(dev, attr) }
        .map_err(driver("cuDeviceGetAttribute"))?;
    Ok((bytes.max(0) as usize).max(48 * 1024))
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn max_dynamic_shared(&self, kernel: &str) -> usize {
        self.shared_limits.get(kernel).copied().unwrap_or(48 * 1024)
    }

    fn has_kernel(&self, kernel: &str) -> bool {
        self.functions.contains_key(kernel)
    }

    fn resident_blocks(&self, kernel: &str, threads: u32, shared: usize) -> Option<usize> {
        let &f = self.functions.get(kernel)?;
        let key = (f as usize, threads, shared);
        let mut known = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&blocks) = known.get(&key) {
            return blocks;
        }
        self.bind().ok()?;
        // SAFETY: `f` is a loaded function of this device's context, now current.
        let blocks = unsafe {
            result::occupancy::max_active_block_per_multiprocessor(f, threads as i32, shared)
        };
        let blocks = blocks.ok().map(|b| b.max(0) as usize);
        known.insert(key, blocks);
        blocks
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr, GpuError> {
        let size = size_class(bytes);
        if let Some(ptr) = self.cache.lock().expect("allocator").take(size) {
            return Ok(ptr);
        }
        self.bind()?;
        // SAFETY: plain allocation.
        match unsafe { result::malloc_sync(size) } {
            Ok(ptr) => Ok(ptr),
            Err(_) => {
                // Out of memory with buffers parked in the cache: give them back, try again.
                self.release_cached();
                // SAFETY: as above.
                unsafe { result::malloc_sync(size) }.map_err(|e| {
                    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        let in_use =
                            result::mem_get_info().ok().map(|(free, total)| (total - free, total));
                        GpuError::OutOfMemory { bytes: size, in_use }
                    } else {
                        driver("cuMemAlloc")(e)
                    }
                })
            }
        }
    }

    unsafe fn free(&self, ptr: DevicePtr, bytes: usize) {
        self.cache.lock().expect("allocator").park(size_class(bytes), ptr);
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `dst` covers `src.len()` bytes (DeviceBuffer checks).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(driver("cuMemcpyHtoD"))
    }

    fn memory(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        result::mem_get_info().ok().map(|(free, total)| (total - free, total))
    }

    unsafe fn memset_zero(&self, dst: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `dst` covers `bytes` (the callers check). Queued on the default stream like
        // every launch, so the host does not wait for the device here.
        unsafe { result::memset_d8_async(dst, 0, bytes, std::ptr::null_mut()) }
            .map_err(driver("cuMemsetD8Async"))
    }

    unsafe fn copy_on_device(
        &self,
        dst: DevicePtr,
        src: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: both cover `bytes`; queued on the default stream (no host wait).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, std::ptr::null_mut()) }
            .map_err(driver("cuMemcpyDtoDAsync"))
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `src` covers `dst.len()` bytes.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(driver("cuMemcpyDtoH"))
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        self.bind()?;
        let f = *self.functions.get(kernel).ok_or_else(|| GpuError::Driver {
            call: format!("launch {kernel}"),
            message: if sources::hopper_only(kernel) {
                "a Hopper (sm_90) kernel: this device does not load it".into()
            } else {
                "no such kernel in the compiled modules".into()
            },
        })?;
        // SAFETY: the caller guarantees the arguments; the default stream orders launches.
        unsafe { result::launch_kernel(f, grid, block, shared_bytes, std::ptr::null_mut(), args) }
            .map_err(|e| GpuError::Driver {
                call: format!("launch {kernel} grid {grid:?} block {block:?}"),
                message: format!("{e:?}"),
            })
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        // The spans ended so far, taken before waiting, so each is complete once the wait
        // returns (one another thread ends meanwhile waits for the next synchronisation).
        let ended = {
            let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut spans.ended)
        };
        let waited = result::ctx::synchronize().map_err(driver("cuCtxSynchronize"));
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut first_error = waited.err();
        for (name, start, end) in ended {
            if first_error.is_none() {
                // SAFETY: live events of this context, both recorded and complete.
                match unsafe { result::event::elapsed(start, end) } {
                    Ok(ms) => crate::profile::record(name, f64::from(ms) / 1e3),
                    Err(e) => first_error = Some(driver("cuEventElapsedTime")(e)),
                }
            }
            // Back for reuse whatever happened.
            spans.free.extend([start, end]);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn span_start(&self) -> Result<Option<super::SpanStart>, GpuError> {
        self.bind()?;
        let event = self.spans.lock().unwrap_or_else(|e| e.into_inner()).record()?;
        Ok(Some(super::SpanStart(event as usize as u64)))
    }

    fn span_end(&self, start: super::SpanStart, name: String) -> Result<(), GpuError> {
        self.bind()?;
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let start = start.0 as usize as sys::CUevent;
        match spans.record() {
            Ok(end) => {
                spans.ended.push((name, start, end));
                Ok(())
            }
            Err(e) => {
                spans.free.push(start);
                Err(e)
            }
        }
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        let blas = self.blas()?;
        if !has_work(g)? {
            return Ok(());
        }
        self.bind()?;
        // The fp16 bias of an fp32 product is widened into a scratch buffer first: cuBLASLt's
        // bias defaults to D's type, and the guard keeps other threads off the scratch until
        // the product that reads it is queued (the null stream then orders the rest).
        let mut scratch = None;
        let bias = match g.bias {
            Some(bias) if g.c_f32 => {
                let mut guard = blas.bias_f32.lock().unwrap_or_else(|e| e.into_inner());
                let widened = self.widen_bias(&mut guard, bias, g.n)?;
                scratch = Some(guard);
                Some(widened)
            }
            other => other,
        };
        // SAFETY: the caller guarantees the extents; the context is current.
        let queued = unsafe { blas.matmul(g, bias) };
        drop(scratch);
        if queued.is_ok() && g.batch.pointer_arrays.is_some() {
            self.pointer_array_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        queued
    }

    fn pointer_array_batches(&self) -> Option<usize> {
        Some(self.pointer_array_batches.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn zeroed_counters(&self, count: usize) -> Result<DevicePtr, GpuError> {
        self.counters.at_least(self, count)
    }

    fn has_pointer_array_gemm(&self, g: &Gemm) -> Result<bool, GpuError> {
        let blas = self.blas()?;
        self.bind()?;
        blas.has_pointer_array_plan(g)
    }
}

/// Whether `g` has anything to compute (not with no rows or columns); an error for an empty sum.
fn has_work(g: &Gemm) -> Result<bool, GpuError> {
    if g.m == 0 || g.n == 0 {
        return Ok(false);
    }
    if g.k == 0 {
        return Err(GpuError::Shape {
            op: "gemm",
            message: format!("{}×{}×0: cuBLASLt takes no empty sums (k ≥ 1)", g.m, g.n),
        });
    }
    Ok(true)
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let spans = std::mem::take(self.spans.get_mut().unwrap_or_else(|e| e.into_inner()));
        if spans.ended.is_empty() && spans.free.is_empty() {
            return;
        }
        if self.bind().is_ok() {
            let ended = spans.ended.into_iter().flat_map(|(_, start, end)| [start, end]);
            for event in ended.chain(spans.free) {
                // SAFETY: created by `Spans::event` in this context; no longer used.
                let _ = unsafe { result::event::destroy(event) };
            }
        }
    }
}

impl CudaDevice {
    /// Queues `scratch = f32(bias)` for `n` elements (growing the scratch) and returns it.
    fn widen_bias(
        &self,
        scratch: &mut (DevicePtr, usize),
        bias: DevicePtr,
        n: usize,
    ) -> Result<DevicePtr, GpuError> {
        let count = i32::try_from(n).map_err(|_| GpuError::Shape {
            op: "gemm",
            message: format!("bias of {n} elements exceeds the kernels' int"),
        })?;
        if scratch.1 < n {
            // Earlier products may still read the old scratch.
            self.synchronize()?;
            if scratch.1 > 0 {
                // SAFETY: the scratch buffer was allocated with this size and is replaced now.
                unsafe { self.free(scratch.0, scratch.1 * 4) };
                *scratch = (0, 0);
            }
            let capacity = n.max(1024);
            *scratch = (self.alloc(capacity * 4)?, capacity);
        }
        let out = scratch.0;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        let args: &mut [*mut c_void] = &mut [
            (&out as *const DevicePtr).cast_mut().cast(),
            (&bias as *const DevicePtr).cast_mut().cast(),
            (&count as *const i32).cast_mut().cast(),
        ];
        // SAFETY: cast_f16_to_f32(float* out, const __half* in, int n); `out` holds at least
        // n floats and the caller guarantees `bias` holds n halves.
        unsafe { self.launch("cast_f16_to_f32", (blocks, 1, 1), (256, 1, 1), 0, args) }?;
        Ok(out)
    }
}
