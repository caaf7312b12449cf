//! A launched job on GPU workers (`workers.backend = "cuda"`), run without a GPU: the worker
//! process trains on the CUDA kernels emulated on the CPU (`CHINGU_EMULATED_GPU=1`). The job
//! trains in fp16 with loss scaling and commits its checkpoints through the coordinator; a GPU
//! that runs out of memory (`CHINGU_EMU_MEMORY_MIB`) fails the job at once — no restart —
//! with the worker's message saying what to lower.
//!
//! Needs the `emu` feature (`cargo test --features emu --test launch_gpu_emulated`, as
//! `.ci/run` does): without it this build has no GPU workers at all.
#![cfg(feature = "emu")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

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
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("job.toml");
    let text = format!(
        "[job]\nname = \"gpu\"\nrun = \"{run}\"\nseed = 7\n\n[data]\npath = \"{data}\"\n\n\
         [model]\npreset = \"tiny\"\n\n\
         [train]\nsteps = 4\nbatch_tokens = 256\neval_every = 0\nthreads = 1\n\n\
         [workers]\ncount = 1\nbackend = \"cuda\"\n\n\
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

#[test]
fn a_launched_gpu_job_trains_in_mixed_precision_and_commits_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (out, text) = launch(&manifest(dir.path()), None);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("device=emu (CUDA emulated on the CPU)"), "{text}");
    assert!(text.contains("finished at step 4 (0 restart(s))"), "{text}");
    let checkpoints = dir.path().join("run/checkpoints");
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
