//! `chingu launch`, `chingu coordinator`, `chingu worker` and `chingu status`: the
//! data-parallel job from a manifest, each side alone for clusters, and a look at a running job.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chingu_coordinator::launcher::{self, Launch, RANK_ENV, TOKEN_ENV};
use chingu_coordinator::manifest::Manifest;
use chingu_kernels::Cpu;
use chingu_worker::checkpoint;
use chingu_worker::remote::{self, WorkerArgs};

use crate::logging::DeferredLog;

/// `chingu launch` / `chingu coordinator` arguments.
#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// The job manifest (TOML), e.g. deploy/quickstart.toml.
    pub manifest: PathBuf,
    /// Continue the run from its LATEST checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Sample questions to answer at the end (launch only).
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
}

/// `chingu worker` arguments.
#[derive(clap::Args, Debug)]
pub struct WorkerCmdArgs {
    /// Coordinator URL, e.g. http://10.0.0.1:50051. The job token comes from CHINGU_JOB_TOKEN.
    #[arg(long)]
    pub coordinator: String,
    /// Address this worker's gradient ring listens on and advertises to its peers.
    #[arg(long, default_value = "127.0.0.1")]
    pub ring_host: String,
}

/// `chingu status` arguments.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Run directory of the job (reads RUN/status.json, which the coordinator refreshes every
    /// second).
    #[arg(long, default_value = "runs/quickstart")]
    pub run: PathBuf,
    /// Ask a coordinator instead (its Status call; the job token comes from CHINGU_JOB_TOKEN).
    #[arg(long, conflicts_with = "run")]
    pub coordinator: Option<String>,
    /// Redraw every second until the job ends.
    #[arg(long)]
    pub watch: bool,
}

/// Loads a manifest (before logging starts, so its log file can be opened).
pub fn load_manifest(path: &std::path::Path) -> anyhow::Result<Manifest> {
    Ok(Manifest::load(path)?)
}

/// Runs the coordinator, with (`launch`) or without (`coordinator`) local workers.
pub fn run(manifest: Manifest, args: &LaunchArgs, local_workers: bool) -> anyhow::Result<()> {
    if manifest.data.prepare_embedded {
        crate::train_cmd::prepare_embedded(&manifest.data.path)?;
    }
    manifest.check_paths()?;
    let launch = Launch {
        manifest: manifest.clone(),
        resume: args.resume,
        local_workers,
        exe: std::env::current_exe().context("cannot find the chingu executable")?,
        cuda_build: cfg!(feature = "cuda"),
        local_gpus: if local_workers { local_gpu_count() } else { None },
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let outcome = runtime.block_on(launcher::run(launch))?;
    let run_dir = &manifest.job.run;
    if outcome.interrupted {
        println!(
            "stopped at step {} after a checkpoint; continue with: chingu launch {} --resume",
            outcome.step,
            manifest.path.display()
        );
        return Ok(());
    }
    println!(
        "job {} finished at step {} ({} restart(s)); checkpoints in {}",
        manifest.job.name,
        outcome.step,
        outcome.restarts,
        checkpoint::checkpoints_dir(run_dir).display()
    );
    if local_workers && args.samples > 0 {
        if let Some(loaded) = checkpoint::load_latest_model(Cpu::<f32>::new(), run_dir)? {
            crate::eval_cmd::print_samples(&loaded.model, &manifest.data.path, args.samples)?;
        }
    }
    Ok(())
}

/// CUDA GPUs on this machine, where a CUDA build can count them (not with the emulated GPU,
/// which any number of workers share).
fn local_gpu_count() -> Option<usize> {
    #[cfg(feature = "emu")]
    if chingu_kernels::gpu::emu::emulation_requested() {
        return None;
    }
    #[cfg(feature = "cuda")]
    return Some(chingu_kernels::gpu::cuda::CudaDevice::count());
    #[cfg(not(feature = "cuda"))]
    None
}

/// Runs one worker until the job ends for it.
pub fn worker(args: &WorkerCmdArgs, log: &DeferredLog) -> anyhow::Result<()> {
    let token = std::env::var(TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!(
            "{TOKEN_ENV} is not set: a worker needs the job token its coordinator printed at start"
        )
    })?;
    let requested_rank = match std::env::var(RANK_ENV) {
        Ok(r) => Some(r.parse().with_context(|| format!("{RANK_ENV}={r} is not a rank"))?),
        Err(_) => None,
    };
    let worker_args = WorkerArgs {
        coordinator: args.coordinator.clone(),
        token,
        requested_rank,
        ring_host: args.ring_host.clone(),
    };
    let mut on_joined = |joined: &remote::Joined| {
        let path = joined.spec.run.join("logs").join(format!("worker-{}.jsonl", joined.rank));
        if let Err(e) = log.open(&path) {
            tracing::warn!("cannot open {}: {e}", path.display());
        }
    };
    remote::run(&worker_args, &mut on_joined)?;
    Ok(())
}

