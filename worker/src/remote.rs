//! A worker process in a launched job: join the coordinator, meet the other ranks at the
//! rendezvous, build the collective, train as one rank, and keep a session open for
//! heartbeats, metrics and checkpoint reports (up) and commands (down).
//!
//! The worker holds no job state of its own beyond what a checkpoint restores. If the
//! coordinator disappears the worker exits non-zero at once with a message saying so (a
//! restarted coordinator resumes the job from LATEST); an `Abort` command does the same.
//!
//! GPU ranks sum gradients with NCCL when the job says so (`workers.collective`, by default
//! whenever there are several GPU ranks): rank 0 makes the unique id before the rendezvous,
//! the coordinator hands it to every rank, and each joins the communicator inside its session
//! (so a rank that cannot is a fatal error the coordinator reports). Before exiting on an
//! abort or a lost coordinator a worker aborts its communicator, so no rank stays blocked in a
//! sum waiting for a peer that is gone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chingu_kernels::Cpu;
use chingu_model::{Model, Optimizer};
use chingu_proto::pb;
use chingu_proto::pb::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::checkpoint::{self, TrainState};
use crate::collective::{Collective, RingListener, Solo, TcpRing};
use crate::data::Prepared;
use crate::job::JobSpec;
use crate::trainer::{train_parallel, Comm, Parallel, Requests, TrainEvent};
use crate::{Result, WorkerError};
use chingu_kernels::gpu::collective::AbortHandle;

/// Exit status of a worker whose coordinator went away or told it to abort.
pub const EXIT_COORDINATOR_LOST: i32 = 3;
/// How often the worker tells the coordinator it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long to keep trying to reach the coordinator at start-up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How long ring peers get to connect to each other.
const RING_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the job.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// Coordinator URL (`http://127.0.0.1:50051`).
    pub coordinator: String,
    /// The job token.
    pub token: String,
    /// The rank a local launcher assigned (None: any free rank).
    pub requested_rank: Option<u32>,
    /// Address this worker's ring listener binds and advertises (`127.0.0.1`).
    pub ring_host: String,
}

/// What the worker learnt at `Join`.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Rank.
    pub rank: u32,
    /// World size.
    pub world_size: u32,
    /// The job.
    pub spec: JobSpec,
}

type Client = CoordinatorClient<InterceptedService<Channel, Authorize>>;

