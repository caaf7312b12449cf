//! The coordinator's gRPC service and the job state it owns: who joined with which rank, the
//! rendezvous barrier, each rank's session (events up, commands down), metrics aggregation,
//! checkpoint commits, and incidents (a rank lost, every rank finished) for the supervisor.
//!
//! Proto types stop here: the rest of the coordinator sees [`Incident`]s and plain values.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chingu_proto::pb;
use chingu_worker::checkpoint::{self, Part, TrainState};
use chingu_worker::job::JobSpec;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Where the job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for every rank to join.
    Pending,
    /// Every rank joined; waiting at the barrier.
    Rendezvous,
    /// Training.
    Running,
    /// A checkpoint's parts are being verified and committed.
    Checkpointing,
    /// Every rank finished.
    Finished,
    /// Gave up (restarts exhausted or a fatal error).
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Rendezvous => "rendezvous",
            Phase::Running => "running",
            Phase::Checkpointing => "checkpointing",
            Phase::Finished => "finished",
            Phase::Failed => "failed",
        }
    }
}

/// What the supervisor must react to.
#[derive(Debug, Clone, PartialEq)]
pub enum Incident {
    /// A rank of the current generation stopped talking (session ended, heartbeat timeout,
    /// reported error).
    RankLost {
        /// The generation it happened in (stale ones are ignored).
        generation: u64,
        /// The rank.
        rank: u32,
        /// What happened, with the rank's last reported error.
        reason: String,
        /// The rank reported an error a restart would only repeat (bad data, settings, NaN).
        fatal: bool,
    },
    /// Every rank of the current generation finished at `step`.
    AllFinished {
        /// The generation.
        generation: u64,
        /// Last step.
        step: u64,
    },
}

/// Fixed facts of the job.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The job every worker gets.
    pub spec: JobSpec,
    /// Number of ranks.
    pub world_size: u32,
    /// Silence after which a rank counts as lost.
    pub heartbeat_timeout: Duration,
}

/// One rank's slot in the current generation.
#[derive(Debug)]
struct Rank {
    host: String,
    device: String,
    step: u64,
    loss: f64,
    tokens_per_s: f64,
    /// Device memory (in use, in all) after the rank's last step; (0, 0) unknown.
    device_memory: (u64, u64),
    last_seen: Instant,
    session: Option<mpsc::Sender<Result<pb::Command, Status>>>,
    finished: bool,
    /// The last error the rank reported, and whether it was fatal.
    last_error: Option<(String, bool)>,
}

#[derive(Debug)]
struct JobState {
    phase: Phase,
    generation: u64,
    restarts: u32,
    resume: bool,
    ranks: Vec<Option<Rank>>,
    ring: Vec<Option<String>>,
    /// Rank 0's NCCL unique id for this generation (empty when it sent none).
    nccl_id: Vec<u8>,
    latest_step: Option<u64>,
    /// The checkpoint this generation's workers start from.
    resume_step: Option<u64>,
    /// Set by Ctrl-C/SIGTERM: every session, even one opened later, is told to stop.
    stop_requested: Option<String>,
    pending_metrics: BTreeMap<u64, Vec<Option<pb::StepMetrics>>>,
}

/// What the rendezvous hands every rank: the ring addresses by rank and rank 0's NCCL unique id.
type Meeting = (Vec<String>, Vec<u8>);

/// The job as the coordinator sees it; shared by the gRPC service and the supervisor.
pub struct Job {
    token: String,
    ring_key: u64,
    config: JobConfig,
    spec_json: String,
    state: Mutex<JobState>,
    /// (generation, what every rank learns once all have met).
    barrier: watch::Sender<(u64, Option<Meeting>)>,
    incidents: mpsc::UnboundedSender<Incident>,
    metrics: Mutex<Option<File>>,
    /// Held while a checkpoint is committed; a new generation waits for it, so every rank of
    /// the new one resumes from the same LATEST.
    commit_lock: tokio::sync::Mutex<()>,
}

