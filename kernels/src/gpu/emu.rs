//! The emulated device: the same kernel sources compiled by g++ against our CUDA emulation
//! layer (`kernels/cuda/emu/`, built by `kernels/build.rs`) and run on the CPU. Device memory
//! is host memory; launches are synchronous and serialised by the emulator.

use std::alloc::{alloc, dealloc, Layout};
use std::ffi::{c_char, c_void, CStr, CString};

use half::f16;

use super::{Device, DevicePtr, Gemm, GemmBatch, GemmEpilogue, GpuError};

extern "C" {
    fn chingu_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn chingu_emu_kernel_name(index: usize) -> *const c_char;
}

/// Alignment of emulated allocations (cudaMalloc gives at least 256).
const ALIGN: usize = 256;

/// The CPU-emulated CUDA device.
#[derive(Debug, Default)]
pub struct EmuDevice;

impl EmuDevice {
    /// The emulated device.
    pub fn new() -> Self {
        Self
    }

    /// Every kernel the emulated build knows.
    pub fn kernel_names() -> Vec<String> {
        let mut names = Vec::new();
        // SAFETY: the function returns static strings, then null past the end.
        unsafe {
            loop {
                let p = chingu_emu_kernel_name(names.len());
                if p.is_null() {
                    break;
                }
                names.push(CStr::from_ptr(p).to_string_lossy().into_owned());
            }
        }
        names
    }
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        "emu (CUDA emulated on the CPU)".to_string()
    }

    /// The smallest opt-in limit of the architectures built for (sm_86 and sm_89: 99 KiB), so
    /// the tests run the block shapes a consumer card gets.
    fn max_dynamic_shared(&self, _kernel: &str) -> usize {
        99 * 1024
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr, GpuError> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN).expect("allocation size");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return Err(GpuError::Driver {
                call: "emu alloc".into(),
                message: format!("out of memory for {bytes} bytes"),
            });
        }
        // Poison fresh memory (0xFF bytes are NaN in f16/f32/f64) so a kernel that leaves an
        // output unwritten fails its test.
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xFF, bytes.max(1)) };
        Ok(ptr as DevicePtr)
    }

    unsafe fn free(&self, ptr: DevicePtr, bytes: usize) {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN).expect("allocation size");
        // SAFETY: allocated by `alloc` with this layout.
        unsafe { dealloc(ptr as *mut u8, layout) };
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<(), GpuError> {
        // SAFETY: `dst` is an allocation at least as large (DeviceBuffer checks).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn memset_zero(&self, dst: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: `dst` is an allocation of at least `bytes` (the callers check).
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    unsafe fn copy_on_device(
        &self,
        dst: DevicePtr,
        src: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        // SAFETY: as above; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), GpuError> {
        // SAFETY: as for upload.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        let name = CString::new(kernel).expect("kernel name");
        let (grid, block) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: the caller guarantees the arguments match the kernel.
        let rc = unsafe {
            chingu_emu_launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                shared_bytes,
                args.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the emulator wrote a NUL-terminated message.
        let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        Err(GpuError::Emulation { kernel: kernel.to_string(), message })
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        let batch = g.batch;
        if batch.count > 1 && (g.bias.is_some() || g.epilogue != GemmEpilogue::None) {
            return Err(GpuError::Shape {
                op: "gemm",
                message: "a batch of products takes no bias and no epilogue".into(),
            });
        }
        for i in 0..batch.count.max(1) {
            let offset = |ptr: DevicePtr, stride: usize, bytes: usize| {
                ptr + (i * stride * bytes) as DevicePtr
            };
            let one = Gemm {
                a: offset(g.a, batch.stride_a, 2),
                b: offset(g.b, batch.stride_b, 2),
                c: offset(g.c, batch.stride_c, if g.c_f32 { 4 } else { 2 }),
                batch: GemmBatch::ONE,
                ..*g
            };
            // SAFETY: the caller guarantees every product's extents.
            unsafe { single_gemm(&one) }?;
        }
        Ok(())
    }
}

/// One product of [`EmuDevice`]'s `gemm` (f32 sums on the CPU).
///
/// # Safety
/// As [`Device::gemm`].
unsafe fn single_gemm(g: &Gemm) -> Result<(), GpuError> {
    let Gemm { m, n, k, .. } = *g;
    // SAFETY: the caller guarantees the extents (device memory is host memory here).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(g.a as *const f16, m * k),
            std::slice::from_raw_parts(g.b as *const f16, k * n),
        )
    };
    let a: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
    let b: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    // Row/column strides of op(A) [m×k] and op(B) [k×n] in their stored layouts.
    let (rsa, csa) = if g.trans_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if g.trans_b { (1, k) } else { (n, 1) };
    let mut c = vec![0f32; m * n];
    if m > 0 && n > 0 && k > 0 {
        // SAFETY: the strides above address inside `a` and `b`; `c` is dense m×n.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        };
    }
    if let Some(bias) = g.bias {
        // SAFETY: bias holds n halves.
        let bias = unsafe { std::slice::from_raw_parts(bias as *const f16, n) };
        for row in c.chunks_mut(n.max(1)) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b.to_f32());
        }
    }
    match g.epilogue {
        GemmEpilogue::None => {}
        GemmEpilogue::Gelu { pre } => {
            // SAFETY: `pre` holds m×n halves (the caller's contract).
            let pre = unsafe { std::slice::from_raw_parts_mut(pre as *mut f16, m * n) };
            for (p, v) in pre.iter_mut().zip(c.iter_mut()) {
                *p = f16::from_f32(*v);
                *v = crate::cpu::gelu(*v);
            }
        }
        GemmEpilogue::GeluGrad { pre } => {
            // SAFETY: as above.
            let pre = unsafe { std::slice::from_raw_parts(pre as *const f16, m * n) };
            for (p, v) in pre.iter().zip(c.iter_mut()) {
                *v *= crate::cpu::gelu_slope(p.to_f32());
            }
        }
    }
    // SAFETY: C holds m×n elements of its type.
    unsafe {
        if g.c_f32 {
            let out = std::slice::from_raw_parts_mut(g.c as *mut f32, m * n);
            for (o, v) in out.iter_mut().zip(&c) {
                *o = if g.beta == 0.0 { *v } else { *o * g.beta + *v };
            }
        } else {
            let out = std::slice::from_raw_parts_mut(g.c as *mut f16, m * n);
            for (o, v) in out.iter_mut().zip(&c) {
                let prior = if g.beta == 0.0 { 0.0 } else { o.to_f32() * g.beta };
                *o = f16::from_f32(prior + *v);
            }
        }
    }
    Ok(())
}
