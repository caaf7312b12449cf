//! Training as a user runs it, with real processes: exact resume after SIGKILL, checkpoint
//! corruption fallback, and the plain messages for runs without checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn chingu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chingu"));
    c.env("CHINGU_LOG", "warn");
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
            .join(format!("train-test-data-{}", std::process::id()));
        ok(chingu()
            .args(["prepare", "--progress", "quiet", "--vocab-size", "1000", "--out"])
            .arg(&dir)
            .output()
            .unwrap());
        dir
    })
}

const STEPS: &str = "12";

fn train_args(run: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--steps",
        STEPS,
        "--batch-tokens",
        "384",
        "--checkpoint-every",
        "2",
        "--keep",
        "10",
        "--eval-every",
        "0",
        "--samples",
        "0",
        "--progress",
        "quiet",
        "--dropout",
        "0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--data".into(),
        data().display().to_string(),
        "--run".into(),
        run.display().to_string(),
    ]);
    args
}

fn checkpoint_files(run: &Path, step: u32) -> Vec<Vec<u8>> {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    ["model.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

fn latest_step(run: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(run.join("checkpoints/LATEST")).ok()?;
    text.trim().strip_prefix("step-")?.parse().ok()
}

#[test]
fn sigkill_then_resume_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, interrupted) = (tmp.path().join("reference"), tmp.path().join("interrupted"));
    ok(chingu().args(train_args(&reference)).output().unwrap());

    let mut child = chingu()
        .args(train_args(&interrupted))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while latest_step(&interrupted).unwrap_or(0) < 4 {
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let killed_at = latest_step(&interrupted).unwrap();
    assert!(killed_at < 12, "killed too late to test anything (LATEST = {killed_at})");

    let stderr = chingu()
        .args(train_args(&interrupted))
        .arg("--resume")
        .env("CHINGU_LOG", "info")
        .output()
        .unwrap();
    assert!(stderr.status.success(), "{}", String::from_utf8_lossy(&stderr.stderr));
    assert!(
        String::from_utf8_lossy(&stderr.stderr).contains("resuming from"),
        "{}",
        String::from_utf8_lossy(&stderr.stderr)
    );
    assert_eq!(
        checkpoint_files(&interrupted, 12),
        checkpoint_files(&reference, 12),
        "resumed run differs from the uninterrupted one"
    );
    // Every intermediate checkpoint matches too: equal weights, equal bytes.
    for step in (killed_at + 2..12).step_by(2) {
        assert_eq!(
            checkpoint_files(&interrupted, step),
            checkpoint_files(&reference, step),
            "step {step}"
        );
    }
}

#[test]
fn corrupted_latest_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = train_args(&run);
    args[4] = "4".into(); // --steps 4
    ok(chingu().args(&args).output().unwrap());
    let model = run.join("checkpoints/step-00000004/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap(); // truncated
    let out = chingu()
        .args(["ask", "--run"])
        .arg(&run)
        .arg("안녕")
        .env("CHINGU_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step-00000004/model.safetensors: checksum mismatch"), "{stderr}");
    assert!(stderr.contains("fell back"), "{stderr}");
}

#[test]
fn runs_without_checkpoints_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = chingu().args(["ask", "--run"]).arg(tmp.path()).arg("안녕").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no checkpoint yet: train first"), "{stderr}");
}

#[test]
fn training_into_a_used_run_needs_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = train_args(&run);
    args[4] = "2".into();
    ok(chingu().args(&args).output().unwrap());
    let out = chingu().args(&args).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --resume"));
    let text = ok(chingu()
        .args(["eval", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(data())
        .args(["--limit", "3", "--json"])
        .output()
        .unwrap());
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["step"], 2);
    assert!(report["valid"]["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(report["heldout"]["questions"], 3);
    assert_eq!(report["valid_generation"]["questions"], 3);

    // chat: reads lines until /quit, answers each, keeps history in the run directory.
    let mut child = chingu()
        .args(["chat", "--run"])
        .arg(&run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all("안녕\n/settings\n/quit\n".as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "one answer and the settings: {stdout}");
    assert!(stdout.contains("Greedy"), "{stdout}");
    assert!(std::fs::read_to_string(run.join("chat_history.txt")).unwrap().contains("안녕"));
}
