//! The hand-written CUDA kernels (`kernels/cuda/*.cu`) and what runs them: a [`Device`]
//! (a real GPU through cudarc with feature "cuda", or our CPU emulation of CUDA with feature
//! "emu"), typed device buffers, and one checked launcher per kernel in [`ops`].
//!
//! Both devices take the same argument lists (cuLaunchKernel's array of pointers to each
//! argument's value), so a launcher is written once and the test bodies in
//! `kernels/tests/gpu_kernels.rs` run unchanged on the emulator in CI and on a GPU when one
//! is there.

pub mod backend;
pub mod buffer_cache;
pub mod collective;
pub mod gemm;
pub mod ops;
pub mod profile;
pub mod sources;

#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod tune_store;

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

/// What can go wrong on a device, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA library could not be loaded (no driver, no NVRTC).
    #[error("{0}")]
    Missing(String),
    /// The device had no memory left for an allocation (after giving back what the device
    /// kept cached for reuse).
    #[error("{}", out_of_memory_text(*bytes, *in_use))]
    OutOfMemory {
        /// The allocation's size.
        bytes: usize,
        /// (in use, total) device memory when it failed, where the device can tell.
        in_use: Option<(usize, usize)>,
    },
    /// A driver call failed.
    #[error("CUDA {call} failed: {message}")]
    Driver {
        /// The driver call or the kernel launched.
        call: String,
        /// The driver's error name and text.
        message: String,
    },
    /// NVRTC rejected a kernel file (or warned, where warnings are errors).
    #[error("NVRTC could not compile {file} for {arch}:\n{log}")]
    Compile {
        /// The .cu file.
        file: String,
        /// `compute_XY` or `sm_XY`.
        arch: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A launcher was given buffers whose sizes do not fit the op.
    #[error("{op}: {message}")]
    Shape {
        /// The op.
        op: &'static str,
        /// What does not fit.
        message: String,
    },
    /// A collective operation across ranks failed (NCCL, or the emulated group).
    #[error("{0}")]
    Collective(String),
    /// A setting (an environment variable) has a value the device cannot use.
    #[error("{0}")]
    Setting(String),
    /// cuBLASLt (or the emulated device, told to act so) has no kernel for a fused product;
    /// nothing was queued, and the caller takes the unfused ops instead.
    #[error("{0}")]
    Unsupported(String),
    /// The emulated device refused a launch or a kernel failed on it.
    #[error("emulated launch of {kernel} failed: {message}")]
    Emulation {
        /// The kernel.
        kernel: String,
        /// The emulator's message.
        message: String,
    },
}

fn out_of_memory_text(bytes: usize, in_use: Option<(usize, usize)>) -> String {
    let size = |b: usize| match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    };
    let state = in_use.map_or_else(String::new, |(used, total)| {
        format!(" ({} of {} in use)", size(used), size(total))
    });
    format!("out of device memory: {} more did not fit{state}", size(bytes))
}

/// A shared handle to a device, as launchers and buffers take it.
pub type Gpu = Arc<dyn Device>;

/// A device address (on the emulated device, a host address).
pub type DevicePtr = u64;

/// One matrix product, row-major: `C[m×n] = op(A)·op(B) + beta·C (+ bias)`, fp16 inputs,
/// fp32 compute. `A` is `[m×k]` (`[k×m]` when `trans_a`), `B` is `[k×n]` (`[n×k]` when
/// `trans_b`), both fp16; `C` is `[m×n]`, fp32 when `c_f32` else fp16; each stored row-major
/// with the row stride `ld` gives it (dense unless told otherwise). `beta`
/// is 0 (overwrite) or 1 (accumulate). `bias` (fp16 `[n]`, added to every row) only with
/// `beta = 0`; `epilogue` fuses the GELU of the feed-forward block (fp16 `C`, `beta = 0`) or
/// a linear's bias gradient into its weight gradient's product (fp32 `C`, any `beta`).
/// The emulated device computes it on the CPU (f32 sums); a GPU through cuBLASLt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// A's address.
    pub a: DevicePtr,
    /// A is stored `[k×m]`.
    pub trans_a: bool,
    /// B's address.
    pub b: DevicePtr,
    /// B is stored `[n×k]`.
    pub trans_b: bool,
    /// C's address.
    pub c: DevicePtr,
    /// C is fp32 (else fp16).
    pub c_f32: bool,
    /// 0 or 1.
    pub beta: f32,
    /// Optional fp16 bias `[n]`.
    pub bias: Option<DevicePtr>,
    /// What happens to the (biased) product before it is stored.
    pub epilogue: GemmEpilogue,
    /// Several products of one shape at once (cuBLASLt's strided batch).
    pub batch: GemmBatch,
    /// Row strides (elements) of A, B and C as stored, each at least its stored row length;
    /// [`Gemm::DENSE`] for rows packed one after another. Bias and epilogues need a dense C.
    pub ld: [usize; 3],
}