/// One rank in a status snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct RankSnapshot {
    /// Rank.
    pub rank: u32,
    /// Host.
    pub host: String,
    /// Device.
    pub device: String,
    /// Steps done.
    pub step: u64,
    /// Last loss.
    pub loss: f64,
    /// Last tokens/s.
    pub tokens_per_s: f64,
    /// Seconds since the rank was last heard from.
    pub last_seen_s: f64,
    /// Device memory in use after its last step, in bytes (0: not known).
    pub device_memory_bytes: u64,
    /// The device's memory in all, in bytes (0: not known).
    pub device_memory_total: u64,
}

/// The job at a glance (`RUN/status.json`, the Status RPC).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Job name.
    pub job: String,
    /// Phase.
    pub state: Phase,
    /// Generation (restarts + 1).
    pub generation: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Step of LATEST.
    pub latest_checkpoint_step: Option<u64>,
    /// Ranks of the current generation that joined.
    pub ranks: Vec<RankSnapshot>,
}

impl Job {
    /// A job in phase Pending (generation 0: call [`Job::new_generation`] before workers join).
    pub fn new(
        config: JobConfig,
        token: String,
        ring_key: u64,
        incidents: mpsc::UnboundedSender<Incident>,
    ) -> Arc<Job> {
        let spec_json = serde_json::to_string(&config.spec).expect("job spec serialises");
        let world = config.world_size as usize;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.spec.run.join("metrics.jsonl"))
            .map_err(|e| tracing::warn!("cannot open metrics.jsonl: {e}"))
            .ok();
        Arc::new(Job {
            token,
            ring_key,
            spec_json,
            state: Mutex::new(JobState {
                phase: Phase::Pending,
                generation: 0,
                restarts: 0,
                resume: false,
                ranks: (0..world).map(|_| None).collect(),
                ring: vec![None; world],
                nccl_id: Vec::new(),
                latest_step: checkpoint::latest_step(&config.spec.run),
                resume_step: None,
                stop_requested: None,
                pending_metrics: BTreeMap::new(),
            }),
            barrier: watch::channel((0, None)).0,
            incidents,
            metrics: Mutex::new(metrics),
            commit_lock: tokio::sync::Mutex::new(()),
            config,
        })
    }

    /// The token every call must carry.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Starts a new generation (first start or restart) once no checkpoint commit is in
    /// flight: empties the rank table; workers of older generations are refused from now on.
    /// With `resume`, the joining workers all continue from the LATEST of this moment.
    pub async fn new_generation(&self, resume: bool, restart: bool) -> u64 {
        let _no_commit = self.commit_lock.lock().await;
        let mut s = self.state.lock().expect("job state");
        s.generation += 1;
        if restart {
            s.restarts += 1;
        }
        s.latest_step = checkpoint::latest_step(&self.config.spec.run);
        s.resume = resume && s.latest_step.is_some();
        s.resume_step = if s.resume { s.latest_step } else { None };
        // Wake rendezvous waiters of the old generation (they get an error).
        self.barrier.send_replace((s.generation, None));
        s.phase = Phase::Pending;
        s.ranks.iter_mut().for_each(|r| *r = None);
        s.ring.iter_mut().for_each(|r| *r = None);
        s.nccl_id.clear();
        s.pending_metrics.clear();
        s.generation
    }

    /// Sets the phase (the supervisor's final verdicts).
    pub fn set_phase(&self, phase: Phase) {
        self.state.lock().expect("job state").phase = phase;
    }

    /// Asks every rank — also those whose session opens later — to checkpoint and stop.
    pub fn request_stop(&self, reason: &str) {
        self.state.lock().expect("job state").stop_requested = Some(reason.to_string());
        self.broadcast(pb::command::Command::Stop(pb::Stop { reason: reason.to_string() }));
    }

    /// The last error rank `rank` of the current generation reported, and whether it was fatal.
    pub fn last_error(&self, rank: u32) -> Option<(String, bool)> {
        let s = self.state.lock().expect("job state");
        s.ranks.get(rank as usize)?.as_ref()?.last_error.clone()
    }

    /// The step LATEST names, as far as this coordinator committed or found it.
    pub fn latest_step(&self) -> Option<u64> {
        self.state.lock().expect("job state").latest_step
    }

    /// Sends `command` to every rank with an open session.
    pub fn broadcast(&self, command: pb::command::Command) {
        let s = self.state.lock().expect("job state");
        for rank in s.ranks.iter().flatten() {
            if let Some(session) = &rank.session {
                let _ = session.try_send(Ok(pb::Command { command: Some(command.clone()) }));
            }
        }
    }

    /// Ranks of the current generation silent for longer than the heartbeat timeout (while
    /// running), or missing at the rendezvous for that long after joining.
    pub fn silent_ranks(&self) -> Vec<u32> {
        let s = self.state.lock().expect("job state");
        let timeout = self.config.heartbeat_timeout;
        match s.phase {
            Phase::Running | Phase::Checkpointing => s
                .ranks
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
                .filter(|(_, r)| !r.finished && r.last_seen.elapsed() > timeout)
                .map(|(i, _)| i as u32)
                .collect(),
            // Everyone joined; a rank that has not reached the rendezvous within the timeout
            // died on the way (the others wait for it at the barrier).
            Phase::Rendezvous => s
                .ranks
                .iter()
                .zip(&s.ring)
                .enumerate()
                .filter(|(_, (r, ring))| {
                    ring.is_none() && r.as_ref().is_some_and(|r| r.last_seen.elapsed() > timeout)
                })
                .map(|(i, _)| i as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The job at a glance.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.lock().expect("job state");
        Snapshot {
            job: self.config.spec.name.clone(),
            state: s.phase,
            generation: s.generation,
            restarts: s.restarts,
            latest_checkpoint_step: s.latest_step,
            ranks: s
                .ranks
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    r.as_ref().map(|r| RankSnapshot {
                        rank: i as u32,
                        host: r.host.clone(),
                        device: r.device.clone(),
                        step: r.step,
                        loss: r.loss,
                        tokens_per_s: r.tokens_per_s,
                        last_seen_s: r.last_seen.elapsed().as_secs_f64(),
                        device_memory_bytes: r.device_memory.0,
                        device_memory_total: r.device_memory.1,
                    })
                })
                .collect(),
        }
    }

    fn check_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {}", self.token);
        match request.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
            Some(got) if got == expected => Ok(()),
            got => {
                let from = request.remote_addr().map_or("unknown".to_string(), |a| a.to_string());
                tracing::warn!(
                    from,
                    token_present = got.is_some(),
                    "rejected a call with a wrong or missing job token"
                );
                Err(Status::unauthenticated("wrong or missing job token"))
            }
        }
    }

    fn lost(&self, rank: u32, generation: u64, reason: String) {
        let mut s = self.state.lock().expect("job state");
        if s.generation != generation {
            return;
        }
        let live = !matches!(s.phase, Phase::Finished | Phase::Failed);
        let Some(slot) = s.ranks.get_mut(rank as usize).and_then(|r| r.as_mut()) else {
            return;
        };
        slot.session = None;
        let fatal = slot.last_error.as_ref().is_some_and(|(_, fatal)| *fatal);
        if live && !slot.finished || fatal {
            let reason = match &slot.last_error {
                Some((error, _)) => format!("{reason}; its last error: {error}"),
                None => reason,
            };
            let _ = self.incidents.send(Incident::RankLost { generation, rank, reason, fatal });
        }
    }

    fn record_metrics(&self, s: &mut JobState, rank: u32, m: pb::StepMetrics) {
        let world = self.config.world_size as usize;
        let step = m.step;
        let entry = s.pending_metrics.entry(step).or_insert_with(|| vec![None; world]);
        entry[rank as usize] = Some(m);
        if entry.iter().all(Option::is_some) {
            let all: Vec<pb::StepMetrics> =
                s.pending_metrics.remove(&step).into_iter().flatten().flatten().collect();
            let line = serde_json::json!({
                "step": step,
                "epoch": all[0].epoch,
                "loss": all[0].loss,
                "tokens": all[0].tokens,
                "tokens_per_s": all.iter().map(|m| m.tokens_per_s).sum::<f64>(),
                "tokens_per_s_by_rank": all.iter().map(|m| m.tokens_per_s).collect::<Vec<_>>(),
                "allreduce_s": all.iter().map(|m| m.allreduce_s).fold(0.0, f64::max),
                "allreduce_exposed_s": all.iter().map(|m| m.allreduce_exposed_s).fold(0.0, f64::max),
                "step_s": all.iter().map(|m| m.step_s).fold(0.0, f64::max),
                "grad_norm": all[0].grad_norm,
                "lr": all[0].lr,
                // Per rank, where the device can tell (GPUs): in use after the step.
                "device_memory_bytes_by_rank": all.iter().map(|m| m.device_memory_bytes).collect::<Vec<_>>(),
            });
            if let Some(file) = self.metrics.lock().expect("metrics").as_mut() {
                let _ = writeln!(file, "{line}");
            }
            tracing::debug!(target: "chingu::coordinator::step", step, loss = all[0].loss);
        }
        // Steps some rank never reported (it died) must not pile up.
        while s.pending_metrics.len() > 64 {
            let oldest = *s.pending_metrics.keys().next().expect("non-empty");
            s.pending_metrics.remove(&oldest);
        }
    }

    async fn commit(&self, rank: u32, generation: u64, parts: pb::CheckpointParts) {
        let _committing = self.commit_lock.lock().await;
        if self.state.lock().expect("job state").generation != generation {
            return;
        }
        let state: TrainState = match serde_json::from_str(&parts.state_json) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    step = parts.step,
                    "checkpoint state from rank 0 is unreadable: {e}"
                );
                return;
            }
        };
        let expected = checkpoint::staging_dir(&self.config.spec.run, state.step);
        if std::path::Path::new(&parts.dir) != expected {
            tracing::error!(step = state.step, dir = %parts.dir, expected = %expected.display(), "checkpoint parts reported outside the run's staging directory; ignored");
            return;
        }
        self.state.lock().expect("job state").phase = Phase::Checkpointing;
        let run = self.config.spec.run.clone();
        let keep = self.config.spec.keep;
        let dir = PathBuf::from(&parts.dir);
        let list: Vec<Part> = parts
            .parts
            .iter()
            .map(|p| Part { name: p.name.clone(), sha256: p.sha256.clone(), bytes: p.bytes })
            .collect();
        let step = state.step;
        let result =
            tokio::task::spawn_blocking(move || checkpoint::commit(&run, &dir, state, &list, keep))
                .await;
        let mut s = self.state.lock().expect("job state");
        if s.phase == Phase::Checkpointing {
            s.phase = Phase::Running;
        }
        // The committing rank's session was not read meanwhile: its heartbeats are not late.
        if let Some(slot) = s.ranks.get_mut(rank as usize).and_then(|r| r.as_mut()) {
            slot.last_seen = Instant::now();
        }
        match result {
            Ok(Ok(dir)) => {
                s.latest_step = Some(step);
                tracing::info!(step, dir = %dir.display(), "checkpoint committed; LATEST moved");
            }
            Ok(Err(e)) => tracing::error!(step, "checkpoint not committed: {e}"),
            Err(e) => tracing::error!(step, "checkpoint commit panicked: {e}"),
        }
    }

    async fn handle_session(
        self: Arc<Self>,
        mut events: Streaming<pb::WorkerEvent>,
        commands: mpsc::Sender<Result<pb::Command, Status>>,
    ) {
        let mut me: Option<(u32, u64)> = None;
        let reason = loop {
            let event = match events.next().await {
                Some(Ok(e)) => e,
                Some(Err(status)) => break format!("its session broke ({})", status.message()),
                None => break "it closed its session".to_string(),
            };
            let (rank, generation) = (event.rank, event.generation);
            let mut finished_step = None;
            let mut to_commit = None;
            {
                let mut s = self.state.lock().expect("job state");
                if generation != s.generation {
                    continue;
                }
                let Some(slot) = s.ranks.get_mut(rank as usize).and_then(|r| r.as_mut()) else {
                    continue;
                };
                slot.last_seen = Instant::now();
                match event.event {
                    Some(pb::worker_event::Event::Hello(_)) => {
                        slot.session = Some(commands.clone());
                        me = Some((rank, generation));
                        if let Some(reason) = &s.stop_requested {
                            let stop =
                                pb::command::Command::Stop(pb::Stop { reason: reason.clone() });
                            let _ = commands.try_send(Ok(pb::Command { command: Some(stop) }));
                        }
                    }
                    Some(pb::worker_event::Event::Device(d)) => {
                        tracing::info!(rank, device = %d.device, "worker opened its device");
                        slot.device = d.device;
                    }
                    Some(pb::worker_event::Event::Heartbeat(h)) => {
                        slot.step = slot.step.max(h.step)
                    }
                    Some(pb::worker_event::Event::Step(m)) => {
                        slot.step = m.step;
                        slot.loss = m.loss;
                        slot.tokens_per_s = m.tokens_per_s;
                        slot.device_memory = (m.device_memory_bytes, m.device_memory_total);
                        self.record_metrics(&mut s, rank, m);
                    }
                    Some(pb::worker_event::Event::Log(l)) => {
                        if l.level == "warn" {
                            tracing::warn!(rank, "{}", l.message);
                        } else {
                            tracing::error!(rank, "{}", l.message);
                            slot.last_error = Some((l.message, l.level == "fatal"));
                        }
                    }
                    Some(pb::worker_event::Event::Finished(f)) => {
                        slot.finished = true;
                        slot.step = f.step;
                        if s.ranks.iter().all(|r| r.as_ref().is_some_and(|r| r.finished)) {
                            s.phase = Phase::Finished;
                            finished_step = Some(f.step);
                        }
                    }
                    Some(pb::worker_event::Event::Checkpoint(parts)) => to_commit = Some(parts),
                    None => {}
                }
            }
            if let Some(parts) = to_commit {
                self.commit(rank, generation, parts).await;
            }
            if let Some(step) = finished_step {
                let _ = self.incidents.send(Incident::AllFinished { generation, step });
            }
        };
        if let Some((rank, generation)) = me {
            self.lost(rank, generation, reason);
        }
    }
}

