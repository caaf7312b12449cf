//! A launched job on GPU workers (`workers.backend = "cuda"`), run without a GPU: the worker
//! process trains on the CUDA kernels emulated on the CPU (`CHINGU_EMULATED_GPU=1`). The job
//! trains in fp16 with loss scaling, commits its checkpoints through the coordinator and
//! reports its device memory (metrics, status); a
//! SIGKILLed GPU worker is restarted from LATEST and the job ends with the bytes of an
//! unbroken run; a GPU that runs out of memory (`CHINGU_EMU_MEMORY_MIB`) fails the job at once
//! — no restart — with the worker's message saying what to lower. Two GPU workers summing
//! through the TCP ring equal one accumulating their two micro-batches, bit for bit. A
//! checkpoint is evaluated and asked on the GPU backend as on the CPU (`--device cuda`).
//! `chingu gpu` lists the settings that tune GPU work.
//!
//! Needs the `emu` feature (`cargo test --features emu --test launch_gpu_emulated`, as
//! `.ci/run` does): without it this build has no GPU workers at all.
#![cfg(feature = "emu")]

mod common;

use common::tensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn chingu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chingu"));
    c.env("CHINGU_LOG", "info").env("CHINGU_EMULATED_GPU", "1").env_remove("CHINGU_EMU_MEMORY_MIB");
    c
}

