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

/// The communicator, shared with abort handles.
struct Comm {
    /// Null once destroyed or aborted.
    handle: Mutex<nccl::ncclComm_t>,
}

// SAFETY: NCCL communicators may be used from any thread; the mutex serialises abort/destroy.
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}

impl Comm {
    fn get(&self) -> Result<nccl::ncclComm_t, GpuError> {
        let comm = *self.handle.lock().expect("NCCL communicator");
        if comm.is_null() {
            Err(GpuError::Collective("the NCCL communicator was aborted".into()))
        } else {
            Ok(comm)
        }
    }

    fn abort(&self) {
        let mut comm = self.handle.lock().expect("NCCL communicator");
        if !comm.is_null() {
            // SAFETY: a live communicator, never used again (the handle is nulled).
            unsafe { nccl::ncclCommAbort(*comm) };
            *comm = std::ptr::null_mut();
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let comm = *self.handle.get_mut().expect("NCCL communicator");
        if !comm.is_null() {
            // SAFETY: a live communicator with no work pending (the owner joined and the host
            // waited), destroyed once.
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
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        let event = |flags| result::event::create(flags).map_err(driver("cuEventCreate"));
        let ready = event(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        let done = event(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        Ok(Self {
            comm,
            rank,
            world,
            context: device.context(),
            stream,
            ready,
            done,
            timing: Vec::new(),
            groups: 0,
            joined: 0,
        })
    }

    fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: the device's primary context lives as long as the process.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| GpuError::Driver {
            call: "cuCtxSetCurrent".into(),
            message: format!("{e:?}"),
        })
    }

    fn async_error(&self, comm: nccl::ncclComm_t) -> Result<(), GpuError> {
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator; writes one status.
        check(
            "ncclCommGetAsyncError",
            unsafe { nccl::ncclCommGetAsyncError(comm, &mut state) },
            Some(comm),
        )?;
        check("an all-reduce (asynchronous error)", state, Some(comm))
    }
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
        let comm = self.comm.get()?;
        self.bind()?;
        let compute = std::ptr::null_mut();
        // SAFETY: events and streams of this context; the communication stream waits for the
        // compute stream's work so far (the caller's gradients are final there).
        unsafe {
            result::event::record(self.ready, compute).map_err(driver_err("cuEventRecord"))?;
            result::stream::wait_event(
                self.stream,
                self.ready,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(driver_err("cuStreamWaitEvent"))?;
            if self.groups == self.timing.len() {
                let timed = || {
                    result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                        .map_err(driver_err("cuEventCreate"))
                };
                self.timing.push((timed()?, timed()?));
            }
            let (start, end) = self.timing[self.groups];
            self.groups += 1;
            result::event::record(start, self.stream).map_err(driver_err("cuEventRecord"))?;
            check("ncclGroupStart", nccl::ncclGroupStart(), Some(comm))?;
            for &(ptr, len) in buffers {
                let r = nccl::ncclAllReduce(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    len,
                    nccl::ncclDataType_t::ncclFloat32,
                    nccl::ncclRedOp_t::ncclSum,
                    comm,
                    self.stream as nccl::cudaStream_t,
                );
                if r != nccl::ncclResult_t::ncclSuccess {
                    let _ = nccl::ncclGroupEnd();
                    return check("ncclAllReduce", r, Some(comm));
                }
            }
            check("ncclGroupEnd", nccl::ncclGroupEnd(), Some(comm))?;
            result::event::record(end, self.stream).map_err(driver_err("cuEventRecord"))?;
        }
        self.async_error(comm)
    }

    fn join(&mut self) -> Result<(), GpuError> {
        let comm = self.comm.get()?;
        self.bind()?;
        // SAFETY: as in `queue_all_reduce`; the compute stream now waits for the sums.
        unsafe {
            result::event::record(self.done, self.stream).map_err(driver_err("cuEventRecord"))?;
            result::stream::wait_event(
                std::ptr::null_mut(),
                self.done,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(driver_err("cuStreamWaitEvent"))?;
        }
        self.joined = std::mem::take(&mut self.groups);
        self.async_error(comm)
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
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: this collective's own handles, destroyed once after its work finished.
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                let _ = result::event::destroy(self.ready);
                let _ = result::event::destroy(self.done);
                for &(start, end) in &self.timing {
                    let _ = result::event::destroy(start);
                    let _ = result::event::destroy(end);
                }
                let _ = result::stream::destroy(self.stream);
            }
        }
    }
}