/// A device's [`Device::zeroed_counters`]: the current block's address and count (0: none
/// made yet), and the blocks it outgrew.
#[cfg(any(feature = "cuda", feature = "emu"))]
#[derive(Debug, Default)]
pub(crate) struct KeptCounters(std::sync::Mutex<Counters>);

#[cfg(any(feature = "cuda", feature = "emu"))]
#[derive(Debug, Default)]
pub(crate) struct Counters {
    current: (DevicePtr, usize),
    /// Outgrown blocks, never handed back while the device lives: another thread may hold
    /// one's address from an earlier call and not have queued its launch yet, so freeing it
    /// (for the allocator to hand to other work, or on the emulator back to the host) could
    /// let that launch count in memory that is no longer its. They are small (a few KiB in
    /// all: each block at least doubles the last). The emulated device frees them when
    /// dropped ([`KeptCounters::release`]); a CUDA device leaves them, as it leaves its
    /// cached buffers, to the context's end.
    retired: Vec<(DevicePtr, usize)>,
}

#[cfg(any(feature = "cuda", feature = "emu"))]
impl KeptCounters {
    /// At least `count` of `dev`'s counters, made and zeroed (at least 256) where fewer exist.
    pub(crate) fn at_least(&self, dev: &dyn Device, count: usize) -> Result<DevicePtr, GpuError> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if count > kept.current.1 {
            let made = count.next_power_of_two().max(256);
            let ptr = dev.alloc(made * 4)?;
            // SAFETY: `ptr` holds `made` counters.
            if let Err(e) = unsafe { dev.memset_zero(ptr, made * 4) } {
                // SAFETY: allocated above, used by nothing.
                unsafe { dev.free(ptr, made * 4) };
                return Err(e);
            }
            let old = std::mem::replace(&mut kept.current, (ptr, made));
            if old.1 > 0 {
                kept.retired.push(old);
            }
        }
        Ok(kept.current.0)
    }

    /// Frees every block (their device being dropped, nothing running): the emulated
    /// device's drop.
    pub(crate) fn release(&mut self, dev: &dyn Device) {
        let kept = std::mem::take(self.0.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (ptr, count) in kept.retired.into_iter().chain([kept.current]) {
            if count > 0 {
                // SAFETY: made by `at_least`, freed once.
                unsafe { dev.free(ptr, count * 4) };
            }
        }
    }
}

/// The product's shape for messages and profiles: `72 × 1024×192×1024 Aᵀ B → f16 · GELU'`
/// (batch count, m×n×k, which operands are transposed, C's type, the epilogue, and
/// "(pointer arrays)" for such a batch).
impl std::fmt::Display for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |transposed| if transposed { "ᵀ" } else { "" };
        if self.batch.count > 1 {
            write!(f, "{} × ", self.batch.count)?;
        }
        let (m, n, k) = (self.m, self.n, self.k);
        let (ta, tb) = (t(self.trans_a), t(self.trans_b));
        let out = if self.c_f32 { "f32" } else { "f16" };
        let epilogue = match self.epilogue {
            GemmEpilogue::None => "",
            GemmEpilogue::Gelu { .. } => " + GELU",
            GemmEpilogue::GeluGrad { .. } => " · GELU'",
            GemmEpilogue::BiasGrad { .. } => " + Σ rows of op(A)",
        };
        let arrays = if self.batch.pointer_arrays.is_some() { " (pointer arrays)" } else { "" };
        write!(f, "{m}×{n}×{k} A{ta} B{tb} → {out}{epilogue}{arrays}")
    }
}

