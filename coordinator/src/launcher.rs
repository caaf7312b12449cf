//! Runs a job: serves the coordinator, spawns the manifest's workers locally (or waits for
//! them to join, on a cluster), watches them, restarts the job from LATEST when a rank fails
//! (up to `max_restarts`), checkpoints and stops cleanly on Ctrl-C/SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chingu_model::{OptimizerSettings, Positions, Schedule};
use chingu_proto::pb;
use chingu_worker::checkpoint;
use chingu_worker::job::JobSpec;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::manifest::{Backend, CollectiveKind, Manifest};
use crate::service::{Incident, Job, JobConfig, Phase, Service};

/// Environment variable carrying the job token to local workers.
pub const TOKEN_ENV: &str = "CHINGU_JOB_TOKEN";
/// How long workers that reported Finished get to exit before they are killed.
const FINISHED_GRACE: Duration = Duration::from_secs(30);

/// Environment variable carrying a local worker's rank.
pub const RANK_ENV: &str = "CHINGU_RANK";

/// Why a job could not run.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The manifest is wrong.
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    /// The job failed.
    #[error("{0}")]
    Job(String),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job.
    pub manifest: Manifest,
    /// Continue the run from LATEST.
    pub resume: bool,
    /// Spawn the workers here (`chingu launch`); false waits for them to join
    /// (`chingu coordinator`, clusters).
    pub local_workers: bool,
    /// The `chingu` executable the workers run.
    pub exe: PathBuf,
    /// Whether that executable was built with CUDA support (`workers.backend = "cuda"` is
    /// refused up front otherwise, before any worker starts).
    pub cuda_build: bool,
    /// CUDA GPUs on this machine, where known (a CUDA build, not the emulated GPU): local GPU
    /// workers are checked against it before any starts.
    pub local_gpus: Option<usize>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Last step.
    pub step: u64,
    /// Restarts it took.
    pub restarts: u32,
    /// True when it stopped on Ctrl-C/SIGTERM (after a checkpoint) before its last step.
    pub interrupted: bool,
}

/// The job spec of a manifest, with paths made absolute against the current directory.
pub fn job_spec(m: &Manifest) -> Result<JobSpec, LaunchError> {
    let cwd =
        std::env::current_dir().map_err(|e| LaunchError::Job(format!("current directory: {e}")))?;
    let schedule = match m.train.schedule.as_str() {
        "cosine" => Schedule::WarmupCosine {
            warmup: m.train.warmup,
            total: m.train.steps,
            min_ratio: m.train.min_lr_ratio,
        },
        _ => Schedule::Constant,
    };
    Ok(JobSpec {
        name: m.job.name.clone(),
        run: cwd.join(&m.job.run),
        data: cwd.join(&m.data.path),
        preset: m.model.preset.clone(),
        dropout: m.model.dropout,
        positions: m.model.positions.as_deref().map(|p| match p {
            "learned" => Positions::Learned,
            _ => Positions::Sinusoidal,
        }),
        steps: m.train.steps,
        batch_tokens: m.train.batch_tokens,
        accumulate: m.train.accumulate,
        optimizer: OptimizerSettings {
            lr: m.train.lr,
            weight_decay: m.train.weight_decay,
            clip_norm: m.train.clip_norm,
            schedule,
            ..OptimizerSettings::default()
        },
        seed: m.job.seed,
        checkpoint_every: m.checkpoint.every_steps,
        eval_every: m.train.eval_every,
        keep: m.checkpoint.keep,
        threads: m.train.threads,
        backend: m.workers.backend.as_str().to_string(),
        collective: m.workers.collective.as_str().to_string(),
    })
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("OS randomness");
    u64::from_le_bytes(bytes)
}

/// A fresh job token: 128 random bits, hex.
pub fn new_token() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).is_err() {
        tracing::debug!(path = %path.display(), "could not write");
    }
}