/// The embedded corpus, prepared once for all tests in this file.
fn data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("launch-gpu-test-data-{}", std::process::id()));
        let out = chingu()
            .args(["prepare", "--progress", "quiet", "--vocab-size", "1000", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "prepare failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

/// A 4-step `tiny` job on one GPU worker, checkpoints every 2 steps, 2 restarts allowed.
fn manifest(dir: &Path) -> PathBuf {
    manifest_with(dir, 1, 1)
}

/// The same job on `workers` GPU workers summing through the TCP ring, each accumulating
/// `accumulate` micro-batches a step.
fn manifest_with(dir: &Path, workers: usize, accumulate: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("job.toml");
    let text = format!(
        "[job]\nname = \"gpu\"\nrun = \"{run}\"\nseed = 7\n\n[data]\npath = \"{data}\"\n\n\
         [model]\npreset = \"tiny\"\n\n\
         [train]\nsteps = 4\nbatch_tokens = 256\naccumulate = {accumulate}\neval_every = 0\nthreads = 1\n\n\
         [workers]\ncount = {workers}\nbackend = \"cuda\"\ncollective = \"ring\"\n\n\
         [checkpoint]\nevery_steps = 2\nkeep = 5\n\n\
         [restart]\nmax_restarts = 2\nheartbeat_timeout_s = 60\n",
        run = dir.join("run").display(),
        data = data().display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(manifest: &Path, memory_mib: Option<u32>) -> (Output, String) {
    let mut c = chingu();
    c.args(["launch", "--samples", "0"]).arg(manifest);
    if let Some(mib) = memory_mib {
        c.env("CHINGU_EMU_MEMORY_MIB", mib.to_string());
    }
    let out = c.output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

/// The unbroken job (4 steps), run once for the tests that compare with it: its directory
/// and its launch's output.
fn unbroken() -> &'static (PathBuf, String) {
    static RUN: OnceLock<(PathBuf, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("launch-gpu-unbroken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A memory size, so the device reports its use (the limit changes no result).
        let (out, text) = launch(&manifest(&dir), Some(4096));
        assert!(out.status.success(), "{text}");
        (dir, text)
    })
}

#[test]
fn a_launched_gpu_job_trains_in_mixed_precision_and_commits_its_checkpoints() {
    let (dir, text) = unbroken();
    assert!(text.contains("device=emu (CUDA emulated on the CPU)"), "{text}");
    assert!(text.contains("finished at step 4 (0 restart(s))"), "{text}");
    // The worker logged its device memory after the first step.
    assert!(text.contains("device memory:") && text.contains("GiB in use after step 1"), "{text}");
    let checkpoints = dir.join("run/checkpoints");
    assert_eq!(
        std::fs::read_to_string(checkpoints.join("LATEST")).unwrap().trim(),
        "step-00000004"
    );
    // The loss scaler's state is in the checkpoint: the step ran on the fp16 GPU backend.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoints.join("step-00000004/state.json")).unwrap(),
    )
    .unwrap();
    let scale = state["loss_scaler"]["scale"].as_f64().expect("a loss scale in a GPU checkpoint");
    assert!(scale >= 1.0, "{state}");
    // The rank's device memory reaches the metrics, the status file and `chingu status`.
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let used = first["device_memory_bytes_by_rank"][0].as_u64().unwrap();
    assert!(used > 0 && used < 4096 << 20, "{first}");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap())
            .unwrap();
    assert_eq!(status["ranks"][0]["device_memory_total"].as_u64(), Some(4096 << 20), "{status}");
    let table = chingu().arg("status").arg("--run").arg(dir.join("run")).output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("/4.0 GiB"), "{table}");
    assert!(table.contains("emu (CUDA emulated on the CPU)"), "{table}");
}

#[test]
fn a_gpu_out_of_memory_fails_the_job_at_once_with_what_to_lower() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB holds the tiny model and its optimizer (~12 MiB), not a step's activations.
    let (out, text) = launch(&manifest(dir.path()), Some(16));
    assert!(!out.status.success(), "{text}");
    for expected in [
        "job failed (a restart would fail the same way)",
        "out of device memory",
        "of 16.0 MiB in use",
        "256 tokens now",
        "train.batch_tokens",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    assert!(!text.contains("generation=2"), "the job restarted:\n{text}");
    assert!(!dir.path().join("run/checkpoints/LATEST").exists(), "{text}");
}

#[test]
fn a_killed_gpu_worker_restarts_from_latest_and_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut job = chingu()
        .args(["launch", "--samples", "0"])
        .arg(manifest(dir.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the worker once the step-2 checkpoint is committed (steps take seconds emulated).
    let start = Instant::now();
    while std::fs::read_to_string(run.join("checkpoints/LATEST"))
        .map_or(true, |l| l.trim() != "step-00000002")
    {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before its step-2 checkpoint");
        assert!(start.elapsed() < Duration::from_secs(300), "no step-2 checkpoint in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(run.join("logs/coordinator.jsonl")).unwrap();
    let pid = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == "worker joined")
        .and_then(|v| v["fields"]["pid"].as_u64())
        .expect("the coordinator logged the worker's pid");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let out = job.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the job did not recover from the killed worker:\n{text}");
    assert!(text.contains("finished at step 4 (1 restart(s))"), "{text}");
    let reference = tensors(&unbroken().0.join("run"), 4);
    let resumed = tensors(&run, 4);
    assert!(resumed[0] == reference[0], "model differs from the unbroken GPU run");
    assert!(resumed[1] == reference[1], "optimizer state differs from the unbroken GPU run");
}

#[test]
fn two_gpu_workers_on_the_ring_equal_one_accumulating_two_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    for (dir, workers, accumulate) in [(&two, 2, 1), (&one, 1, 2)] {
        let (out, text) = launch(&manifest_with(dir, workers, accumulate), None);
        assert!(out.status.success(), "{workers} worker(s):\n{text}");
    }
    let (a, b) = (tensors(&two.join("run"), 4), tensors(&one.join("run"), 4));
    assert!(a[0] == b[0], "model differs between 2 GPU workers x 1 batch and 1 x 2 batches");
    assert!(a[1] == b[1], "optimizer state differs between 2 GPU workers and 1 accumulating 2");
    // Not vacuous: one worker with one batch a step trains another model.
    assert!(tensors(&unbroken().0.join("run"), 4)[0] != a[0]);
}

/// A run trained on the CPU on a small Q/A corpus (120 pairs, so its valid split is a handful
/// and the emulated GPU scores it quickly), long enough to answer with confidence: its
/// directory (the prepared data in `data/`, the run in `run/`).
fn small_cpu_run() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("eval-gpu-small-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut csv = String::from("Q,A,label\n");
        for i in 0..120 {
            csv += &format!("{i} 더하기 {}는?,{}이에요.,0\n", i % 7, i + i % 7);
        }
        std::fs::write(dir.join("pairs.csv"), csv).unwrap();
        let run = |args: &[&str]| {
            let out = chingu().current_dir(&dir).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "prepare",
            "pairs.csv",
            "--out",
            "data",
            "--vocab-size",
            "512",
            "--progress",
            "quiet",
        ]);
        run(&[
            "train",
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--steps",
            "150",
            "--data",
            "data",
            "--run",
            "run",
            "--samples",
            "0",
            "--progress",
            "quiet",
            "--lr",
            "3e-3",
            "--warmup",
            "20",
        ]);
        dir
    })
}

