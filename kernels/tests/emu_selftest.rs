//! The CUDA emulation layer's own self-test (`kernels/cuda/emu/selftest.cpp`): fp16
//! conversions and arithmetic bit-exact against the compiler's `_Float16`, barriers, warp
//! shuffles and votes, shared memory, WMMA and ldmatrix + mma against naive products, atomics, and the
//! divergent-barrier detector. Built with the system C++ compiler (`CXX`, else `c++`) with
//! warnings as errors, and run; any failed check fails this test.

use std::path::Path;
use std::process::Command;

#[test]
fn emulation_layer_self_test_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/emu");
    let out = tempfile_path("chingu_emu_selftest");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let build = Command::new(&cxx)
        // -Wno-unknown-pragmas: common.cuh's `#pragma unroll`s (NVRTC's), as the kernels build.
        .args(["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"])
        .args(["-pthread", "-o"])
        .arg(&out)
        .arg(dir.join("selftest.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?}: {e}"));
    assert!(
        build.status.success(),
        "selftest.cpp does not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&out).output().expect("run the self-test");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let _ = std::fs::remove_file(&out);
    assert!(
        run.status.success(),
        "emulation self-test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = stdout.lines().rev().find(|l| l.contains("passed")).unwrap_or("");
    assert!(summary.contains(" 0 failed"), "no clean summary line in:\n{stdout}");
    let passed: usize = summary.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or(0);
    assert!(passed >= 40, "only {passed} checks ran:\n{stdout}");
}

fn tempfile_path(stem: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{stem}-{}", std::process::id()))
}