/// The gRPC face of a [`Job`].
#[derive(Clone)]
pub struct Service(pub Arc<Job>);

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let job = &self.0;
        job.check_token(&request)?;
        let req = request.into_inner();
        let mut s = job.state.lock().expect("job state");
        if matches!(s.phase, Phase::Finished | Phase::Failed) || s.generation == 0 {
            return Err(Status::failed_precondition(format!("the job is {}", s.phase.name())));
        }
        let wanted = usize::try_from(req.requested_rank)
            .ok()
            .filter(|&r| r < s.ranks.len() && s.ranks[r].is_none());
        let Some(rank) = wanted.or_else(|| s.ranks.iter().position(Option::is_none)) else {
            return Err(Status::resource_exhausted(format!(
                "all {} ranks of generation {} have joined",
                s.ranks.len(),
                s.generation
            )));
        };
        s.ranks[rank] = Some(Rank {
            host: req.host.clone(),
            device: req.device.clone(),
            step: 0,
            loss: f64::NAN,
            tokens_per_s: 0.0,
            device_memory: (0, 0),
            last_seen: Instant::now(),
            session: None,
            finished: false,
            last_error: None,
        });
        if s.ranks.iter().all(Option::is_some) {
            s.phase = Phase::Rendezvous;
        }
        tracing::info!(rank, host = %req.host, device = %req.device, pid = req.pid, generation = s.generation, "worker joined");
        Ok(Response::new(pb::JoinReply {
            rank: rank as u32,
            world_size: job.config.world_size,
            job_spec_json: job.spec_json.clone(),
            generation: s.generation,
            resume: s.resume,
            resume_step: s.resume_step.unwrap_or(0),
            ring_key: job.ring_key ^ s.generation,
        }))
    }

    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousReply>, Status> {
        let job = &self.0;
        job.check_token(&request)?;
        let req = request.into_inner();
        let mut barrier = job.barrier.subscribe();
        {
            let mut s = job.state.lock().expect("job state");
            if req.generation != s.generation {
                return Err(Status::failed_precondition(format!(
                    "generation {} is over (the job restarted as generation {})",
                    req.generation, s.generation
                )));
            }
            let Some(slot) = s.ring.get_mut(req.rank as usize) else {
                return Err(Status::invalid_argument(format!("rank {} is out of range", req.rank)));
            };
            *slot = Some(req.ring_address.clone());
            if req.rank == 0 {
                // NCCL's bootstrap runs from rank 0's process, so its id is the job's.
                s.nccl_id = req.nccl_unique_id.clone();
            }
            if s.ring.iter().all(Option::is_some) && s.ranks.iter().all(Option::is_some) {
                let addresses: Vec<String> = s.ring.iter().flatten().cloned().collect();
                s.phase = Phase::Running;
                // Heartbeats start with the sessions; nobody is late yet.
                let now = Instant::now();
                s.ranks.iter_mut().flatten().for_each(|r| r.last_seen = now);
                tracing::info!(generation = s.generation, ?addresses, "rendezvous complete");
                job.barrier.send_replace((s.generation, Some((addresses, s.nccl_id.clone()))));
            }
        }
        let (generation, addresses) = barrier
            .wait_for(|(g, a)| *g != req.generation || a.is_some())
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
            .clone();
        let Some((addresses, nccl_id)) = addresses.filter(|_| generation == req.generation) else {
            return Err(Status::aborted(format!(
                "generation {} ended before every rank met (the job restarted)",
                req.generation
            )));
        };
        Ok(Response::new(pb::RendezvousReply {
            ring_addresses: addresses,
            nccl_unique_id: nccl_id,
        }))
    }

    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerEvent>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.0.check_token(&request)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.0.clone().handle_session(request.into_inner(), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.0.check_token(&request)?;
        let snap = self.0.snapshot();
        Ok(Response::new(pb::StatusReply {
            job: snap.job,
            state: snap.state.name().to_string(),
            generation: snap.generation,
            restarts: snap.restarts,
            latest_checkpoint_step: snap.latest_checkpoint_step.unwrap_or(0),
            ranks: snap
                .ranks
                .into_iter()
                .map(|r| pb::RankStatus {
                    rank: r.rank,
                    host: r.host,
                    device: r.device,
                    step: r.step,
                    loss: r.loss,
                    tokens_per_s: r.tokens_per_s,
                    last_seen_s: r.last_seen_s,
                    device_memory_bytes: r.device_memory_bytes,
                    device_memory_total: r.device_memory_total,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::coordinator_server::Coordinator as _;

    fn authorized<T>(job: &Job, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let bearer = format!("Bearer {}", job.token()).parse().unwrap();
        request.metadata_mut().insert("authorization", bearer);
        request
    }

    /// Rank 0's NCCL unique id reaches every rank through the rendezvous, with the ring
    /// addresses, and a new generation forgets it.
    #[tokio::test]
    async fn the_rendezvous_hands_rank_0s_nccl_id_to_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[job]\nrun = {:?}\n[train]\nsteps = 1\n[workers]\ncount = 2\n",
            dir.path().join("run")
        );
        let manifest =
            crate::manifest::Manifest::parse(std::path::Path::new("t.toml"), &text).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let spec = crate::launcher::job_spec(&manifest).unwrap();
        let config = JobConfig { spec, world_size: 2, heartbeat_timeout: Duration::from_secs(30) };
        let (incidents, _rx) = mpsc::unbounded_channel();
        let job = Job::new(config, "secret".into(), 9, incidents);
        let service = Service(job.clone());
        for generation in 1..=2u64 {
            assert_eq!(job.new_generation(false, generation > 1).await, generation);
            for rank in 0..2 {
                let join = pb::JoinRequest {
                    host: "h".into(),
                    device: "cuda".into(),
                    capabilities: vec![],
                    requested_rank: rank,
                    pid: 1,
                };
                service.join(authorized(&job, join)).await.unwrap();
            }
            // Generation 2: rank 0 sends no id (a ring job), so nobody gets one.
            let id: Vec<u8> = if generation == 1 { (0..128).collect() } else { Vec::new() };
            let meet = |rank: u32, id: Vec<u8>| {
                let service = Service(job.clone());
                let request = authorized(
                    &job,
                    pb::RendezvousRequest {
                        rank,
                        generation,
                        ring_address: format!("10.0.0.{rank}:1"),
                        nccl_unique_id: id,
                    },
                );
                async move { service.rendezvous(request).await.unwrap().into_inner() }
            };
            // Rank 1 arrives first and waits for rank 0.
            let (one, zero) = tokio::join!(meet(1, Vec::new()), meet(0, id.clone()));
            for reply in [one, zero] {
                assert_eq!(reply.ring_addresses, ["10.0.0.0:1", "10.0.0.1:1"]);
                assert_eq!(reply.nccl_unique_id, id, "generation {generation}");
            }
        }
    }
}
