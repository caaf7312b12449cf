//! The helper scripts users run by hand: `scripts/nccl-link` finds a `libnccl.so.2` and makes
//! the `libnccl.so` link cudarc loads NCCL by, printing the directory to put on
//! LD_LIBRARY_PATH.

use std::path::Path;
use std::process::Command;

#[test]
fn nccl_link_makes_the_link_cudarc_looks_for() {
    let tmp = tempfile::tempdir().unwrap();
    // A stand-in for NCCL's wheel directory, found through LD_LIBRARY_PATH.
    let wheel = tmp.path().join("site-packages/nvidia/nccl/lib");
    std::fs::create_dir_all(&wheel).unwrap();
    std::fs::write(wheel.join("libnccl.so.2"), b"not really a library").unwrap();
    let dest = tmp.path().join("link");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nccl-link");
    let run = || {
        Command::new("bash")
            .arg(&script)
            .arg(&dest)
            .env("LD_LIBRARY_PATH", &wheel)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), dest.to_str().unwrap());
    let link = dest.join("libnccl.so");
    let target = std::fs::read_link(&link).unwrap();
    // Ours, unless this machine has a real NCCL where the script looks first (Python's).
    assert_eq!(target.file_name().unwrap(), "libnccl.so.2", "{}", target.display());
    assert!(std::fs::metadata(&link).unwrap().is_file(), "the link resolves to a file");

    // Run again: the link is replaced, not duplicated or failed on.
    let again = run();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
}
