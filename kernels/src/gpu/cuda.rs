//! A real GPU through cudarc's driver API (feature "cuda"), loaded dynamically: a machine
//! without CUDA builds and runs, and [`CudaDevice::new`] says plainly what is missing.
//! Every kernel file is compiled by NVRTC for the device's architecture when the device is
//! opened (the on-disk cache, streams and the caching allocator come with the CUDA backend).

use std::collections::HashMap;
use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use super::{nvrtc, sources, Device, DevicePtr, Gemm, GpuError};

/// One CUDA device with every kernel loaded.
pub struct CudaDevice {
    ordinal: usize,
    context: sys::CUcontext,
    label: String,
    arch: (i32, i32),
    functions: HashMap<String, sys::CUfunction>,
}

// SAFETY: the context is made current on whichever thread calls in; driver handles are
// thread-safe.
unsafe impl Send for CudaDevice {}
// SAFETY: as above.
unsafe impl Sync for CudaDevice {}

fn driver(call: &str) -> impl FnOnce(result::DriverError) -> GpuError + '_ {
    move |e| GpuError::Driver { call: call.to_string(), message: format!("{e:?}") }
}

impl CudaDevice {
    /// True when the CUDA driver library can be loaded.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to open the library.
        unsafe { sys::is_culib_present() }
    }

    /// Number of CUDA devices (0 without a driver).
    pub fn count() -> usize {
        if !Self::driver_present() || result::init().is_err() {
            return 0;
        }
        result::device::get_count().map(|n| n.max(0) as usize).unwrap_or(0)
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
        // SAFETY: `dev` is a valid device handle.
        let (context, major, minor) = unsafe {
            let context =
                result::primary_ctx::retain(dev).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            result::ctx::set_current(context).map_err(driver("cuCtxSetCurrent"))?;
            let attr =
                |a| result::device::get_attribute(dev, a).map_err(driver("cuDeviceGetAttribute"));
            (
                context,
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            )
        };
        let name = result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
        let arch = format!("compute_{major}{minor}");
        let mut functions = HashMap::new();
        for (file, source) in sources::FILES {
            let compiled = nvrtc::compile(file, source, &arch, &[])?;
            // SAFETY: NUL-terminated PTX; the module stays loaded for the process.
            let module = unsafe { result::module::load_data(compiled.image.as_ptr().cast()) }
                .map_err(driver("cuModuleLoadData"))?;
            for kernel in sources::kernel_names(source) {
                let c_name = CString::new(kernel.clone()).expect("kernel name");
                // SAFETY: `module` is loaded.
                let f = unsafe { result::module::get_function(module, c_name) }
                    .map_err(driver("cuModuleGetFunction"))?;
                functions.insert(kernel, f);
            }
        }
        Ok(Self {
            ordinal,
            context,
            label: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
            arch: (major, minor),
            functions,
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

    fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: the context lives as long as the process (primary context retained).
        unsafe { result::ctx::set_current(self.context) }.map_err(driver("cuCtxSetCurrent"))
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr, GpuError> {
        self.bind()?;
        // SAFETY: plain allocation.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(driver("cuMemAlloc"))
    }

    fn free(&self, ptr: DevicePtr, _bytes: usize) {
        if self.bind().is_ok() {
            // SAFETY: allocated by `alloc`; freeing can only fail after a sticky error, which
            // the next synchronize reports.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: `dst` covers `src.len()` bytes (DeviceBuffer checks).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(driver("cuMemcpyHtoD"))
    }

    fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), GpuError> {
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
            message: "no such kernel in the compiled modules".into(),
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
        result::ctx::synchronize().map_err(driver("cuCtxSynchronize"))
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        Err(GpuError::Driver {
            call: format!("gemm {}x{}x{}", g.m, g.n, g.k),
            message: "cuBLASLt GEMMs are not wired in yet".into(),
        })
    }
}