/// Adds the job token to every call.
#[derive(Clone)]
pub struct Authorize(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Connects to the coordinator (retrying for a while: it may still be starting).
pub async fn connect(url: &str, token: &str) -> Result<Client> {
    let bearer = format!("Bearer {token}").parse().map_err(|_| {
        WorkerError::Training("the job token has characters HTTP headers cannot carry".into())
    })?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| WorkerError::Training(format!("bad coordinator URL {url}: {e}")))?;
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(CoordinatorClient::with_interceptor(channel, Authorize(bearer)))
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(WorkerError::Training(format!(
                    "cannot reach the coordinator at {url}: {e}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn rpc_error(what: &str, status: tonic::Status) -> WorkerError {
    WorkerError::Training(format!(
        "coordinator refused {what}: {} ({:?})",
        status.message(),
        status.code()
    ))
}

/// Runs one worker to the end of the job; returns the last step done. `on_joined` learns the
/// rank and job as soon as they are known (to open the per-rank log file).
pub fn run(args: &WorkerArgs, on_joined: &mut dyn FnMut(&Joined)) -> Result<u64> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Training(format!("cannot start the async runtime: {e}")))?;
    let mut client = runtime.block_on(connect(&args.coordinator, &args.token))?;
    let join = runtime
        .block_on(client.join(pb::JoinRequest {
            host: hostname(),
            // Which device is known only once the job spec is: a DeviceOpened event follows.
            device: "pending".into(),
            capabilities: capabilities(),
            requested_rank: args.requested_rank.map_or(-1, |r| r as i32),
            pid: std::process::id(),
        }))
        .map_err(|s| rpc_error("join", s))?
        .into_inner();
    let spec: JobSpec = serde_json::from_str(&join.job_spec_json).map_err(|e| {
        WorkerError::Training(format!(
            "the coordinator sent a job spec this worker cannot read: {e}"
        ))
    })?;
    let joined = Joined { rank: join.rank, world_size: join.world_size, spec: spec.clone() };
    on_joined(&joined);
    let (rank, world, generation) = (join.rank, join.world_size, join.generation);
    tracing::info!(rank, world, generation, resume = join.resume, job = %spec.name, "joined");

    let use_nccl = wants_nccl(&spec, world as usize);
    // NCCL's unique id comes from rank 0; an error waits for the session to be reported.
    let (nccl_unique_id, nccl_id_error) = match (use_nccl, rank) {
        (true, 0) => match make_nccl_id() {
            Ok(id) => (id, None),
            Err(e) => (Vec::new(), Some(e)),
        },
        _ => (Vec::new(), None),
    };

    // Rendezvous: publish this rank's ring address (and NCCL id), learn everyone's.
    let listener = RingListener::bind(SocketAddr::new(
        args.ring_host
            .parse()
            .map_err(|e| WorkerError::Training(format!("bad ring host {}: {e}", args.ring_host)))?,
        0,
    ))
    .map_err(|e| WorkerError::io(&PathBuf::from(&args.ring_host), e))?;
    let meet = runtime
        .block_on(client.rendezvous(pb::RendezvousRequest {
            rank,
            generation,
            ring_address: listener.local_addr().to_string(),
            nccl_unique_id,
        }))
        .map_err(|s| rpc_error("rendezvous", s))?
        .into_inner();
    let peers: Vec<SocketAddr> = meet
        .ring_addresses
        .iter()
        .map(|a| a.parse().map_err(|e| WorkerError::Training(format!("bad peer address {a}: {e}"))))
        .collect::<Result<_>>()?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    let nccl_id = meet.nccl_unique_id;
    let mut collective: Box<dyn Collective> = if world == 1 || use_nccl {
        drop(listener);
        Box::new(Solo)
    } else {
        Box::new(
            TcpRing::connect(listener, rank as usize, &peers, join.ring_key, RING_TIMEOUT)
                .map_err(|e| WorkerError::Collective(format!("ring: {e}")))?,
        )
    };

    // The session: events up through a channel, commands down into flags.
    let (events, event_rx) = mpsc::unbounded_channel::<pb::WorkerEvent>();
    let send = {
        let events = events.clone();
        move |event: pb::worker_event::Event| {
            let _ = events.send(pb::WorkerEvent { rank, generation, event: Some(event) });
        }
    };
    send(pb::worker_event::Event::Hello(pb::Hello {}));
    let commands = runtime
        .block_on(client.session(UnboundedReceiverStream::new(event_rx)))
        .map_err(|s| rpc_error("session", s))?
        .into_inner();
    let flags = Arc::new(Flags::default());
    let reader = runtime.spawn(read_commands(commands, flags.clone()));
    let heartbeat = {
        let (send, flags) = (send.clone(), flags.clone());
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                let step = flags.step.load(Ordering::Relaxed);
                send(pb::worker_event::Event::Heartbeat(pb::Heartbeat { step }));
            }
        })
    };

    let threads = if spec.threads > 0 {
        spec.threads
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / world as usize).max(1)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| WorkerError::Training(format!("thread pool: {e}")))?;
    let data = Prepared::open(&spec.data)?;
    let tokenizer = data.tokenizer_path();
    let options = spec.train_options(join.resume.then_some(join.resume_step));
    let outcome = pool.install(|| {
        // Inside the session: a rank that cannot get its device reports a fatal error to the
        // coordinator, which fails the job at once instead of restarting it in vain.
        let gpu = open_gpu(&spec.backend, rank as usize, world as usize)?;
        send(pb::worker_event::Event::Device(pb::DeviceOpened { device: device_name(&gpu) }));
        if let Some(e) = nccl_id_error {
            return Err(WorkerError::Training(format!("rank 0 could not start NCCL: {e}")));
        }
        let mut requests = || Requests {
            checkpoint: flags.checkpoint.swap(false, Ordering::Relaxed),
            stop: flags.stop.load(Ordering::Relaxed),
        };
        let mut observer = |event: &TrainEvent| match event {
            TrainEvent::Started { step, parameters, resumed_from, records } => {
                flags.step.store(*step, Ordering::Relaxed);
                tracing::info!(rank, step, parameters, records, resumed_from = ?resumed_from, threads, "training");
            }
            TrainEvent::Step(r) => {
                flags.step.store(r.step, Ordering::Relaxed);
                if r.step % 50 == 0 || r.step == 1 {
                    tracing::info!(
                        step = r.step,
                        loss = format!("{:.4}", r.loss),
                        tokens_per_s = format!("{:.0}", r.tokens_per_s),
                        allreduce_ms = format!("{:.1}", r.allreduce_s * 1e3),
                        exposed_ms = format!("{:.1}", r.allreduce_exposed_s * 1e3),
                        "train"
                    );
                }
                send(pb::worker_event::Event::Step(pb::StepMetrics {
                    step: r.step,
                    epoch: r.epoch,
                    loss: r.loss,
                    tokens: r.tokens as u64,
                    tokens_per_s: r.tokens_per_s,
                    allreduce_s: r.allreduce_s,
                    allreduce_exposed_s: r.allreduce_exposed_s,
                    step_s: r.step_s,
                    grad_norm: r.grad_norm,
                    lr: r.lr,
                    device_memory_bytes: r.device_memory.map_or(0, |(used, _)| used as u64),
                    device_memory_total: r.device_memory.map_or(0, |(_, total)| total as u64),
                }));
            }
            TrainEvent::Validation { step, loss } => tracing::info!(step, valid_loss = loss, "validation"),
            TrainEvent::Checkpoint { .. } => {}
        };
        // One arm per backend type: the checkpoint writer is typed by the model it writes.
        match gpu {
            #[cfg(feature = "cuda")]
            Some(gpu) => {
                type B = chingu_kernels::gpu::backend::GpuBackend;
                use chingu_kernels::gpu::collective::DeviceCollective as _;
                let mut nccl = if use_nccl {
                    let dev = gpu.cuda().ok_or_else(|| {
                        WorkerError::Training(
                            "NCCL needs CUDA devices: emulated GPU ranks sum with workers.collective = \"ring\"".into(),
                        )
                    })?;
                    let comm = join_nccl(dev, &nccl_id, rank as usize, world as usize)?;
                    *flags.abort.lock().expect("abort handle") = Some(comm.abort_handle());
                    Some(comm)
                } else {
                    None
                };
                let mut write = |model: &Model<B>, optimizer: &Optimizer<B>, state: TrainState| {
                    stage_checkpoint(rank, &spec.run, &tokenizer, &send, model, optimizer, state)
                };
                let parallel = Parallel {
                    collective: match nccl.as_mut() {
                        Some(comm) => Comm::Device(comm),
                        None => Comm::Host(collective.as_mut()),
                    },
                    accumulate: spec.accumulate,
                    requests: &mut requests,
                    checkpoint: &mut write,
                };
                train_parallel(B::new(gpu.shared()), &options, parallel, &mut observer)
                    .map(|o| o.step)
            }
            _ if use_nccl => Err(WorkerError::Training(format!(
                "workers.collective = \"{}\" needs GPU ranks, but rank {rank} trains on the CPU",
                spec.collective
            ))),
            _ => {
                type B = Cpu<f32>;
                let mut write = |model: &Model<B>, optimizer: &Optimizer<B>, state: TrainState| {
                    stage_checkpoint(rank, &spec.run, &tokenizer, &send, model, optimizer, state)
                };
                let parallel = Parallel {
                    collective: Comm::Host(collective.as_mut()),
                    accumulate: spec.accumulate,
                    requests: &mut requests,
                    checkpoint: &mut write,
                };
                train_parallel(B::new(), &options, parallel, &mut observer).map(|o| o.step)
            }
        }
    });
    heartbeat.abort();
    let result = match outcome {
        Ok(step) => {
            flags.finished.store(true, Ordering::Relaxed);
            send(pb::worker_event::Event::Finished(pb::Finished { step }));
            Ok(step)
        }
        Err(e) => {
            flags.finished.store(true, Ordering::Relaxed);
            let level = if e.is_deterministic() { "fatal" } else { "error" };
            send(pb::worker_event::Event::Log(pb::LogLine {
                level: level.into(),
                message: e.to_string(),
            }));
            Err(e)
        }
    };
    // Close the event stream and let the coordinator see everything before exiting.
    drop(send);
    drop(events);
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), reader).await });
    result
}

