//! Data-parallel jobs as a user launches them, with real processes on loopback: two workers
//! equal one worker accumulating two micro-batches bit for bit, a SIGKILLed worker is
//! restarted from LATEST and the job ends with the bytes of an uninterrupted run, a SIGKILLed
//! coordinator is continued by `launch --resume` with the same result, a silent (stopped)
//! worker is caught by the heartbeat timeout, and wrong tokens and bad manifests are refused.

mod common;

use common::tensors;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn chingu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chingu"));
    c.env("CHINGU_LOG", "info");
    c
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "chingu failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The embedded corpus, prepared once for all tests in this file.
fn data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("launch-test-data-{}", std::process::id()));
        ok(chingu()
            .args(["prepare", "--progress", "quiet", "--vocab-size", "1000", "--out"])
            .arg(&dir)
            .output()
            .unwrap());
        dir
    })
}

struct Job {
    workers: usize,
    batch_tokens: usize,
    accumulate: usize,
    steps: u64,
    every: u64,
    heartbeat_s: f64,
}

const SMALL: Job =
    Job { workers: 2, batch_tokens: 384, accumulate: 1, steps: 12, every: 4, heartbeat_s: 30.0 };
const LONG: Job =
    Job { workers: 2, batch_tokens: 384, accumulate: 1, steps: 100, every: 10, heartbeat_s: 30.0 };

/// Writes a manifest for `job` into `dir` (run directory `dir/run`).
fn manifest(dir: &Path, job: &Job) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("job.toml");
    let text = format!(
        "[job]\nname = \"test\"\nrun = \"{run}\"\nseed = 7\n\n[data]\npath = \"{data}\"\n\n\
         [model]\npreset = \"tiny\"\ndropout = 0.1\n\n\
         [train]\nsteps = {steps}\nbatch_tokens = {bt}\naccumulate = {acc}\neval_every = 0\nthreads = 1\n\n\
         [workers]\ncount = {workers}\nbackend = \"cpu\"\n\n\
         [checkpoint]\nevery_steps = {every}\nkeep = 50\n\n\
         [restart]\nmax_restarts = 2\nheartbeat_timeout_s = {hb}\n",
        run = dir.join("run").display(),
        data = data().display(),
        steps = job.steps,
        bt = job.batch_tokens,
        acc = job.accumulate,
        workers = job.workers,
        every = job.every,
        hb = job.heartbeat_s,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(manifest: &Path, resume: bool) -> Output {
    let mut c = chingu();
    c.args(["launch", "--samples", "0"]).arg(manifest);
    if resume {
        c.arg("--resume");
    }
    c.output().unwrap()
}

fn spawn_launch(manifest: &Path) -> Child {
    chingu()
        .args(["launch", "--samples", "0"])
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn latest(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoints/LATEST")).ok()?;
    text.trim().strip_prefix("step-")?.parse().ok()
}

fn wait_for_latest(run: &Path, at_least: u64, child: &mut Child) {
    let start = Instant::now();
    while latest(run).is_none_or(|s| s < at_least) {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before step {at_least}");
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint {at_least} in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Worker pids by rank, from the coordinator's JSON log (the newest generation wins).
fn worker_pids(run: &Path) -> Vec<(u64, u32)> {
    let text = std::fs::read_to_string(run.join("logs/coordinator.jsonl")).unwrap_or_default();
    let mut pids = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["fields"]["message"] == "worker joined" {
            pids.push((
                v["fields"]["rank"].as_u64().unwrap(),
                v["fields"]["pid"].as_u64().unwrap() as u32,
            ));
        }
    }
    pids
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// An uninterrupted LONG run, computed once.
fn reference() -> &'static Vec<Vec<u8>> {
    static BYTES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("launch-ref-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ok(launch(&manifest(&dir, &LONG), false));
        tensors(&dir.join("run"), LONG.steps)
    })
}

#[test]
fn two_workers_equal_one_worker_accumulating_two_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let two = tmp.path().join("two");
    let one = tmp.path().join("one");
    let plain = tmp.path().join("plain");
    ok(launch(&manifest(&two, &SMALL), false));
    ok(launch(&manifest(&one, &Job { workers: 1, accumulate: 2, ..SMALL }), false));
    ok(launch(&manifest(&plain, &Job { workers: 1, ..SMALL }), false));
    let (a, b) = (tensors(&two.join("run"), SMALL.steps), tensors(&one.join("run"), SMALL.steps));
    assert!(a[0] == b[0], "model differs between 2 workers x 1 batch and 1 worker x 2 batches");
    assert!(
        a[1] == b[1],
        "optimizer state differs between 2 workers x 1 batch and 1 worker x 2 batches"
    );
    // Not vacuous: one worker with a single batch per step trains another model.
    assert!(tensors(&plain.join("run"), SMALL.steps)[0] != a[0]);
    // The coordinator aggregated a metrics line per step with both ranks in it.
    let metrics = std::fs::read_to_string(two.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), SMALL.steps as usize);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["tokens_per_s_by_rank"].as_array().unwrap().len(), 2);
    assert!(first["loss"].as_f64().unwrap() > 0.0);
    // Each rank told the coordinator which device it opened.
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("run/status.json")).unwrap())
            .unwrap();
    let devices: Vec<&str> =
        status["ranks"].as_array().unwrap().iter().map(|r| r["device"].as_str().unwrap()).collect();
    assert_eq!(devices, ["cpu", "cpu"], "{status}");
    for log in ["coordinator.jsonl", "worker-0.jsonl", "worker-1.jsonl"] {
        assert!(
            std::fs::metadata(two.join("run/logs").join(log)).unwrap().len() > 0,
            "{log} is empty"
        );
    }
    // The run is an ordinary run for the other commands.
    let table = ok(chingu().arg("status").arg("--run").arg(two.join("run")).output().unwrap());
    assert!(table.contains("state finished"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.trim_start().starts_with(['0', '1'])).count(),
        2,
        "{table}"
    );
    // (12 steps teach no answers; loading and generating from the launched run must work.)
    ok(chingu()
        .args(["ask", "--run"])
        .arg(two.join("run"))
        .arg("3에 4를 더하면 얼마예요?")
        .output()
        .unwrap());
}

