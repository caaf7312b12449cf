//! The emulated device: the same kernel sources compiled by g++ against our CUDA emulation
//! layer (`kernels/cuda/emu/`, built by `kernels/build.rs`) and run on the CPU. Device memory
//! is host memory; launches are synchronous and serialised by the emulator.
//!
//! A launch runs in order or under a shuffled thread and block schedule ([`Schedule`]); the
//! GPU tests run every launch both ways over the same memory and fail on any byte that
//! differs, which is how a data race (a missing barrier, blocks sharing an output) shows
//! up on a CPU whose fibers never truly run at once. Every allocation sits between guard
//! bytes; a launch that changes them wrote out of bounds and fails.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use half::f16;

use super::{Device, DevicePtr, Gemm, GemmBatch, GemmEpilogue, GpuError};

extern "C" {
    fn chingu_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
        schedule_seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn chingu_emu_pointer_args(
        name: *const c_char,
        args: *mut *mut c_void,
        out: *mut u64,
        cap: usize,
    ) -> i64;
    fn chingu_emu_kernel_name(index: usize) -> *const c_char;
}

/// Alignment of emulated allocations (cudaMalloc gives at least 256).
const ALIGN: usize = 256;

/// Bytes of guard before and after every emulated allocation (a multiple of [`ALIGN`], so
/// the allocation keeps its alignment), filled with [`GUARD_BYTE`]; a launch that changes
/// one wrote outside its buffer, which on a GPU corrupts a neighbour or faults.
const GUARD: usize = 256;
/// The guards' fill.
const GUARD_BYTE: u8 = 0xA5;

/// The layout of an allocation of `bytes` with its guards.
fn guarded_layout(bytes: usize) -> Option<Layout> {
    let size = bytes.max(1).checked_add(2 * GUARD)?;
    Layout::from_size_align(size, ALIGN).ok()
}

/// Most blocks a shuffled schedule takes (`cuda_emu.h` holds their permutation in memory).
const MAX_SHUFFLED_BLOCKS: u64 = 1 << 26;

/// The environment variable that picks the emulated device's [`Schedule`].
pub const SCHEDULE_VAR: &str = "CHINGU_EMU_SCHEDULE";

/// The order in which the emulator runs a launch's blocks and threads (`cuda_emu.h`,
/// SCHEDULES). A correct kernel gives the same bits under every schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks in x-fastest order, a block's threads first come, first served: the fastest.
    InOrder,
    /// Every launch under a shuffled schedule drawn from this seed and the launch's kernel
    /// and shape (so a failure reproduces).
    Shuffled {
        /// Mixed with each launch's kernel and shape into that launch's seed.
        seed: u64,
    },
    /// Every launch twice, in order and then shuffled (as `Shuffled`) from the same device
    /// memory; a byte of device memory that differs between the two runs is an error naming
    /// the kernel, the allocation (and the pointer argument into it) and the offset. Every
    /// live allocation is compared, so memory reached through a table of pointers counts;
    /// the device's other operations wait while a compared launch runs (not the emulated
    /// collective, which reads and writes device memory directly: keep compared devices out
    /// of multi-threaded collective tests). One shuffled schedule a launch, so a race that
    /// few schedules expose may pass.
    Compared {
        /// As for `Shuffled`.
        seed: u64,
    },
}

impl Schedule {
    /// The schedule the GPU tests run under unless [`SCHEDULE_VAR`] says otherwise.
    pub const TESTS: Schedule = Schedule::Compared { seed: 0x5eed };