#[derive(Default)]
struct Flags {
    checkpoint: AtomicBool,
    stop: AtomicBool,
    finished: AtomicBool,
    step: AtomicU64,
    /// Aborts the NCCL communicator, once there is one.
    abort: std::sync::Mutex<Option<AbortHandle>>,
}

/// Exits the worker with [`EXIT_COORDINATOR_LOST`], aborting its communicator first: a peer
/// blocked in a sum must not wait for this rank forever, and the process must not hang in
/// CUDA's exit handlers behind a kernel that waits for a peer.
fn exit_lost(flags: &Flags) -> ! {
    if let Some(abort) = flags.abort.lock().ok().and_then(|a| a.clone()) {
        abort();
    }
    std::process::exit(EXIT_COORDINATOR_LOST);
}

async fn read_commands(mut commands: tonic::Streaming<pb::Command>, flags: Arc<Flags>) {
    loop {
        let lost = match commands.message().await {
            Ok(Some(pb::Command { command: Some(command) })) => {
                match command {
                    pb::command::Command::Checkpoint(_) => {
                        flags.checkpoint.store(true, Ordering::Relaxed)
                    }
                    pb::command::Command::Stop(s) => {
                        tracing::info!(reason = %s.reason, "stop requested: checkpoint at the next step, then exit");
                        flags.stop.store(true, Ordering::Relaxed);
                    }
                    pb::command::Command::Abort(a) => {
                        tracing::error!(reason = %a.reason, "the coordinator aborted this worker");
                        exit_lost(&flags);
                    }
                }
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => "closed the session".to_string(),
            Err(status) => format!("broke the session: {}", status.message()),
        };
        if flags.finished.load(Ordering::Relaxed) {
            return;
        }
        tracing::error!("the coordinator {lost}; exiting (a restarted coordinator resumes the job from its LATEST checkpoint)");
        exit_lost(&flags);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The device a rank trains on for `workers.backend`: `cpu` → none; `cuda` → GPU
/// `rank mod count` (ranks are numbered host by host) or an error; `auto` → that GPU when this
/// build has CUDA support and it opens, else — for a single worker only — the CPU, with one log
/// line saying why. Several ranks never mix devices: GPU ranks scale their gradients by the
/// loss scale and skip overflowed steps, CPU ranks do not, so a mixed job would diverge.
/// With feature "emu", `CHINGU_EMULATED_GPU=1` puts a GPU rank on the CPU emulation of CUDA
/// (slow; how the tests run a launched GPU job without a GPU).
#[cfg(feature = "cuda")]
fn open_gpu(backend: &str, rank: usize, world: usize) -> Result<Option<RankGpu>> {
    use chingu_kernels::gpu::cuda::CudaDevice;
    use chingu_kernels::gpu::Device;
    if backend == "cpu" {
        return Ok(None);
    }
    #[cfg(feature = "emu")]
    if chingu_kernels::gpu::emu::emulation_requested() {
        let dev = chingu_kernels::gpu::emu::EmuDevice::from_env()
            .map_err(|e| WorkerError::Training(format!("CHINGU_EMULATED_GPU=1: {e}")))?;
        tracing::info!("CHINGU_EMULATED_GPU=1: training on the CUDA kernels emulated on the CPU");
        return Ok(Some(RankGpu::Emulated(Arc::new(dev))));
    }
    match CudaDevice::open_for(rank) {
        Ok(dev) => {
            tracing::info!(device = %dev.name(), "training on the GPU (fp16 mixed precision)");
            Ok(Some(RankGpu::Cuda(Arc::new(dev))))
        }
        Err(why) if backend == "auto" && world == 1 => {
            tracing::info!("{why}: training on the CPU");
            Ok(None)
        }
        Err(why) if backend == "auto" => Err(WorkerError::Training(format!(
            "workers.backend = \"auto\" with {world} workers: rank {rank} found no usable GPU ({why}); \
             ranks must not mix GPU and CPU — set workers.backend = \"cpu\" or fix the GPU"
        ))),
        Err(why) => Err(WorkerError::Training(format!("workers.backend = \"cuda\": {why}"))),
    }
}

/// Without CUDA support every rank trains on the CPU; `cuda` is refused.
#[cfg(not(feature = "cuda"))]
fn open_gpu(backend: &str, _rank: usize, _world: usize) -> Result<Option<()>> {
    match backend {
        "cuda" => Err(WorkerError::Training(
            "workers.backend = \"cuda\" but this build has no CUDA support (build with --features cuda)".into(),
        )),
        "auto" => {
            tracing::info!("no CUDA support in this build (--features cuda): training on the CPU");
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// What this build can do, for the coordinator's log: `cpu`, `tcp-ring`, and with CUDA
/// support `cuda` (plus `nccl` when its library loads).
fn capabilities() -> Vec<String> {
    let can = vec!["cpu".to_string(), "tcp-ring".to_string()];
    #[cfg(feature = "cuda")]
    let can = {
        let mut can = can;
        can.push("cuda".into());
        if chingu_kernels::gpu::nccl::present() {
            can.push("nccl".into());
        }
        can
    };
    can
}

/// The GPU a rank trains on: a CUDA device, or its CPU emulation (feature "emu").
#[cfg(feature = "cuda")]
enum RankGpu {
    Cuda(Arc<chingu_kernels::gpu::cuda::CudaDevice>),
    #[cfg(feature = "emu")]
    Emulated(Arc<chingu_kernels::gpu::emu::EmuDevice>),
}

#[cfg(feature = "cuda")]
impl RankGpu {
    fn name(&self) -> String {
        use chingu_kernels::gpu::Device as _;
        match self {
            RankGpu::Cuda(dev) => dev.name(),
            #[cfg(feature = "emu")]
            RankGpu::Emulated(dev) => dev.name(),
        }
    }

    /// The CUDA device NCCL needs; the emulated one has no NCCL.
    fn cuda(&self) -> Option<&chingu_kernels::gpu::cuda::CudaDevice> {
        match self {
            RankGpu::Cuda(dev) => Some(dev),
            #[cfg(feature = "emu")]
            RankGpu::Emulated(_) => None,
        }
    }

    fn shared(self) -> chingu_kernels::gpu::Gpu {
        match self {
            RankGpu::Cuda(dev) => dev,
            #[cfg(feature = "emu")]
            RankGpu::Emulated(dev) => dev,
        }
    }
}

/// What `chingu status` shows for the device a rank trains on.
#[cfg(feature = "cuda")]
fn device_name(gpu: &Option<RankGpu>) -> String {
    gpu.as_ref().map_or_else(|| "cpu".to_string(), RankGpu::name)
}

#[cfg(not(feature = "cuda"))]
fn device_name(_gpu: &Option<()>) -> String {
    "cpu".to_string()
}

/// Whether this job's ranks sum with NCCL: `workers.collective = "nccl"`, or `"auto"` with
/// several ranks that may be on GPUs.
fn wants_nccl(spec: &JobSpec, world: usize) -> bool {
    cfg!(feature = "cuda")
        && spec.backend != "cpu"
        && (spec.collective == "nccl" || (spec.collective == "auto" && world > 1))
}

#[cfg(feature = "cuda")]
fn make_nccl_id() -> std::result::Result<Vec<u8>, String> {
    chingu_kernels::gpu::nccl::unique_id().map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn make_nccl_id() -> std::result::Result<Vec<u8>, String> {
    Err("this build has no CUDA support".into())
}

/// Joins the job's NCCL communicator (blocks until every rank has).
#[cfg(feature = "cuda")]
fn join_nccl(
    dev: &chingu_kernels::gpu::cuda::CudaDevice,
    id: &[u8],
    rank: usize,
    world: usize,
) -> Result<chingu_kernels::gpu::nccl::NcclCollective> {
    use chingu_kernels::gpu::Device as _;
    if id.is_empty() {
        return Err(WorkerError::Training(
            "NCCL: rank 0 sent no unique id (it could not start NCCL; its log says why)".into(),
        ));
    }
    if world > 1 && dev.name().contains("GeForce") && std::env::var_os("NCCL_P2P_DISABLE").is_none()
    {
        tracing::warn!("GeForce GPUs have no peer-to-peer access: if NCCL hangs or fails, export NCCL_P2P_DISABLE=1 before launching (deploy/README.md, NCCL)");
    }
    let comm = chingu_kernels::gpu::nccl::NcclCollective::new(dev, id, rank, world)
        .map_err(|e| WorkerError::Training(format!("rank {rank}: {e}")))?;
    tracing::info!(rank, world, version = ?chingu_kernels::gpu::nccl::version(), "NCCL communicator ready: gradients are summed on the GPUs");
    Ok(comm)
}

/// Rank 0 writes a checkpoint's parts to the staging directory and reports them (with their
/// sha256) to the coordinator, which commits them; other ranks write nothing.
fn stage_checkpoint<B: chingu_kernels::Backend>(
    rank: u32,
    run: &std::path::Path,
    tokenizer: &std::path::Path,
    send: &dyn Fn(pb::worker_event::Event),
    model: &Model<B>,
    optimizer: &Optimizer<B>,
    state: TrainState,
) -> Result<Option<std::path::PathBuf>> {
    if rank != 0 {
        return Ok(None);
    }
    let staged = checkpoint::write_parts(run, state.step, model, optimizer, tokenizer)?;
    let state_json =
        serde_json::to_string(&state).map_err(|e| WorkerError::Checkpoint(e.to_string()))?;
    send(pb::worker_event::Event::Checkpoint(pb::CheckpointParts {
        step: state.step,
        dir: staged.dir.display().to_string(),
        state_json,
        parts: staged
            .parts
            .iter()
            .map(|p| pb::Part { name: p.name.clone(), sha256: p.sha256.clone(), bytes: p.bytes })
            .collect(),
    }));
    // Where the checkpoint lands once the coordinator commits it.
    Ok(Some(staged.dir.with_extension("")))
}