impl Gemm {
    /// Every matrix dense: the row stride is the stored row length.
    pub const DENSE: [usize; 3] = [0; 3];

    /// Product `i` of this (strided) batch, as a product of its own.
    pub fn nth(&self, i: usize) -> Gemm {
        debug_assert!(self.batch.pointer_arrays.is_none(), "nth of a pointer-array batch");
        let c_bytes = if self.c_f32 { 4 } else { 2 };
        let at =
            |ptr: DevicePtr, stride: usize, bytes: usize| ptr + (i * stride * bytes) as DevicePtr;
        Gemm {
            a: at(self.a, self.batch.stride_a, 2),
            b: at(self.b, self.batch.stride_b, 2),
            c: at(self.c, self.batch.stride_c, c_bytes),
            batch: GemmBatch::ONE,
            ..*self
        }
    }

    /// Whether the product has neither a bias nor an epilogue: what batches (strided or
    /// pointer-array) take.
    pub fn is_plain(&self) -> bool {
        self.bias.is_none() && self.epilogue == GemmEpilogue::None
    }

    /// (rows, columns) of A, B and C as stored.
    pub fn stored(&self) -> [(usize, usize); 3] {
        let a = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let b = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        [a, b, (self.m, self.n)]
    }

    /// Row strides of A, B and C, dense ones spelled out.
    pub fn row_strides(&self) -> [usize; 3] {
        let stored = self.stored();
        std::array::from_fn(|i| if self.ld[i] == 0 { stored[i].1 } else { self.ld[i] })
    }

    /// Elements each matrix spans from its first to past its last (0 for an empty one).
    pub fn spans(&self) -> [usize; 3] {
        let (stored, ld) = (self.stored(), self.row_strides());
        std::array::from_fn(|i| match stored[i] {
            (0, _) | (_, 0) => 0,
            (rows, cols) => (rows - 1) * ld[i] + cols,
        })
    }

    /// Refuses row strides shorter than their rows, a C with gaps where a bias or an
    /// epilogue writes it (both devices take them dense only), and a fused bias gradient
    /// beside an fp16 C or a bias.
    pub fn check_strides(&self) -> Result<(), GpuError> {
        let (stored, ld) = (self.stored(), self.row_strides());
        let shape = |message: String| Err(GpuError::Shape { op: "gemm", message });
        for (name, (&(_, cols), &stride)) in ["A", "B", "C"].iter().zip(stored.iter().zip(&ld)) {
            if stride < cols {
                return shape(format!(
                    "{name}'s row stride {stride} is shorter than its {cols} columns"
                ));
            }
        }
        let dense_c = ld[2] == self.n;
        if !dense_c && !self.is_plain() {
            return shape("a bias or an epilogue needs a dense C".into());
        }
        if let GemmEpilogue::BiasGrad { .. } = self.epilogue {
            if !self.c_f32 || self.bias.is_some() {
                return shape("a fused bias gradient needs an fp32 C and no bias".into());
            }
        }
        Ok(())
    }
}

/// Products `i < count` of a batch use A at `a + i·stride_a` elements, B and C likewise
/// (`count` 1: one product, strides unused). Only without bias and epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmBatch {
    /// Products in the batch (at least 1).
    pub count: usize,
    /// Elements from one A to the next.
    pub stride_a: usize,
    /// Elements from one B to the next.
    pub stride_b: usize,
    /// Elements from one C to the next.
    pub stride_c: usize,
    /// `Some(alignment)`: a batch whose matrices lie anywhere (cuBLASLt's pointer-array
    /// batches). The product's `a`, `b` and `c` are then each the device address of `count`
    /// matrix addresses (u64), product i's the i-th of each, every one of them a multiple of
    /// `alignment` bytes (a power of two, at most 256); the strides are unused. See
    /// [`gemm::run_group`] and [`Device::has_pointer_array_gemm`].
    pub pointer_arrays: Option<u32>,
}