    /// Parses `in-order`, `shuffled[:SEED]` or `compared[:SEED]` (SEED decimal or 0x-hex).
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let (kind, seed) = match text.split_once(':') {
            Some((kind, seed)) => {
                let seed = seed.trim();
                let parsed = match seed.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => seed.parse(),
                };
                (kind.trim(), Some(parsed.map_err(|_| format!("{seed:?} is not a seed (a u64)"))?))
            }
            None => (text.trim(), None),
        };
        let seed = seed.unwrap_or(0x5eed);
        match kind {
            "in-order" if text.trim() == "in-order" => Ok(Schedule::InOrder),
            "shuffled" => Ok(Schedule::Shuffled { seed }),
            "compared" => Ok(Schedule::Compared { seed }),
            _ => Err(format!(
                "{text:?} is not a schedule: expected in-order, shuffled[:SEED] or compared[:SEED]"
            )),
        }
    }

    /// [`SCHEDULE_VAR`]'s schedule, or `default` when it is unset.
    pub fn from_env(default: Schedule) -> Result<Schedule, GpuError> {
        match std::env::var(SCHEDULE_VAR) {
            Ok(text) => Schedule::parse(&text)
                .map_err(|message| GpuError::Setting(format!("{SCHEDULE_VAR}: {message}"))),
            Err(_) => Ok(default),
        }
    }

    /// The shuffled schedule's seed for one launch: the schedule's seed mixed with the
    /// kernel and its shape, never 0 (0 means in order to the emulator).
    fn launch_seed(seed: u64, kernel: &str, grid: [u32; 3], block: [u32; 3], shared: u32) -> u64 {
        // FNV-1a over everything that identifies the launch, then one SplitMix64 step.
        let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        let words = grid.iter().chain(&block).chain(std::iter::once(&shared));
        for byte in kernel.bytes().chain(words.flat_map(|w| w.to_le_bytes())) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        crate::rng::SplitMix64(hash).next_u64().max(1)
    }
}

/// The CPU-emulated CUDA device.
#[derive(Debug)]
pub struct EmuDevice {
    schedule: Schedule,
    /// Live allocations (address → bytes): the memory a compared launch checks.
    live: Mutex<BTreeMap<usize, usize>>,
    /// Held exclusively by a compared launch, shared by every other operation that touches
    /// device memory, so no other thread changes or frees memory between its two runs.
    gate: RwLock<()>,
    /// Bytes the device holds at most (live allocations, guards not counted); unlimited when
    /// `None`. How the tests run out of memory.
    capacity: Option<usize>,
    /// Bytes live now, and the most live at once so far.
    used: AtomicUsize,
    peak: AtomicUsize,
    /// Whether products take [`GemmEpilogue::BiasGrad`]; off, they fail as a cuBLASLt
    /// without such a kernel would.
    bias_grad_epilogue: bool,
    /// Whether products take pointer-array batches ([`GemmBatch::pointer_arrays`]); off, the
    /// device says it has no kernel for them, as a cuBLASLt before CUDA 12.9 would.
    pointer_arrays: bool,
    /// Pointer-array batches run so far (each a whole batch): how tests see that the batch,
    /// not its fallback, ran.
    pointer_array_batches: AtomicUsize,
    /// Launches so far by kernel name ([`EmuDevice::launches_of`]).
    launches: Mutex<std::collections::HashMap<String, usize>>,
    /// [`Device::zeroed_counters`].
    counters: super::KeptCounters,
}

/// The environment variable that puts `--device cuda` training and GPU workers on this
/// emulated device (builds with feature "emu"; slow, for checking the GPU path without a GPU).
pub const EMULATED_GPU_VAR: &str = "CHINGU_EMULATED_GPU";

/// True when [`EMULATED_GPU_VAR`] is on (`1`; read once).
pub fn emulation_requested() -> bool {
    static REQUESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REQUESTED.get_or_init(|| crate::settings::switch(EMULATED_GPU_VAR) == Some(true))
}