/// `chingu eval --json` on `device` (the GPU one emulated): the parsed report and stderr.
fn eval_on(device: &str) -> (serde_json::Value, String) {
    let dir = small_cpu_run();
    let out = chingu()
        .current_dir(dir)
        .args(["eval", "--run", "run", "--data", "data", "--json", "--limit", "4", "--device"])
        .arg(device)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "eval --device {device}: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// A checkpoint is scored and answers on the GPU backend (here emulated) as on the CPU: the
/// same valid loss to fp16's precision (0.2%), the same generation scores (exact match and
/// chrF over the valid questions) and the same answer to a question.
#[test]
fn a_checkpoint_is_evaluated_and_asked_on_the_gpu_as_on_the_cpu() {
    let (gpu, gpu_log) = eval_on("cuda");
    let (cpu, cpu_log) = eval_on("cpu");
    assert!(gpu_log.contains("run emulated on the CPU"), "{gpu_log}");
    assert!(!cpu_log.contains("emulated"), "{cpu_log}");
    let loss = |v: &serde_json::Value| v["valid"]["loss"].as_f64().unwrap();
    let (g, c) = (loss(&gpu), loss(&cpu));
    assert!(c > 0.0 && (g - c).abs() <= 2e-3 * c, "valid loss on the GPU {g}, on the CPU {c}");
    let answers = &gpu["valid_generation"];
    assert!(answers["questions"].as_u64().unwrap() > 0, "{gpu}");
    assert_eq!(answers["exact"], cpu["valid_generation"]["exact"], "{gpu}\n{cpu}");
    assert_eq!(answers["chrf"], cpu["valid_generation"]["chrf"], "{gpu}\n{cpu}");

    let ask = |device: &str| {
        let out = chingu()
            .current_dir(small_cpu_run())
            .args(["ask", "--run", "run", "--device", device, "5 더하기 5는?"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let answer = ask("cuda");
    assert!(!answer.trim().is_empty());
    assert_eq!(answer, ask("cpu"));
}

/// `chingu gpu` ends with the environment variables that tune GPU work and their values here,
/// whatever it found of a driver (this machine may have none).
#[test]
fn chingu_gpu_lists_the_settings_that_tune_gpu_work() {
    let out = chingu()
        .env("CHINGU_ATTN", "gemm")
        .env("CHINGU_ATTN_SAVE_PROBS", "0")
        .env("CHINGU_BIAS_GRAD_EPILOGUE", "1")
        .env_remove("CHINGU_PROFILE")
        .arg("gpu")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |name: &str| {
        let found = text.lines().find(|l| l.split_whitespace().next() == Some(name));
        found.unwrap_or_else(|| panic!("no {name} line in:\n{text}")).to_string()
    };
    assert!(line("CHINGU_ATTN").contains(" gemm "), "{text}");
    assert!(line("CHINGU_ATTN_SAVE_PROBS").contains(" 0 "), "{text}");
    assert!(line("CHINGU_BIAS_GRAD_EPILOGUE").contains(" 1 "), "{text}");
    assert!(line("CHINGU_PROFILE").contains(" unset "), "{text}");
    for name in [
        "CHINGU_ATTN_PIPELINE",
        "CHINGU_ATTN_WARPS",
        "CHINGU_ATTN_SCORES",
        "CHINGU_ATTN_CAUSAL_BAND",
        "CHINGU_LN_BACKWARD_BLOCKS",
        "CHINGU_GELU_EPILOGUE",
        "CHINGU_GEMM_TUNE",
        "CHINGU_GEMM_TUNE_CANDIDATES",
        "CHINGU_GEMM_TUNE_ARRAYS",
        "CHINGU_GEMM_ARRAYS",
        "CHINGU_GEMM_WEIGHT_GRAD_BATCH",
        "CHINGU_KERNEL_CACHE",
    ] {
        line(name);
    }
}

/// `CHINGU_PROFILE=events chingu bench-train --device cuda` prints where a step's time goes,
/// GPU kernel by kernel (the emulated device has no events, so its launches are timed by the
/// host's clock, as with `1`): the table names kernels, products and the fused bias gradient,
/// and its calls a step are the step's own (every launch once per profiled step).
#[test]
fn bench_train_profiles_a_gpu_step_kernel_by_kernel() {
    let out = chingu()
        .env("CHINGU_PROFILE", "events")
        .env_remove("CHINGU_BIAS_GRAD_EPILOGUE")
        .args(["bench-train", "--device", "cuda", "--preset", "tiny", "--vocab", "300"])
        .args(["--batch", "2", "--src-len", "8", "--tgt-len", "8", "--steps", "1", "--warmup", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-train failed: {err}");
    assert!(
        err.contains("3 steps") && err.contains("GPU launches timed by device events"),
        "{err}"
    );
    let row = |name: &str| {
        err.lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("no {name} row in:\n{err}"))
            .to_string()
    };
    for kernel in ["adamw_multi_f32", "cross_entropy", "layernorm_forward", "embedding_forward_f16"]
    {
        row(kernel);
    }
    // One optimizer launch a step: the table is per step, over the 3 profiled steps.
    let adamw = row("adamw_multi_f32");
    let calls: Vec<&str> = adamw.split('|').map(str::trim).collect();
    assert_eq!(calls[2], "1", "{err}");
    // The linear layers' weight gradients, their bias gradients in kernels of their own (the
    // default: CHINGU_BIAS_GRAD_EPILOGUE=1 sums them in the product instead).
    row("gemm (linear_backward)");
    row("bias_backward");
    assert!(!err.contains("+ Σ rows of op(A)"), "{err}");
}
