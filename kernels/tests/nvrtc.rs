//! Every kernel file compiles with NVRTC for every target architecture (compute_80, 86, 89
//! and 90, and compute_90a, what a Hopper GPU compiles them for: there the wgmma kernels are
//! more than a trap) with no error and no warning, and ptxas' resource report (registers, shared
//! memory, spills) per kernel is printed for sm_80..sm_90 (`bench/RESULTS.md` keeps it).
//!
//! Needs libnvrtc on the library path and the CUDA headers (`CHINGU_CUDA_INCLUDE`): `.ci/run`
//! installs both from PyPI and sets `CHINGU_REQUIRE_NVRTC=1`, which turns a missing NVRTC
//! into a failure. Without that variable and without NVRTC the test says so and does nothing.
//! CI runs it twice: with CUDA 13.0's NVRTC (the H100/H200 machines) and with CUDA 12.0's,
//! the oldest 12.x, which RTX 4090 setups often have (`CHINGU_EXPECT_NVRTC_MAJOR` makes sure
//! the intended library was the one loaded).

use chingu_kernels::gpu::{nvrtc, sources};

fn nvrtc_or_skip() -> bool {
    if nvrtc::is_available() {
        return true;
    }
    let required = std::env::var("CHINGU_REQUIRE_NVRTC").as_deref() == Ok("1");
    assert!(
        !required,
        "CHINGU_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (LD_LIBRARY_PATH?)"
    );
    eprintln!("NVRTC not found: kernel compilation not checked (set CHINGU_REQUIRE_NVRTC=1 to require it)");
    false
}

#[test]
fn every_kernel_file_compiles_without_warnings_for_every_architecture() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}, headers from {:?}", nvrtc::include_dirs());
    // CI runs this file once per CUDA major version; a library found elsewhere on the path
    // must not stand in for the one the run is about.
    if let Ok(expected) = std::env::var("CHINGU_EXPECT_NVRTC_MAJOR") {
        assert_eq!(
            major.to_string(),
            expected,
            "CHINGU_EXPECT_NVRTC_MAJOR={expected} but NVRTC {major}.{minor} was loaded"
        );
    }
    assert!(
        !nvrtc::include_dirs().is_empty(),
        "no CUDA include directory with cuda_fp16.h: set CHINGU_CUDA_INCLUDE"
    );
    let mut failures = Vec::new();
    for (file, source) in sources::FILES {
        // And for compute_90a, what a Hopper GPU compiles every file for (wgmma).
        for arch in nvrtc::TARGET_ARCHS.iter().copied().chain(["compute_90a"]) {
            match nvrtc::compile(file, source, arch, &[]) {
                Ok(c) if c.log.is_empty() => {
                    assert!(c.image.len() > 100, "{file} {arch}: empty PTX")
                }
                Ok(c) => {
                    failures.push(format!("{file} for {arch} compiled with messages:\n{}", c.log))
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn resource_report_has_every_kernel_and_no_local_memory() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut table = vec![
        "| kernel | arch | registers | shared (bytes) | stack frame | spill stores | spill loads |"
            .to_string(),
    ];
    table.push("|---|---|---:|---:|---:|---:|---:|".into());
    let mut spills = Vec::new();
    for (file, source) in sources::FILES {
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"] {
            let c = nvrtc::compile(file, source, arch, &["--ptxas-options=-v"])
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.log.to_lowercase().contains("warning"), "{file} {arch}: {}", c.log);
            // ptxas' notes that it serialized the wgmmas (C7515) or had to add a warpgroup
            // arrive around registers a wgmma uses (C7519) are printed as info, not warnings,
            // yet mean the registers' discipline around the products is broken or costly.
            for note in ["C7515", "C7519"] {
                assert!(!c.log.contains(note), "{file} {arch}: ptxas {note}:\n{}", c.log);
            }
            let rows = parse_ptxas(&c.log);
            let names = sources::kernel_names(source);
            for name in &names {
                let row = rows.iter().find(|r| &r.kernel == name).unwrap_or_else(|| {
                    panic!("{file} {arch}: no ptxas report for {name} in:\n{}", c.log)
                });
                // A stack frame is local memory too: an array indexed at run time that the
                // compiler could not keep in registers.
                if row.spill_stores + row.spill_loads + row.stack > 0 {
                    spills.push(format!("{name} {arch}"));
                }
                table.push(format!(
                    "| {} | {arch} | {} | {} | {} | {} | {} |",
                    row.kernel,
                    row.registers,
                    row.shared,
                    row.stack,
                    row.spill_stores,
                    row.spill_loads
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
    if let Some(path) = std::env::var_os("CHINGU_RESOURCE_REPORT") {
        std::fs::write(path, table.join("\n") + "\n").unwrap();
    }
    assert!(spills.is_empty(), "kernels using local memory (spills or a stack frame): {spills:?}");
}

struct PtxasRow {
    kernel: String,
    registers: u32,
    shared: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Reads ptxas' `-v` report: a "Compiling entry function 'NAME'" line, then lines with
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers,
/// … N bytes smem".
fn parse_ptxas(log: &str) -> Vec<PtxasRow> {
    let number_before = |line: &str, word: &str| -> u32 {
        line.find(word)
            .and_then(|at| line[..at].split_whitespace().last().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let mut rows: Vec<PtxasRow> = Vec::new();
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            rows.push(PtxasRow {
                kernel: name,
                registers: 0,
                shared: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(row) = rows.last_mut() {
            if line.contains("spill stores") {
                row.stack = number_before(line, "bytes stack frame");
                row.spill_stores = number_before(line, "bytes spill stores");
                row.spill_loads = number_before(line, "bytes spill loads");
            }
            if line.contains("Used") && line.contains("registers") {
                row.registers = number_before(line, "registers");
                row.shared = number_before(line, "bytes smem");
            }
        }
    }
    rows
}

#[test]
fn compiled_kernels_are_cached_on_disk_and_a_damaged_entry_is_recompiled() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("chingu-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // SAFETY: tests in this binary that read the variable run after it is set (this is the
    // only test touching it).
    unsafe { std::env::set_var("CHINGU_KERNEL_CACHE", &dir) };
    let (file, source) = sources::FILES[0];
    let first = nvrtc::compile_cached(file, source, "compute_80").unwrap();
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one cache entry: {entries:?}");
    assert_eq!(std::fs::read(&entries[0]).unwrap(), first);
    // Served from the cache: a marker appended before the NUL shows it was read back.
    let mut marked = first.clone();
    marked.insert(marked.len() - 1, b'\n');
    std::fs::write(&entries[0], &marked).unwrap();
    assert_eq!(nvrtc::compile_cached(file, source, "compute_80").unwrap(), marked);
    // A truncated entry (no closing NUL) is compiled again and replaced.
    std::fs::write(&entries[0], &first[..first.len() / 2]).unwrap();
    assert_eq!(nvrtc::compile_cached(file, source, "compute_80").unwrap(), first);
    assert_eq!(std::fs::read(&entries[0]).unwrap(), first);
    std::fs::remove_dir_all(&dir).unwrap();
}