impl GemmBatch {
    /// One product.
    pub const ONE: Self =
        Self { count: 1, stride_a: 0, stride_b: 0, stride_c: 0, pointer_arrays: None };

    /// `count` products, each matrix `stride_*` elements after the one before.
    pub fn strided(count: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Self {
        Self { count, stride_a, stride_b, stride_c, pointer_arrays: None }
    }

    /// `count` products whose matrices lie anywhere, every address a multiple of `align`
    /// bytes ([`GemmBatch::pointer_arrays`]).
    pub fn scattered(count: usize, align: u32) -> Self {
        Self { count, pointer_arrays: Some(align), ..Self::ONE }
    }
}

/// The alignment of a device address in bytes: its largest power-of-two divisor, at most 256
/// (0 counts as 256).
pub fn address_alignment(ptr: DevicePtr) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// A pointwise step fused into a product's store (cuBLASLt's epilogues), so the activation
/// costs no pass over memory of its own. GELU is the tanh approximation, as the backends'
/// `gelu_forward` (and cuBLASLt's). `pre` is fp16 `[m×n]`, dense like `C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GemmEpilogue {
    /// `C = A·B (+ bias)`.
    #[default]
    None,
    /// `pre = A·B + bias` and `C = gelu(A·B + bias)`, GELU taken before rounding `pre`.
    Gelu {
        /// Where the pre-activation goes (the backward's input).
        pre: DevicePtr,
    },
    /// `C = (A·B) · gelu'(pre)`: the product is the gradient of the activation; `C`, that of
    /// the pre-activation.
    GeluGrad {
        /// The forward's pre-activation.
        pre: DevicePtr,
    },
    /// `C = A·B` as without an epilogue, and `grad[i] = Σ_k op(A)[i][k]` for `i < m` (fp32,
    /// overwritten; `C` fp32): the bias gradient of the linear whose weight gradient
    /// `dW = dyᵀ·x` this product is, summed while `dy` passes through the product anyway
    /// (cuBLASLt's `BGRADB`: its B is our A).
    BiasGrad {
        /// `[m]` fp32.
        grad: DevicePtr,
    },
}

impl GemmEpilogue {
    /// Whether the epilogue reads or writes an `[m×n]` fp16 matrix beside `C` (the GELU
    /// ones), which needs `n` a multiple of 8.
    pub fn has_aux_matrix(self) -> bool {
        matches!(self, GemmEpilogue::Gelu { .. } | GemmEpilogue::GeluGrad { .. })
    }
}