#[test]
fn sigterm_checkpoints_and_stops_then_resume_ends_bit_identical() {
    let expected = reference();
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &LONG);
    let run = tmp.path().join("run");
    let mut child = spawn_launch(&m);
    wait_for_latest(&run, 20, &mut child);
    signal(child.id(), "-TERM");
    let stdout = ok(child.wait_with_output().unwrap());
    assert!(stdout.contains("stopped at step"), "{stdout}");
    let stopped = latest(&run).unwrap();
    assert!((20..LONG.steps).contains(&stopped), "stopped at {stopped}");
    ok(launch(&m, true));
    assert!(
        &tensors(&run, LONG.steps) == expected,
        "final checkpoint differs from the uninterrupted run"
    );
}

#[test]
fn sigkilled_worker_is_restarted_and_the_job_ends_bit_identical() {
    let expected = reference();
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &LONG);
    let run = tmp.path().join("run");
    let mut child = spawn_launch(&m);
    wait_for_latest(&run, 30, &mut child);
    let (_, pid) = *worker_pids(&run).iter().find(|(rank, _)| *rank == 1).unwrap();
    signal(pid, "-KILL");
    let out = child.wait_with_output().unwrap();
    let stdout = ok(out);
    assert!(stdout.contains("1 restart(s)"), "{stdout}");
    assert!(
        &tensors(&run, LONG.steps) == expected,
        "final checkpoint differs from the uninterrupted run"
    );
}

#[test]
fn sigkilled_coordinator_is_continued_by_resume_bit_identical() {
    let expected = reference();
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &LONG);
    let run = tmp.path().join("run");
    let mut child = spawn_launch(&m);
    wait_for_latest(&run, 30, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    // The orphaned workers notice and exit on their own.
    let start = Instant::now();
    for (_, pid) in worker_pids(&run) {
        while Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "worker {pid} outlived its coordinator"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let refused = launch(&m, false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    ok(launch(&m, true));
    assert!(
        &tensors(&run, LONG.steps) == expected,
        "final checkpoint differs from the uninterrupted run"
    );
}

#[test]
fn stopped_worker_is_caught_by_the_heartbeat_timeout() {
    let expected = reference();
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &Job { heartbeat_s: 3.0, ..LONG });
    let run = tmp.path().join("run");
    let mut child = spawn_launch(&m);
    wait_for_latest(&run, 20, &mut child);
    let (_, pid) = *worker_pids(&run).iter().find(|(rank, _)| *rank == 0).unwrap();
    signal(pid, "-STOP");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = ok(out);
    assert!(stdout.contains("1 restart(s)"), "{stdout}");
    assert!(stderr.contains("no heartbeat"), "{stderr}");
    assert!(
        &tensors(&run, LONG.steps) == expected,
        "final checkpoint differs from the uninterrupted run"
    );
}

#[test]
fn wrong_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let mut coordinator = chingu()
        .arg("coordinator")
        .arg(&m)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let info = tmp.path().join("run/coordinator.json");
    let start = Instant::now();
    while !info.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
    let out = chingu()
        .args(["worker", "--coordinator", url["address"].as_str().unwrap()])
        .env("CHINGU_JOB_TOKEN", "not-the-token")
        .output()
        .unwrap();
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong or missing job token"), "{stderr}");
    let log = std::fs::read_to_string(tmp.path().join("run/logs/coordinator.jsonl")).unwrap();
    assert!(log.contains("rejected a call with a wrong or missing job token"));
}