/// Prints the job's status table (from RUN/status.json).
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let path = args.run.join("status.json");
    loop {
        let (status, age) = match &args.coordinator {
            Some(url) => (status_from_coordinator(url)?, 0.0),
            None => {
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!("{}: no status (has a coordinator run this job?)", path.display())
                })?;
                let status: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", path.display()))?;
                let age = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                (status, age)
            }
        };
        if args.watch {
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", format_status(&status, age));
        let state = status["state"].as_str().unwrap_or("");
        if !args.watch || state == "finished" || state == "failed" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The Status call of a running coordinator, in the shape of RUN/status.json.
fn status_from_coordinator(url: &str) -> anyhow::Result<serde_json::Value> {
    let token = std::env::var(TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("{TOKEN_ENV} is not set: the Status call needs the job token")
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(async {
        let mut client = remote::connect(url, &token).await?;
        client
            .status(chingu_proto::pb::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow::anyhow!("{url}: {}", s.message()))
    })?;
    Ok(serde_json::json!({
        "job": reply.job,
        "state": reply.state,
        "generation": reply.generation,
        "restarts": reply.restarts,
        "latest_checkpoint_step": (reply.latest_checkpoint_step > 0).then_some(reply.latest_checkpoint_step),
        "ranks": reply.ranks.iter().map(|r| serde_json::json!({
            "rank": r.rank, "host": r.host, "device": r.device, "step": r.step,
            "loss": r.loss, "tokens_per_s": r.tokens_per_s, "last_seen_s": r.last_seen_s,
            "device_memory_bytes": r.device_memory_bytes, "device_memory_total": r.device_memory_total,
        })).collect::<Vec<_>>(),
    }))
}

/// The status table. The device column is as wide as its longest name (GPU names are long);
/// memory is the device's in use after the rank's last step, of its size, where known.
pub fn format_status(s: &serde_json::Value, age_s: f64) -> String {
    let mut out = format!(
        "job {}  state {}  generation {}  restarts {}  latest checkpoint {}  (written {:.0} s ago)\n",
        s["job"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        s["generation"],
        s["restarts"],
        s["latest_checkpoint_step"].as_u64().map_or("none".to_string(), |v| format!("step {v}")),
        age_s
    );
    let ranks: Vec<&serde_json::Value> = s["ranks"].as_array().into_iter().flatten().collect();
    let device = |r: &serde_json::Value| r["device"].as_str().unwrap_or("?").to_string();
    let width = ranks.iter().map(|r| device(r).chars().count()).max().unwrap_or(0).max(6);
    let memory = |r: &serde_json::Value| {
        let gib = |key: &str| r[key].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        match r["device_memory_total"].as_u64().unwrap_or(0) {
            0 => "-".to_string(),
            _ => format!("{:.1}/{:.1} GiB", gib("device_memory_bytes"), gib("device_memory_total")),
        }
    };
    out.push_str(&format!(
        "{:>4}  {:<12} {:<width$} {:>8} {:>8} {:>10} {:>15} {:>10}\n",
        "rank", "host", "device", "step", "loss", "tokens/s", "memory", "last seen"
    ));
    for r in ranks {
        out.push_str(&format!(
            "{:>4}  {:<12} {:<width$} {:>8} {:>8.4} {:>10.0} {:>15} {:>9.1}s\n",
            // (Numbers as numbers: a JSON value ignores the column width.)
            r["rank"].as_u64().unwrap_or(0),
            r["host"].as_str().unwrap_or("?"),
            device(r),
            r["step"].as_u64().unwrap_or(0),
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            memory(r),
            r["last_seen_s"].as_f64().unwrap_or(0.0)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_fits_long_device_names_and_shows_memory_where_known() {
        let status = serde_json::json!({
            "job": "j", "state": "running", "generation": 1, "restarts": 0,
            "latest_checkpoint_step": 200,
            "ranks": [
                { "rank": 0, "host": "a", "device": "cuda:0 (NVIDIA GeForce RTX 4090, sm_89)",
                  "step": 10, "loss": 2.5, "tokens_per_s": 1000.0, "last_seen_s": 0.5,
                  "device_memory_bytes": 5u64 << 30, "device_memory_total": 24u64 << 30 },
                { "rank": 1, "host": "b", "device": "cpu", "step": 10, "loss": 2.5,
                  "tokens_per_s": 900.0, "last_seen_s": 0.4 },
            ],
        });
        let table = format_status(&status, 1.0);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[2].contains("5.0/24.0 GiB"), "{table}");
        assert!(lines[3].contains(" - "), "unknown memory shows as -: {table}");
        // Columns line up: the step column starts at the same place in every row.
        let at = |line: &str, what: &str| line.find(what).unwrap() + what.len();
        assert_eq!(at(lines[1], "step"), at(lines[2], "10"), "{table}");
        assert_eq!(at(lines[2], "10"), at(lines[3], "10"), "{table}");
    }
}