/// A device that runs the kernels.
pub trait Device: Send + Sync {
    /// For messages: `emu`, `cuda:0 (NVIDIA H100 80GB HBM3, sm_90)`.
    fn name(&self) -> String;
    /// `bytes` of uninitialised device memory (at least 256-byte aligned).
    fn alloc(&self, bytes: usize) -> Result<DevicePtr, GpuError>;
    /// Releases memory from [`Device::alloc`]. Launches may still be using it: a device must
    /// only hand it out again to work ordered after them (one stream, or a cache that waits),
    /// which is why launchers drop their scratch buffers without synchronising.
    ///
    /// # Safety
    /// `ptr` came from `alloc(bytes)` on this device and is freed once.
    unsafe fn free(&self, ptr: DevicePtr, bytes: usize);
    /// Copies host bytes to the device.
    ///
    /// # Safety
    /// `dst` addresses at least `src.len()` bytes of this device's memory.
    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<(), GpuError>;
    /// Sets `bytes` bytes at `dst` to zero.
    ///
    /// # Safety
    /// `dst` addresses at least `bytes` bytes of this device's memory.
    unsafe fn memset_zero(&self, dst: DevicePtr, bytes: usize) -> Result<(), GpuError>;
    /// Copies `bytes` bytes between device addresses (ordered after earlier launches).
    ///
    /// # Safety
    /// Both address at least `bytes` bytes of this device's memory.
    unsafe fn copy_on_device(
        &self,
        dst: DevicePtr,
        src: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError>;
    /// Copies device bytes to the host (waits for earlier launches).
    ///
    /// # Safety
    /// `src` addresses at least `dst.len()` bytes of this device's memory.
    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), GpuError>;
    /// Launches `kernel` with cuLaunchKernel's argument convention.
    ///
    /// # Safety
    /// `args` must point to values whose types and number match the kernel's parameters, and
    /// every device pointer among them must cover what the kernel touches.
    unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError>;
    /// Waits for every launch so far and reports any asynchronous error.
    fn synchronize(&self) -> Result<(), GpuError>;
    /// (bytes in use, bytes in all) of device memory, where the device can tell. In use is
    /// the driver's view (total − free): the caching allocator keeps a step's peak, so after a
    /// step this is the peak plus the context's own overhead.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// The most dynamic shared memory `kernel` may be launched with, in bytes: 48 KiB unless
    /// the device opted the kernel in to more (Ampere and later: up to 99 KiB on sm_86/89,
    /// 163 KiB on sm_80, 227 KiB on sm_90).
    fn max_dynamic_shared(&self, _kernel: &str) -> usize {
        48 * 1024
    }
    /// Blocks of `kernel` one multiprocessor runs at once when launched with `threads` threads
    /// a block and `shared` bytes of dynamic shared memory (its registers, its shared memory
    /// and the device's block limit all counted: CUDA's occupancy calculator), where the
    /// device can tell; `None` elsewhere (the emulator).
    fn resident_blocks(&self, _kernel: &str, _threads: u32, _shared: usize) -> Option<usize> {
        None
    }
    /// Whether `kernel` can be launched here: every kernel on the emulator; on a GPU, not the
    /// Hopper ones ([`sources::hopper_only`]) on other architectures.
    fn has_kernel(&self, _kernel: &str) -> bool {
        true
    }
    /// One matrix product (see [`Gemm`]).
    ///
    /// # Safety
    /// Every pointer in `g` must cover the matrix the shape says it holds.
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError>;
    /// Whether a pointer-array batch like `g` ([`GemmBatch::pointer_arrays`]; its addresses
    /// unused) has a kernel here, so [`Device::gemm`] takes it. Decided at the first such
    /// shape and kept, so asking again costs nothing. Not on devices without such batches
    /// (cuBLASLt before CUDA 12.9, or with no kernel for the shape).
    fn has_pointer_array_gemm(&self, _g: &Gemm) -> Result<bool, GpuError> {
        Ok(false)
    }
    /// At least `count` 4-byte counters, zero, that this device keeps: for kernels that put
    /// every counter they use back to zero before they end (`bias_backward_tile_f16`), so no
    /// call zeroes them. The same memory at every call (made anew, zeroed, where `count` is
    /// more than before): on a GPU every launch is ordered on one stream, and the emulator
    /// runs one launch at a time, so no two launches use them at once.
    fn zeroed_counters(&self, count: usize) -> Result<DevicePtr, GpuError>;
    /// Pointer-array batches this device has run (queued) so far, where it counts them: how
    /// tests and `scripts/gpu-check` see whether the batches, not their fallback, ran.
    fn pointer_array_batches(&self) -> Option<usize> {
        None
    }
    /// For `CHINGU_PROFILE=events` (see [`profile`]): marks, in the device's queue, the start
    /// of the work queued next. `Ok(None)` where the device cannot time its own work (the
    /// emulator, whose launches are synchronous: the host's clock times them).
    fn span_start(&self) -> Result<Option<SpanStart>, GpuError> {
        Ok(None)
    }
    /// Ends the span `start` began, under `name`. Its time is read, without waiting, at the
    /// device's next [`Device::synchronize`], which adds every ended span to the profile.
    fn span_end(&self, _start: SpanStart, _name: String) -> Result<(), GpuError> {
        Ok(())
    }
}

/// The start of a span of device work being timed (a device's own handle, e.g. a CUDA event).
#[derive(Debug)]
pub struct SpanStart(pub u64);