/// The environment variable that limits the emulated device's memory, in MiB
/// ([`EmuDevice::from_env`]).
pub const MEMORY_VAR: &str = "CHINGU_EMU_MEMORY_MIB";

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuDevice {
    /// The emulated device, launching in order.
    pub fn new() -> Self {
        Self::with_schedule(Schedule::InOrder)
    }

    /// The emulated device with the given launch schedule.
    pub fn with_schedule(schedule: Schedule) -> Self {
        Self {
            schedule,
            live: Mutex::new(BTreeMap::new()),
            gate: RwLock::new(()),
            capacity: None,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            bias_grad_epilogue: true,
            pointer_arrays: true,
            pointer_array_batches: AtomicUsize::new(0),
            launches: Mutex::new(std::collections::HashMap::new()),
            counters: Default::default(),
        }
    }

    /// How many times `kernel` has been launched on this device: how tests see which of two
    /// paths with the same results ran.
    pub fn launches_of(&self, kernel: &str) -> usize {
        let launches = self.launches.lock().unwrap_or_else(|e| e.into_inner());
        launches.get(kernel).copied().unwrap_or(0)
    }

    /// This device without pointer-array batches ([`Device::has_pointer_array_gemm`] false),
    /// as a cuBLASLt before CUDA 12.9: how the tests reach `gemm::run_group_as`'s fallback.
    pub fn without_pointer_arrays(mut self) -> Self {
        self.pointer_arrays = false;
        self
    }

    /// This device refusing [`GemmEpilogue::BiasGrad`] with [`GpuError::Unsupported`] (and
    /// writing nothing), as a cuBLASLt with no kernel for it: how the tests reach the
    /// backend's fallback.
    pub fn without_bias_grad_epilogue(mut self) -> Self {
        self.bias_grad_epilogue = false;
        self
    }

    /// This device holding at most `bytes` of allocations: one that would go past fails with
    /// [`GpuError::OutOfMemory`], as a full GPU's does.
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.capacity = Some(bytes);
        self
    }

    /// The most bytes that were allocated at once (guards not counted): what a run needs
    /// under [`EmuDevice::with_memory_limit`].
    pub fn peak_allocated(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// The emulated device with [`SCHEDULE_VAR`]'s schedule (in order when it is unset) and
    /// [`MEMORY_VAR`]'s memory limit (none when it is unset).
    pub fn from_env() -> Result<Self, GpuError> {
        let dev = Self::with_schedule(Schedule::from_env(Schedule::InOrder)?);
        match std::env::var(MEMORY_VAR) {
            Ok(text) => {
                let mib: usize = text.trim().parse().map_err(|_| {
                    GpuError::Setting(format!(
                        "{MEMORY_VAR}: {text:?} is not a whole number of MiB"
                    ))
                })?;
                let bytes = mib.checked_mul(1 << 20).ok_or_else(|| {
                    GpuError::Setting(format!(
                        "{MEMORY_VAR}: {mib} MiB is more than this machine can count"
                    ))
                })?;
                Ok(dev.with_memory_limit(bytes))
            }
            Err(_) => Ok(dev),
        }
    }

    /// The schedule this device launches under.
    pub fn schedule(&self) -> Schedule {
        self.schedule
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

    /// One run of a launch under `seed` (0: in order).
    ///
    /// # Safety
    /// As [`Device::launch`].
    unsafe fn run(
        &self,
        shape: &LaunchShape<'_>,
        args: &mut [*mut c_void],
        seed: u64,
    ) -> Result<(), String> {
        let LaunchShape { kernel, grid, block, shared_bytes } = *shape;
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: the caller guarantees the arguments match the kernel.
        let rc = unsafe {
            chingu_emu_launch(
                kernel.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                shared_bytes,
                args.as_mut_ptr(),
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the emulator wrote a NUL-terminated message.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// Shared access to device memory for an operation other than a compared launch: held
    /// only when this device compares launches (see `gate`).
    fn shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        matches!(self.schedule, Schedule::Compared { .. })
            .then(|| self.gate.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every live allocation as (address, bytes).
    fn live_allocations(&self) -> Vec<(usize, usize)> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.iter().map(|(&start, &bytes)| (start, bytes)).collect()
    }

    /// The values of `kernel`'s pointer arguments, in parameter order.
    ///
    /// # Safety
    /// `args` must match the kernel (as for [`Device::launch`]).
    unsafe fn pointer_arguments(kernel: &CStr, args: &mut [*mut c_void]) -> Vec<usize> {
        let mut pointers = [0u64; 32];
        // SAFETY: the caller guarantees the arguments match the kernel; `pointers` holds 32.
        let count = unsafe {
            chingu_emu_pointer_args(kernel.as_ptr(), args.as_mut_ptr(), pointers.as_mut_ptr(), 32)
        };
        // A kernel with more than 32 pointer parameters has its first 32 checked.
        let count = usize::try_from(count).unwrap_or(0).min(pointers.len());
        pointers[..count].iter().map(|&p| p as usize).collect()
    }

    /// The number (among the pointer parameters) of the first of `kernel`'s pointer
    /// arguments that points into the allocation at `start` of `bytes` or its guards.
    ///
    /// # Safety
    /// `args` must match the kernel (as for [`Device::launch`]).
    unsafe fn argument_into(
        kernel: &CStr,
        args: &mut [*mut c_void],
        start: usize,
        bytes: usize,
    ) -> Option<usize> {
        // SAFETY: as the caller guarantees.
        let pointers = unsafe { Self::pointer_arguments(kernel, args) };
        // A pointer into one of its guards counts (its writes land there).
        pointers.iter().position(|&p| (start - GUARD..start + bytes.max(1) + GUARD).contains(&p))
    }

    /// The live allocations `kernel`'s pointer arguments point into, each once.
    ///
    /// # Safety
    /// `args` must match the kernel (as for [`Device::launch`]).
    unsafe fn reached_allocations(
        &self,
        kernel: &CStr,
        args: &mut [*mut c_void],
    ) -> Vec<(usize, usize)> {
        // SAFETY: as the caller guarantees.
        let pointers = unsafe { Self::pointer_arguments(kernel, args) };
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut reached: Vec<(usize, usize)> = Vec::new();
        for address in pointers {
            // A pointer into a guard reaches that allocation too (its writes land in the guard).
            let Some((&start, &bytes)) = live.range(..=address + GUARD).next_back() else {
                continue;
            };
            let with_guards = start - GUARD..start + bytes.max(1) + GUARD;
            if with_guards.contains(&address) && !reached.iter().any(|r| r.0 == start) {
                reached.push((start, bytes));
            }
        }
        reached
    }

    /// An error for the first allocation among `regions` whose guard a launch changed; the
    /// guard is refilled, so later launches are not blamed for it.
    ///
    /// # Safety
    /// The regions must be live allocations of this device; `args` must match the kernel.
    unsafe fn check_guards(
        kernel: &CStr,
        args: &mut [*mut c_void],
        regions: &[(usize, usize)],
    ) -> Result<(), String> {
        for &(start, bytes) in regions {
            // SAFETY: every allocation has its guards on either side.
            let (before, after) = unsafe {
                (
                    std::slice::from_raw_parts_mut((start - GUARD) as *mut u8, GUARD),
                    std::slice::from_raw_parts_mut((start + bytes.max(1)) as *mut u8, GUARD),
                )
            };
            let first_before = before.iter().position(|&b| b != GUARD_BYTE);
            let last_after = after.iter().rposition(|&b| b != GUARD_BYTE);
            if first_before.is_none() && last_after.is_none() {
                continue;
            }
            let mut outside = Vec::new();
            if let Some(i) = first_before {
                outside
                    .push(format!("guard bytes changed from {} bytes before its start", GUARD - i));
            }
            if let Some(i) = last_after {
                outside.push(format!("guard bytes changed up to {} bytes past its end", i + 1));
            }
            before.fill(GUARD_BYTE);
            after.fill(GUARD_BYTE);
            // SAFETY: as the caller guarantees.
            let reached = match unsafe { Self::argument_into(kernel, args, start, bytes) } {
                Some(n) => format!("pointer argument #{n} points into it"),
                None => "no pointer argument points into it".to_string(),
            };
            return Err(format!(
                "it wrote outside the allocation of {bytes} bytes at {start:#x} ({reached}): {} \
                 (a GPU would corrupt a neighbouring buffer or fault)",
                outside.join(" and ")
            ));
        }
        Ok(())
    }

    /// A compared launch (see [`Schedule::Compared`]).
    ///
    /// # Safety
    /// As [`Device::launch`].
    unsafe fn run_compared(
        &self,
        shape: &LaunchShape<'_>,
        args: &mut [*mut c_void],
        seed: u64,
    ) -> Result<(), String> {
        let kernel = shape.kernel;
        let blocks: u64 = shape.grid.iter().map(|&g| u64::from(g)).product();
        if blocks > MAX_SHUFFLED_BLOCKS {
            return Err(format!(
                "{blocks} blocks: a compared launch takes at most {MAX_SHUFFLED_BLOCKS} (use \
                 CHINGU_EMU_SCHEDULE=in-order for this one)"
            ));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let regions = self.live_allocations();
        // Memory the launch can reach but this device cannot restore would take the kernel
        // twice (an in-place update applied two times): refuse it. Null and one-past-the-end
        // pointers are fine.
        // SAFETY: the caller guarantees the arguments.
        let pointers = unsafe { Self::pointer_arguments(kernel, args) };
        for (number, &pointer) in pointers.iter().enumerate() {
            // (A pointer into a guard counts: the guard check reports what it wrote.)
            let tracked = regions
                .iter()
                .any(|&(start, bytes)| (start - GUARD..=start + bytes + GUARD).contains(&pointer));
            if pointer != 0 && !tracked {
                return Err(format!(
                    "pointer argument #{number} ({pointer:#x}) is not in this emulated device's \
                     memory, which a compared launch must restore between its two runs"
                ));
            }
        }
        // SAFETY: the regions are live and stay so (every free waits for the gate); the
        // caller guarantees the arguments.
        unsafe {
            // A guard changed before this launch (by a product, a copy, or an earlier launch
            // through a pointer table, which no check saw) is not this kernel's doing.
            Self::check_guards(kernel, args, &regions)
                .map_err(|e| format!("before this launch ran: {e}"))?;
            let before = snapshot(&regions);
            self.run(shape, args, 0)?;
            Self::check_guards(kernel, args, &regions)?;
            let in_order = snapshot(&regions);
            restore(&regions, &before);
            drop(before);
            self.run(shape, args, seed).map_err(|e| {
                format!(
                    "fails only under a shuffled schedule (seed {seed:#x}; in order it ran), so \
                     it depends on the order of threads or blocks: {e}"
                )
            })?;
            Self::check_guards(kernel, args, &regions)?;
            for (&(start, bytes), in_order) in regions.iter().zip(&in_order) {
                let shuffled = std::slice::from_raw_parts(start as *const u8, bytes);
                let Some(offset) = in_order.iter().zip(shuffled).position(|(x, y)| x != y) else {
                    continue;
                };
                let reached = match Self::argument_into(kernel, args, start, bytes) {
                    Some(n) => format!("pointer argument #{n} points into it"),
                    None => "no pointer argument points into it".to_string(),
                };
                return Err(format!(
                    "its result depends on the order of threads or blocks (a data race: a \
                     read of another thread's write with no barrier between them, or blocks \
                     that share an output): the allocation of {bytes} bytes at {start:#x} \
                     ({reached}) differs first at byte {offset}: {:#04x} in order, {:#04x} \
                     under the shuffled schedule (seed {seed:#x})",
                    in_order[offset], shuffled[offset]
                ));
            }
        }
        Ok(())
    }
}

/// What identifies one launch to the emulator, besides its arguments.
struct LaunchShape<'a> {
    kernel: &'a CStr,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

/// A copy of each allocation's bytes.
///
/// # Safety
/// Every (address, bytes) must be a live allocation.
unsafe fn snapshot(regions: &[(usize, usize)]) -> Vec<Vec<u8>> {
    regions
        .iter()
        // SAFETY: the caller guarantees each region is live.
        .map(|&(start, bytes)| {
            unsafe { std::slice::from_raw_parts(start as *const u8, bytes) }.to_vec()
        })
        .collect()
}

/// Writes each snapshot back over its allocation.
///
/// # Safety
/// As [`snapshot`], with `copies` taken from the same regions.
unsafe fn restore(regions: &[(usize, usize)], copies: &[Vec<u8>]) {
    for (&(start, _), copy) in regions.iter().zip(copies) {
        // SAFETY: the caller guarantees the region is live and as large as its copy.
        unsafe { std::ptr::copy_nonoverlapping(copy.as_ptr(), start as *mut u8, copy.len()) };
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

    /// With a memory limit: (the peak allocation, the limit) — the peak, because a GPU's
    /// caching allocator keeps a step's peak in use and this device frees at once.
    fn memory(&self) -> Option<(usize, usize)> {
        self.capacity.map(|capacity| (self.peak_allocated(), capacity))
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr, GpuError> {
        let _shared = self.shared();
        let too_big = || GpuError::Driver {
            call: "emu alloc".into(),
            message: format!("{bytes} bytes is more than an allocation can hold"),
        };
        let layout = guarded_layout(bytes).ok_or_else(too_big)?;
        // Reserve by compare-and-swap: threads allocating at once neither both pass the limit
        // nor see each other's refused requests.
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.saturating_add(bytes);
            if let Some(capacity) = self.capacity.filter(|&c| after > c) {
                return Err(GpuError::OutOfMemory { bytes, in_use: Some((used, capacity)) });
            }
            match self.used.compare_exchange_weak(used, after, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(after, Ordering::Relaxed);
                    break;
                }
                Err(now) => used = now,
            }
        }
        // SAFETY: non-zero size.
        let base = unsafe { alloc(layout) };
        if base.is_null() {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(GpuError::OutOfMemory { bytes, in_use: None });
        }
        // Poison fresh memory (0xFF bytes are NaN in f16/f32/f64) so a kernel that leaves an
        // output unwritten fails its test; the guards on either side get their own pattern.
        // SAFETY: `base` holds the guards and `bytes.max(1)` bytes between them.
        let ptr = unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            let ptr = base.add(GUARD);
            std::ptr::write_bytes(ptr, 0xFF, bytes.max(1));
            std::ptr::write_bytes(ptr.add(bytes.max(1)), GUARD_BYTE, GUARD);
            ptr
        };
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(ptr as usize, bytes);
        Ok(ptr as DevicePtr)
    }

    unsafe fn free(&self, ptr: DevicePtr, bytes: usize) {
        let _shared = self.shared();
        let recorded = self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&(ptr as usize));
        // The size `alloc` recorded decides the layout; the caller's must agree.
        let bytes = match recorded {
            Some(recorded) => {
                debug_assert_eq!(recorded, bytes, "freed with another size than allocated");
                recorded
            }
            None => panic!("free of {ptr:#x}, which this emulated device did not allocate"),
        };
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        let layout = guarded_layout(bytes).expect("the layout alloc made");
        // SAFETY: allocated by `alloc` with this layout, `GUARD` bytes after its start.
        unsafe { dealloc((ptr as *mut u8).sub(GUARD), layout) };
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<(), GpuError> {
        let _shared = self.shared();
        // SAFETY: `dst` is an allocation at least as large (DeviceBuffer checks).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn memset_zero(&self, dst: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        let _shared = self.shared();
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
        let _shared = self.shared();
        // SAFETY: as above; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), GpuError> {
        let _shared = self.shared();
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
        *self
            .launches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kernel.into())
            .or_default() += 1;
        let (grid, block) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
        let failed = |message: String| GpuError::Emulation { kernel: kernel.to_string(), message };
        let shuffled = |seed| Schedule::launch_seed(seed, kernel, grid, block, shared_bytes);
        let shape = LaunchShape { kernel: &name, grid, block, shared_bytes };
        match self.schedule {
            // SAFETY (all three): the caller guarantees the arguments match the kernel.
            Schedule::InOrder | Schedule::Shuffled { .. } => {
                let seed = match self.schedule {
                    Schedule::Shuffled { seed } => shuffled(seed),
                    _ => 0,
                };
                // The caller keeps the buffers it passes alive until the launch returns.
                let regions = unsafe { self.reached_allocations(&name, args) };
                unsafe { self.run(&shape, args, seed) }.map_err(failed)?;
                unsafe { Self::check_guards(&name, args, &regions) }.map_err(failed)
            }
            Schedule::Compared { seed } => {
                let seed = shuffled(seed);
                unsafe { self.run_compared(&shape, args, seed) }.map_err(failed)
            }
        }
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        let _shared = self.shared();
        let batch = g.batch;
        if (batch.count > 1 || batch.pointer_arrays.is_some()) && !g.is_plain() {
            return Err(GpuError::Shape {
                op: "gemm",
                message: "a batch of products takes no bias and no epilogue".into(),
            });
        }
        if matches!(g.epilogue, GemmEpilogue::BiasGrad { .. }) && !self.bias_grad_epilogue {
            return Err(GpuError::Unsupported(
                "emulated device: no product with a fused bias gradient (as told)".into(),
            ));
        }
        if let Some(align) = batch.pointer_arrays {
            // SAFETY: the caller's contract (the arrays hold `count` addresses each, and
            // device memory is host memory here).
            return unsafe { self.pointer_array_gemm(g, align) };
        }
        for i in 0..batch.count.max(1) {
            // SAFETY: the caller guarantees every product's extents.
            unsafe { single_gemm(&g.nth(i)) }?;
        }
        Ok(())
    }

    fn has_pointer_array_gemm(&self, g: &Gemm) -> Result<bool, GpuError> {
        Ok(self.pointer_arrays && g.is_plain())
    }

    fn pointer_array_batches(&self) -> Option<usize> {
        Some(self.pointer_array_batches.load(Ordering::SeqCst))
    }

    fn zeroed_counters(&self, count: usize) -> Result<DevicePtr, GpuError> {
        self.counters.at_least(self, count)
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        // Its host memory, which no buffer holds (a buffer would hold the device).
        let mut counters = std::mem::take(&mut self.counters);
        counters.release(self);
    }
}

impl EmuDevice {
    /// A pointer-array batch ([`GemmBatch::pointer_arrays`]): each product from its arrays'
    /// addresses, every one checked to have the alignment the batch claims (cuBLASLt chooses
    /// its kernel by that claim).
    ///
    /// # Safety
    /// As [`Device::gemm`].
    unsafe fn pointer_array_gemm(&self, g: &Gemm, align: u32) -> Result<(), GpuError> {
        if !self.pointer_arrays {
            return Err(GpuError::Unsupported(
                "emulated device: no pointer-array batches (as told)".into(),
            ));
        }
        let count = g.batch.count;
        // SAFETY: the caller's contract: each array holds `count` addresses.
        let read = |array: DevicePtr| unsafe {
            std::slice::from_raw_parts(array as *const u64, count).to_vec()
        };
        let (a, b, c) = (read(g.a), read(g.b), read(g.c));
        for i in 0..count {
            if let Some(&bad) = [a[i], b[i], c[i]].iter().find(|&&p| p % u64::from(align) != 0) {
                return Err(GpuError::Shape {
                    op: "gemm",
                    message: format!(
                        "product {i} of a pointer-array batch: address {bad:#x} is not {align}-byte aligned as claimed"
                    ),
                });
            }
            let one = Gemm { a: a[i], b: b[i], c: c[i], batch: GemmBatch::ONE, ..*g };
            // SAFETY: the caller guarantees every product's extents.
            unsafe { single_gemm(&one) }?;
        }
        self.pointer_array_batches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One product of [`EmuDevice`]'s `gemm` (f32 sums on the CPU).
///
/// # Safety
/// As [`Device::gemm`].
unsafe fn single_gemm(g: &Gemm) -> Result<(), GpuError> {
    let Gemm { m, n, k, .. } = *g;
    g.check_strides()?;
    let ([lda, ldb, ldc], [span_a, span_b, span_c]) = (g.row_strides(), g.spans());
    // SAFETY: the caller guarantees the extents (device memory is host memory here).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(g.a as *const f16, span_a),
            std::slice::from_raw_parts(g.b as *const f16, span_b),
        )
    };
    let a: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
    let b: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    // Row/column strides of op(A) [m×k] and op(B) [k×n] in their stored layouts.
    let (rsa, csa) = if g.trans_a { (1, lda) } else { (lda, 1) };
    let (rsb, csb) = if g.trans_b { (1, ldb) } else { (ldb, 1) };
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
        GemmEpilogue::BiasGrad { grad } => {
            // Σ_k op(A)[i][k], f32 sums in k order.
            let sums: Vec<f32> =
                (0..m).map(|i| (0..k).map(|kk| a[i * rsa + kk * csa]).sum()).collect();
            // SAFETY: `grad` holds m floats (the caller's contract).
            unsafe { std::slice::from_raw_parts_mut(grad as *mut f32, m) }.copy_from_slice(&sums);
        }
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
    // C's rows, `ldc` apart; what lies between them is left alone.
    let rows = c.chunks(n.max(1)).enumerate();
    // SAFETY: C spans `span_c` elements of its type (the caller's contract).
    unsafe {
        if g.c_f32 {
            let out = std::slice::from_raw_parts_mut(g.c as *mut f32, span_c);
            for (i, row) in rows {
                for (o, v) in out[i * ldc..].iter_mut().zip(row) {
                    *o = if g.beta == 0.0 { *v } else { *o * g.beta + *v };
                }
            }
        } else {
            let out = std::slice::from_raw_parts_mut(g.c as *mut f16, span_c);
            for (i, row) in rows {
                for (o, v) in out[i * ldc..].iter_mut().zip(row) {
                    let prior = if g.beta == 0.0 { 0.0 } else { o.to_f32() * g.beta };
                    *o = f16::from_f32(prior + *v);
                }
            }
        }
    }
    Ok(())
}