/// Refuses a job whose local GPU workers would sum with NCCL while outnumbering this
/// machine's GPUs: worker r takes GPU `r mod GPUs`, so two ranks would share one, which NCCL
/// refuses (after every worker has started and compiled its kernels).
fn check_local_gpus(m: &Manifest, gpus: Option<usize>) -> Result<(), LaunchError> {
    let Some(gpus) = gpus.filter(|&g| g > 0) else { return Ok(()) };
    let count = m.workers.count;
    let on_gpus = matches!(m.workers.backend, Backend::Cuda | Backend::Auto);
    let nccl = m.workers.collective == CollectiveKind::Nccl
        || (m.workers.collective == CollectiveKind::Auto && count > 1);
    if on_gpus && nccl && count > gpus {
        return Err(m
            .error_at(
                "workers.count",
                format!(
                    "{count} GPU workers on a machine with {gpus} GPU(s): two ranks would share a \
                     GPU, which NCCL refuses — set workers.count = {gpus} (raise \
                     train.accumulate to keep the tokens per step), or workers.collective = \
                     \"ring\" to let ranks share GPUs"
                ),
            )
            .into());
    }
    Ok(())
}

/// Serves the job and drives it to the end.
pub async fn run(launch: Launch) -> Result<Outcome, LaunchError> {
    let m = &launch.manifest;
    if m.workers.backend == Backend::Cuda && !launch.cuda_build {
        return Err(m
            .error_at(
                "workers.backend",
                "this build has no CUDA support: rebuild with `--features cuda`, or use \"cpu\" or \"auto\"",
            )
            .into());
    }
    if m.workers.collective == CollectiveKind::Nccl && m.workers.backend == Backend::Cpu {
        return Err(m
            .error_at(
                "workers.collective",
                "NCCL sums GPU buffers: it needs workers.backend = \"cuda\" (or \"auto\" on GPUs); use \"ring\" or \"auto\" on the CPU",
            )
            .into());
    }
    if launch.local_workers {
        check_local_gpus(m, launch.local_gpus)?;
    }
    let spec = job_spec(m)?;
    let has_checkpoints = checkpoint::has_checkpoints(&spec.run);
    if has_checkpoints && !launch.resume {
        return Err(LaunchError::Job(format!(
            "{} already has checkpoints: pass --resume to continue it, or change job.run in {}",
            spec.run.display(),
            m.path.display()
        )));
    }
    let world = m.workers.count as u32;
    let token = new_token();
    let (incident_tx, mut incidents) = mpsc::unbounded_channel();
    let config = JobConfig {
        spec: spec.clone(),
        world_size: world,
        heartbeat_timeout: Duration::from_secs_f64(m.restart.heartbeat_timeout_s),
    };
    let job = Job::new(config, token.clone(), random_u64(), incident_tx);

    let listener = tokio::net::TcpListener::bind(m.coordinator.address).await.map_err(|e| {
        LaunchError::Job(format!(
            "cannot listen on {} (coordinator.address in {}): {e}",
            m.coordinator.address,
            m.path.display()
        ))
    })?;
    let address = listener.local_addr().map_err(|e| LaunchError::Job(e.to_string()))?;
    let url = format!("http://{address}");
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::coordinator_server::CoordinatorServer::new(Service(job.clone())))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = server_stopped.await;
                },
            ),
    );
    write_atomic(
        &spec.run.join("coordinator.json"),
        &serde_json::json!({ "address": url, "pid": std::process::id(), "job": spec.name })
            .to_string(),
    );
    tracing::info!(job = %spec.name, %url, world, run = %spec.run.display(), "coordinator listening");
    if !launch.local_workers {
        tracing::info!("start each worker with: chingu worker --coordinator {url} (job token in {TOKEN_ENV}; printed once below)");
        eprintln!("{TOKEN_ENV}={token}");
    }

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| LaunchError::Job(format!("cannot watch SIGTERM: {e}")))?;
    // Created once: a listener made anew on every loop pass could miss a Ctrl-C in between.
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| LaunchError::Job(format!("cannot watch Ctrl-C: {e}")))?;
    let mut resume = launch.resume && has_checkpoints;
    let mut restart = false;
    let mut stopping = false;
    let every_minutes = m.checkpoint.every_minutes;
    let result = 'generations: loop {
        let generation = job.new_generation(resume, restart).await;
        let mut children: Vec<Child> = Vec::new();
        let (exit_tx, mut exits) = mpsc::unbounded_channel::<(u32, std::process::ExitStatus)>();
        if launch.local_workers {
            for rank in 0..world {
                match spawn_worker(&launch.exe, &url, &token, rank) {
                    Ok(child) => children.push(child),
                    Err(e) => {
                        break 'generations Err(LaunchError::Job(format!(
                            "cannot start worker {rank}: {e}"
                        )))
                    }
                }
            }
            for (rank, child) in children.iter_mut().enumerate() {
                forward_stderr(child, rank as u32);
            }
        }
        let mut watchers = Vec::new();
        for (rank, mut child) in children.drain(..).enumerate() {
            let exit_tx = exit_tx.clone();
            let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
            watchers.push((
                kill_tx,
                tokio::spawn(async move {
                    let status = tokio::select! {
                        status = child.wait() => status,
                        _ = &mut kill_rx => { let _ = child.kill().await; child.wait().await }
                    };
                    if let Ok(status) = status {
                        let _ = exit_tx.send((rank as u32, status));
                    }
                }),
            ));
        }
        drop(exit_tx);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_timed_checkpoint = Instant::now();
        let mut finished: Option<u64> = None;
        let mut exited_ok = 0u32;
        // (reason, fatal): a fatal failure would only repeat after a restart.
        let failure: Option<(String, bool)> = loop {
            tokio::select! {
                Some(incident) = incidents.recv() => match incident {
                    Incident::AllFinished { generation: g, step } if g == generation => {
                        finished = Some(step);
                        if !launch.local_workers || exited_ok == world { break None; }
                    }
                    Incident::RankLost { generation: g, rank, reason, fatal } if g == generation => {
                        break Some((format!("rank {rank}: {reason}"), fatal));
                    }
                    _ => {}
                },
                Some((rank, status)) = exits.recv() => {
                    if status.success() {
                        exited_ok += 1;
                        if exited_ok == world && finished.is_some() { break None; }
                    } else {
                        // Its last words may still be on their way through the session.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let (error, fatal) = job.last_error(rank).unwrap_or_default();
                        let detail = if error.is_empty() { String::new() } else { format!("; its last error: {error}") };
                        break Some((format!("worker {rank} exited with {status}{detail}"), fatal));
                    }
                },
                _ = tick.tick() => {
                    write_atomic(&spec.run.join("status.json"), &serde_json::to_string_pretty(&job.snapshot()).unwrap_or_default());
                    if let Some(&rank) = job.silent_ranks().first() {
                        break Some((format!("rank {rank}: no heartbeat for {:.0} s", m.restart.heartbeat_timeout_s), false));
                    }
                    if every_minutes > 0.0 && last_timed_checkpoint.elapsed().as_secs_f64() >= every_minutes * 60.0 {
                        last_timed_checkpoint = Instant::now();
                        job.broadcast(pb::command::Command::Checkpoint(pb::CheckpointNow {}));
                    }
                },
                _ = sigint.recv() => {
                    if stopping {
                        break Some(("interrupted twice".into(), true));
                    }
                    stopping = true;
                    tracing::warn!("interrupted: checkpointing at the next step, then stopping (Ctrl-C again kills the workers)");
                    job.request_stop("Ctrl-C");
                },
                _ = sigterm.recv(), if !stopping => {
                    stopping = true;
                    tracing::warn!("SIGTERM: checkpointing at the next step, then stopping");
                    job.request_stop("SIGTERM");
                },
            }
        };
        match failure {
            None => {
                // Every rank said it finished; one that then hangs is not waited for long.
                for (kill, mut watcher) in watchers {
                    if tokio::time::timeout(FINISHED_GRACE, &mut watcher).await.is_err() {
                        let _ = kill.send(());
                        let _ = watcher.await;
                    }
                }
                let step = finished.unwrap_or(0);
                if job.latest_step() != Some(step) {
                    job.set_phase(Phase::Failed);
                    break Err(LaunchError::Job(format!(
                        "the workers finished at step {step} but its checkpoint was not committed (LATEST is {:?}); see the coordinator's log, then --resume",
                        job.latest_step()
                    )));
                }
                job.set_phase(Phase::Finished);
                break Ok(Outcome {
                    step: finished.unwrap_or(0),
                    restarts: job.snapshot().restarts,
                    interrupted: stopping && finished.unwrap_or(0) < spec.steps,
                });
            }
            Some((reason, fatal)) => {
                job.broadcast(pb::command::Command::Abort(pb::Abort { reason: reason.clone() }));
                for (kill, watcher) in watchers {
                    let _ = kill.send(());
                    let _ = watcher.await;
                }
                while incidents.try_recv().is_ok() {}
                let restarts = job.snapshot().restarts;
                if fatal || stopping || restarts >= m.restart.max_restarts {
                    job.set_phase(Phase::Failed);
                    let why = if fatal {
                        "(a restart would fail the same way)".to_string()
                    } else if stopping {
                        "while stopping".to_string()
                    } else {
                        format!(
                            "after {restarts} restart(s) (restart.max_restarts = {})",
                            m.restart.max_restarts
                        )
                    };
                    break Err(LaunchError::Job(format!("job failed {why}: {reason}")));
                }
                tracing::warn!(
                    generation,
                    restart = restarts + 1,
                    max_restarts = m.restart.max_restarts,
                    "{reason}; restarting every worker from LATEST"
                );
                resume = checkpoint::has_checkpoints(&spec.run);
                restart = true;
            }
        }
    };
    write_atomic(
        &spec.run.join("status.json"),
        &serde_json::to_string_pretty(&job.snapshot()).unwrap_or_default(),
    );
    // The coordinator's own CPU time (this process; workers are separate processes): the
    // benchmark divides it by the steps to show the coordinator's cost per step.
    if let Some(cpu_s) = own_cpu_seconds() {
        tracing::info!(cpu_s, ok = result.is_ok(), "coordinator done");
    }
    let _ = stop_server.send(());
    let _ = server.await;
    result
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`).
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn spawn_worker(exe: &Path, url: &str, token: &str, rank: u32) -> std::io::Result<Child> {
    Command::new(exe)
        .args(["worker", "--coordinator", url])
        .env(TOKEN_ENV, token)
        .env(RANK_ENV, rank.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Their own process group: a terminal's Ctrl-C reaches only the coordinator, which
        // stops the workers after a checkpoint instead of losing the step in flight.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Copies a worker's stderr to ours, each line prefixed with its rank.
fn forward_stderr(child: &mut Child, rank: u32) {
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[rank {rank}] {line}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(workers: &str) -> Manifest {
        let text = format!(
            "[job]\nname = \"t\"\nrun = \"runs/t\"\n\n[data]\npath = \"prepared\"\n\n\
             [model]\npreset = \"tiny\"\n\n[train]\nsteps = 10\n\n[workers]\n{workers}\n"
        );
        Manifest::parse(Path::new("job.toml"), &text).unwrap()
    }

    #[test]
    fn more_nccl_workers_than_gpus_are_refused_at_the_count() {
        let m = manifest("count = 4\nbackend = \"cuda\"");
        let err = check_local_gpus(&m, Some(2)).unwrap_err().to_string();
        assert!(err.starts_with("job.toml:15:1: "), "the count's line: {err}");
        for expected in
            ["workers.count", "4 GPU workers on a machine with 2 GPU(s)", "workers.count = 2"]
        {
            assert!(err.contains(expected), "{expected:?} missing from: {err}");
        }
        // `auto` sums with NCCL too when the ranks are on GPUs.
        assert!(check_local_gpus(&manifest("count = 3"), Some(2)).is_err());
    }

    #[test]
    fn jobs_that_fit_or_do_not_use_nccl_pass() {
        assert!(check_local_gpus(&manifest("count = 2\nbackend = \"cuda\""), Some(2)).is_ok());
        let ring = manifest("count = 4\nbackend = \"cuda\"\ncollective = \"ring\"");
        assert!(check_local_gpus(&ring, Some(2)).is_ok());
        assert!(check_local_gpus(&manifest("count = 4\nbackend = \"cpu\""), Some(2)).is_ok());
        // No GPU, or a count nobody knows (the emulated GPU): the workers find out themselves.
        let cuda = manifest("count = 4\nbackend = \"cuda\"");
        assert!(check_local_gpus(&cuda, Some(0)).is_ok());
        assert!(check_local_gpus(&cuda, None).is_ok());
    }
}