/// Element types a device buffer can hold.
///
/// # Safety
/// Implementors must be plain old data (no padding, every bit pattern valid): buffers are
/// copied to and from the device as bytes.
pub unsafe trait Element: Copy + Default + Send + Sync + 'static {
    /// For messages.
    const NAME: &'static str;
}
// SAFETY: plain old data.
unsafe impl Element for f32 {
    const NAME: &'static str = "f32";
}
// SAFETY: plain old data.
unsafe impl Element for f64 {
    const NAME: &'static str = "f64";
}
// SAFETY: plain old data.
unsafe impl Element for half::f16 {
    const NAME: &'static str = "f16";
}
// SAFETY: plain old data.
unsafe impl Element for u64 {
    const NAME: &'static str = "u64";
}
// SAFETY: plain old data.
unsafe impl Element for i32 {
    const NAME: &'static str = "i32";
}

/// `len` elements of `T` on a device; freed on drop.
pub struct DeviceBuffer<T: Element> {
    device: Arc<dyn Device>,
    ptr: DevicePtr,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    /// Uninitialised space for `len` elements.
    pub fn uninit(device: &Arc<dyn Device>, len: usize) -> Result<Self, GpuError> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| GpuError::Shape {
            op: "alloc",
            message: format!("{len} {} elements overflow the address space", T::NAME),
        })?;
        let ptr = device.alloc(bytes.max(1))?;
        Ok(Self { device: device.clone(), ptr, len, _elem: PhantomData })
    }

    /// A copy of host values.
    pub fn from_host(device: &Arc<dyn Device>, data: &[T]) -> Result<Self, GpuError> {
        let buf = Self::uninit(device, data.len())?;
        // SAFETY: plain-old-data elements viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        // SAFETY: the buffer holds exactly `bytes.len()` bytes.
        unsafe { device.upload(buf.ptr, bytes) }?;
        Ok(buf)
    }

    /// The values, copied to the host.
    pub fn to_host(&self) -> Result<Vec<T>, GpuError> {
        let mut out = vec![T::default(); self.len];
        // SAFETY: plain-old-data elements viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), self.len * size_of::<T>())
        };
        // SAFETY: the buffer holds exactly `bytes.len()` bytes.
        unsafe { self.device.download(self.ptr, bytes) }?;
        Ok(out)
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, for launch arguments.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
}

impl<T: Element> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated with this size by `uninit`, freed only here.
        unsafe { self.device.free(self.ptr, (self.len * size_of::<T>()).max(1)) };
    }
}

/// The devices GPU test bodies run on: the emulated device, every launch run in order and
/// under a shuffled schedule and compared ([`emu::Schedule::TESTS`]; `CHINGU_EMU_SCHEDULE`
/// overrides); with `CHINGU_GPU_TESTS=1` also CUDA device 0, with `CHINGU_GPU_TESTS=only` that
/// device alone (for a GPU machine, where the emulated runs add nothing CI has not shown).
/// When asked for, a GPU that cannot be opened is a panic, never a skip. Devices are opened
/// once per process.
#[cfg(feature = "emu")]
pub fn test_devices() -> Vec<Gpu> {
    use std::sync::OnceLock;
    static EMU: OnceLock<Gpu> = OnceLock::new();
    let emu = || {
        EMU.get_or_init(|| match emu::Schedule::from_env(emu::Schedule::TESTS) {
            Ok(schedule) => Arc::new(emu::EmuDevice::with_schedule(schedule)),
            Err(e) => panic!("{e}"),
        })
        .clone()
    };
    let wanted = std::env::var("CHINGU_GPU_TESTS").unwrap_or_default();
    let gpu = || -> Gpu {
        #[cfg(feature = "cuda")]
        {
            static GPU: OnceLock<Gpu> = OnceLock::new();
            GPU.get_or_init(|| match cuda::CudaDevice::new(0) {
                Ok(dev) => Arc::new(dev),
                Err(e) => panic!("CHINGU_GPU_TESTS={wanted} but the GPU could not be opened: {e}"),
            })
            .clone()
        }
        #[cfg(not(feature = "cuda"))]
        panic!("CHINGU_GPU_TESTS={wanted} needs chingu-kernels built with feature \"cuda\"")
    };
    match wanted.as_str() {
        "1" => vec![emu(), gpu()],
        "only" => vec![gpu()],
        _ => vec![emu()],
    }
}
