//! NCCL through cudarc (feature "cuda", loaded at run time): the [`DeviceCollective`] of
//! several GPU ranks. Rank 0 makes the unique id ([`unique_id`]) and the coordinator's
//! rendezvous carries it to every rank; each rank then joins the communicator on its own
//! device ([`NcclCollective::new`]).
//!
//! Sums run on a stream of their own, created non-blocking so the legacy default stream that
//! every kernel runs on does not serialise with it: `queue_all_reduce` records an event on the
//! compute stream, makes the communication stream wait for it and queues the all-reduces as
//! one NCCL group; `join` makes the compute stream wait for the communication stream. Backward
//! keeps computing while earlier layers' gradients travel.
//!
//! NCCL's wheels ship `libnccl.so.2`, a name cudarc does not look for: `scripts/nccl-link`
//! makes the `libnccl.so` link. Reproducibility: NCCL picks its algorithm from the sizes and
//! topology, so a job on the same machines, NCCL version and world size sums in the same order
//! run after run; `NCCL_ALGO=Ring NCCL_PROTO=Simple` pins the choice across machines.

use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};
use cudarc::nccl::sys as nccl;

use super::collective::{AbortHandle, DeviceCollective};
use super::cuda::CudaDevice;
use super::{DevicePtr, GpuError};

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// What to do when NCCL is missing.
const HOW_TO_GET_NCCL: &str = "NCCL (libnccl.so) not found: several GPU workers need it. \
    Install it (`pip install nvidia-nccl-cu13`, or -cu12 with a CUDA 12 driver), run \
    `scripts/nccl-link` and put the directory it prints on LD_LIBRARY_PATH; or set \
    workers.collective = \"ring\" to all-reduce through host memory instead";

/// True when the NCCL library can be loaded.
pub fn present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { nccl::is_culib_present() }
}

/// NCCL's version (`2.28.3` as 22803), when the library loads.
pub fn version() -> Option<i32> {
    if !present() {
        return None;
    }
    let mut v = 0;
    // SAFETY: writes one int.
    (unsafe { nccl::ncclGetVersion(&mut v) } == nccl::ncclResult_t::ncclSuccess).then_some(v)
}

fn check(
    call: &str,
    r: nccl::ncclResult_t,
    comm: Option<nccl::ncclComm_t>,
) -> Result<(), GpuError> {
    if r == nccl::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: NCCL returns static strings (or null).
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let what = text(unsafe { nccl::ncclGetErrorString(r) });
    let last = comm.map(|c| text(unsafe { nccl::ncclGetLastError(c) })).unwrap_or_default();
    Err(GpuError::Collective(format!(
        "NCCL {call} failed: {what} ({r:?}){}",
        if last.is_empty() { String::new() } else { format!(": {last}") }
    )))
}

/// A fresh unique id for a communicator, made by rank 0 before the rendezvous (it starts
/// NCCL's bootstrap listener in this process; no GPU needed).
pub fn unique_id() -> Result<Vec<u8>, GpuError> {
    if !present() {
        return Err(GpuError::Missing(HOW_TO_GET_NCCL.into()));
    }
    let mut id = nccl::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: writes the id.
    check("ncclGetUniqueId", unsafe { nccl::ncclGetUniqueId(&mut id) }, None)?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The communicator, shared with abort handles. NCCL communicators are not thread-safe: every
/// call holds the lock, so an abort from another thread never frees the communicator under a
/// call in progress.
struct Comm {
    /// Null once destroyed or aborted.
    handle: Mutex<nccl::ncclComm_t>,
}

/// How long an abort waits for a call in progress on another thread before giving up (the
/// process is exiting anyway; a call blocked on a dead peer would never let go).
const ABORT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

// SAFETY: NCCL communicators may be used from any thread; the mutex serialises abort/destroy.
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}

impl Comm {
    /// Runs `f` with the live communicator, holding the lock throughout.
    fn with<R>(
        &self,
        f: impl FnOnce(nccl::ncclComm_t) -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let comm = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if comm.is_null() {
            return Err(GpuError::Collective("the NCCL communicator was aborted".into()));
        }
        f(*comm)
    }