#[test]
fn bad_manifests_are_refused_with_their_location() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let text =
        std::fs::read_to_string(&m).unwrap().replace("eval_every = 0", "eval_every = 0\nstpes = 3");
    std::fs::write(&m, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("stpes")).unwrap() + 1;
    let out = launch(&m, false);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("job.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("stpes"), "{stderr}");
    assert!(!tmp.path().join("run/logs").exists(), "nothing may start for a bad manifest");
}

/// `workers.backend = "cuda"` on this machine (no GPU): a build without CUDA support refuses
/// the manifest at its line before anything starts; a CUDA build's worker reports that it
/// found no device and the job fails at once, without restarts.
#[test]
fn a_cuda_job_without_a_gpu_fails_at_once_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let text =
        std::fs::read_to_string(&m).unwrap().replace("backend = \"cpu\"", "backend = \"cuda\"");
    std::fs::write(&m, &text).unwrap();
    let out = launch(&m, false);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("backend")).unwrap() + 1;
    let refused =
        stderr.contains(&format!("job.toml:{line}:")) && stderr.contains("no CUDA support");
    let no_device = stderr.contains("no CUDA driver or device found")
        && stderr.contains("a restart would fail the same way");
    assert!(refused || no_device, "{stderr}");
    assert!(!stderr.contains("restarting every worker"), "{stderr}");
}

#[test]
fn nccl_on_cpu_workers_is_refused_with_the_key_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("backend = \"cpu\"", "backend = \"cpu\"\ncollective = \"nccl\"");
    std::fs::write(&m, &text).unwrap();
    let out = launch(&m, false);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("collective")).unwrap() + 1;
    assert!(stderr.contains(&format!("job.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("NCCL sums GPU buffers"), "{stderr}");
}

#[test]
fn a_deterministic_failure_fails_the_job_without_restarting() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let text =
        std::fs::read_to_string(&m).unwrap().replace("eval_every = 0", "eval_every = 0\nlr = 1e9");
    std::fs::write(&m, text).unwrap();
    let out = launch(&m, false);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a restart would fail the same way"), "{stderr}");
    assert!(stderr.contains("NaN"), "{stderr}");
    assert!(!stderr.contains("restarting every worker"), "{stderr}");
}

#[test]
fn timed_checkpoints_change_nothing_but_the_files() {
    let expected = reference();
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &LONG);
    // No step-based checkpoints; one every 0.6 s instead (at whatever step the ranks agree on).
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace(&format!("every_steps = {}", LONG.every), "every_steps = 0\nevery_minutes = 0.01");
    std::fs::write(&m, text).unwrap();
    ok(launch(&m, false));
    let run = tmp.path().join("run");
    let steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    assert!(steps.len() >= 2, "expected timed checkpoints besides the last, got {steps:?}");
    assert!(&tensors(&run, LONG.steps) == expected, "timed checkpoints changed the training");
}

#[test]
fn coordinator_and_workers_started_separately_run_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), &SMALL);
    let mut coordinator = chingu()
        .arg("coordinator")
        .arg(&m)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The coordinator prints the job token once, for the operator to hand to the workers.
    let mut stderr = std::io::BufReader::new(coordinator.stderr.take().unwrap());
    let mut token = String::new();
    let mut line = String::new();
    while token.is_empty() {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "no token printed"
        );
        if let Some(t) = line.trim().strip_prefix("CHINGU_JOB_TOKEN=") {
            token = t.to_string();
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("run/coordinator.json")).unwrap(),
    )
    .unwrap();
    let url = info["address"].as_str().unwrap().to_string();
    let workers: Vec<Child> = (0..2)
        .map(|_| {
            chingu()
                .args(["worker", "--coordinator", &url])
                .env("CHINGU_JOB_TOKEN", &token)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    assert!(coordinator.wait().unwrap().success());
    // Same job as the launched two-worker run: same bytes.
    let launched = tmp.path().join("launched");
    ok(launch(&manifest(&launched, &SMALL), false));
    assert!(
        tensors(&tmp.path().join("run"), SMALL.steps)
            == tensors(&launched.join("run"), SMALL.steps)
    );
}