    /// Aborts (pending device work is cancelled, nothing waits) unless another thread holds
    /// the communicator for longer than [`ABORT_PATIENCE`].
    fn abort(&self) {
        let deadline = std::time::Instant::now() + ABORT_PATIENCE;
        let mut comm = loop {
            match self.handle.try_lock() {
                Ok(comm) => break comm,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        };
        if !comm.is_null() {
            // SAFETY: a live communicator no call is using (we hold the lock), never used
            // again (the handle is nulled).
            unsafe { nccl::ncclCommAbort(*comm) };
            *comm = std::ptr::null_mut();
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let comm = *self.handle.get_mut().unwrap_or_else(|e| e.into_inner());
        if !comm.is_null() {
            // SAFETY: a live communicator with no work pending (`NcclCollective::drop` aborts
            // it instead when work is pending), destroyed once.
            unsafe { nccl::ncclCommDestroy(comm) };
        }
    }
}

/// One rank of an NCCL communicator on a [`CudaDevice`].
pub struct NcclCollective {
    comm: Arc<Comm>,
    rank: usize,
    world: usize,
    context: sys::CUcontext,
    stream: sys::CUstream,
    /// Recorded on the compute stream before each group: the gradients are final.
    ready: sys::CUevent,
    /// Recorded on the communication stream at `join`.
    done: sys::CUevent,
    /// (start, end) around each group of this step on the communication stream — the start
    /// fires once the stream's wait for the compute is over — so `last_seconds` counts the
    /// sums' own time, not the time they waited for backward. Reused step after step.
    timing: Vec<(sys::CUevent, sys::CUevent)>,
    /// Groups queued since the last join.
    groups: usize,
    /// Groups the last join covered (what `last_seconds` reports on).
    joined: usize,
}

// SAFETY: driver and NCCL handles are thread-safe; the context is made current where used.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world` on `device`; blocks until every rank
    /// has joined (NCCL's bootstrap), so the ranks call this at the same point.
    pub fn new(
        device: &CudaDevice,
        id: &[u8],
        rank: usize,
        world: usize,
    ) -> Result<Self, GpuError> {
        if !present() {
            return Err(GpuError::Missing(HOW_TO_GET_NCCL.into()));
        }
        if id.len() != UNIQUE_ID_BYTES {
            return Err(GpuError::Collective(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {} (rank 0 could not make one?)",
                id.len()
            )));
        }
        if rank >= world {
            return Err(GpuError::Collective(format!("rank {rank} of a world of {world}")));
        }
        device.bind()?;
        let mut unique = nccl::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (d, &s) in unique.internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes the communicator handle; blocks until every rank joined.
        check(
            "ncclCommInitRank",
            unsafe { nccl::ncclCommInitRank(&mut comm, world as i32, unique, rank as i32) },
            None,
        )?;
        let comm = Arc::new(Comm { handle: Mutex::new(comm) });
        let driver = |call: &'static str| {
            move |e: result::DriverError| GpuError::Driver {
                call: call.into(),
                message: format!("{e:?}"),
            }
        };
        // Built with null handles first, so a failure below frees what was made (Drop skips
        // the null ones) and the communicator (Comm's Drop).
        let mut this = Self {
            comm,
            rank,
            world,
            context: device.context(),
            stream: std::ptr::null_mut(),
            ready: std::ptr::null_mut(),
            done: std::ptr::null_mut(),
            timing: Vec::new(),
            groups: 0,
            joined: 0,
        };
        this.stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        let event = |flags| result::event::create(flags).map_err(driver("cuEventCreate"));
        this.ready = event(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        this.done = event(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        Ok(this)
    }

    fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: the device's primary context lives as long as the process.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| GpuError::Driver {
            call: "cuCtxSetCurrent".into(),
            message: format!("{e:?}"),
        })
    }
}

/// NCCL's asynchronous error state of `comm` (a failed or aborted sum), as an error.
fn async_error(comm: nccl::ncclComm_t) -> Result<(), GpuError> {
    let mut state = nccl::ncclResult_t::ncclSuccess;
    // SAFETY: a live communicator (the caller holds it); writes one status.
    check(
        "ncclCommGetAsyncError",
        unsafe { nccl::ncclCommGetAsyncError(comm, &mut state) },
        Some(comm),
    )?;
    check("an all-reduce (asynchronous error)", state, Some(comm))
}

fn driver_err(call: &'static str) -> impl FnOnce(result::DriverError) -> GpuError {
    move |e| GpuError::Driver { call: call.into(), message: format!("{e:?}") }
}

impl DeviceCollective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    unsafe fn queue_all_reduce(&mut self, buffers: &[(DevicePtr, usize)]) -> Result<(), GpuError> {
        self.bind()?;
        if self.groups == self.timing.len() {
            let timed = || {
                result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                    .map_err(driver_err("cuEventCreate"))
            };
            let pair = (timed()?, timed()?);
            self.timing.push(pair);
        }
        let (start, end) = self.timing[self.groups];
        let (ready, stream) = (self.ready, self.stream);
        let comm = self.comm.clone();
        comm.with(|comm| {
            // SAFETY: events and streams of this context; the communication stream waits for
            // the compute stream's work so far (the caller's gradients are final there); the
            // communicator is held (see `Comm`).
            unsafe {
                result::event::record(ready, std::ptr::null_mut())
                    .map_err(driver_err("cuEventRecord"))?;
                result::stream::wait_event(
                    stream,
                    ready,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(driver_err("cuStreamWaitEvent"))?;
                result::event::record(start, stream).map_err(driver_err("cuEventRecord"))?;
                check("ncclGroupStart", nccl::ncclGroupStart(), Some(comm))?;
                for &(ptr, len) in buffers {
                    let r = nccl::ncclAllReduce(
                        ptr as *const std::ffi::c_void,
                        ptr as *mut std::ffi::c_void,
                        len,
                        nccl::ncclDataType_t::ncclFloat32,
                        nccl::ncclRedOp_t::ncclSum,
                        comm,
                        stream as nccl::cudaStream_t,
                    );
                    if r != nccl::ncclResult_t::ncclSuccess {
                        let _ = nccl::ncclGroupEnd();
                        return check("ncclAllReduce", r, Some(comm));
                    }
                }
                check("ncclGroupEnd", nccl::ncclGroupEnd(), Some(comm))?;
                result::event::record(end, stream).map_err(driver_err("cuEventRecord"))?;
            }
            async_error(comm)
        })?;
        // Counted once its events are recorded, so `last_seconds` reads recorded pairs only.
        self.groups += 1;
        Ok(())
    }

    fn join(&mut self) -> Result<(), GpuError> {
        self.bind()?;
        let (done, stream) = (self.done, self.stream);
        self.comm.clone().with(|comm| {
            // SAFETY: as in `queue_all_reduce`; the compute stream now waits for the sums.
            unsafe {
                result::event::record(done, stream).map_err(driver_err("cuEventRecord"))?;
                result::stream::wait_event(
                    std::ptr::null_mut(),
                    done,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(driver_err("cuStreamWaitEvent"))?;
            }
            async_error(comm)
        })?;
        self.joined = std::mem::take(&mut self.groups);
        Ok(())
    }

    fn last_seconds(&mut self) -> Option<f64> {
        self.bind().ok()?;
        let mut ms = 0.0f64;
        for &(start, end) in &self.timing[..self.joined] {
            // SAFETY: both recorded on this stream, start first; `end` is waited for.
            unsafe {
                result::event::synchronize(end).ok()?;
                ms += f64::from(result::event::elapsed(start, end).ok()?);
            }
        }
        Some(ms / 1e3)
    }

    fn abort_handle(&self) -> AbortHandle {
        let comm = self.comm.clone();
        Arc::new(move || comm.abort())
    }
}

impl Drop for NcclCollective {
    /// Frees the stream and events. Sums still pending (a peer failed mid-step, or an error
    /// cut the step short) are not waited for — that could wait forever — but cancelled by
    /// aborting the communicator; otherwise the communicator is destroyed normally.
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: this collective's own handles, each destroyed once; null ones were never
        // made (a failed `new`).
        unsafe {
            if !self.stream.is_null() {
                let pending = result::event::record(self.done, self.stream).is_err()
                    || result::event::query(self.done).is_err();
                if pending {
                    self.comm.abort();
                }
                let _ = result::stream::destroy(self.stream);
            }
            for event in [self.ready, self.done] {
                if !event.is_null() {
                    let _ = result::event::destroy(event);
                }
            }
            for &(start, end) in &self.timing {
                let _ = result::event::destroy(start);
                let _ = result::event::destroy(end);
            }
        }
    }
}
