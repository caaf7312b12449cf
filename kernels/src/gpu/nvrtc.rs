//! Compiling the kernel files with NVRTC (feature "cuda"): at start-up for the device's
//! architecture, and in CI for every target architecture with warnings treated as errors.
//!
//! NVRTC has no built-in `cuda_fp16.h`/`mma.h`: the CUDA headers come from
//! `CHINGU_CUDA_INCLUDE` (colon-separated; `.ci/run` points it at the PyPI wheel's
//! `nvidia/cu13/include`), else `$CUDA_HOME/include`, else `/usr/local/cuda/include`.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::result;

use super::sources;
use super::GpuError;

/// The architectures CI compiles every kernel for (A100/RTX 30xx, RTX 30xx/A10, RTX 4090/L4,
/// H100/H200).
pub const TARGET_ARCHS: &[&str] = &["compute_80", "compute_86", "compute_89", "compute_90"];

/// One kernel file compiled for one architecture.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// PTX (for `compute_XY`) or CUBIN bytes (for `sm_XY`), NUL-terminated when PTX.
    pub image: Vec<u8>,
    /// NVRTC's log: empty when there was nothing to say; holds ptxas' resource report when
    /// asked for with `--ptxas-options=-v`.
    pub log: String,
}

/// True when the NVRTC library can be loaded (cudarc panics on first use otherwise).
pub fn is_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn version() -> Result<(i32, i32), GpuError> {
    require()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::Missing(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

fn require() -> Result<(), GpuError> {
    if is_available() {
        Ok(())
    } else {
        Err(GpuError::Missing(
            "NVRTC (libnvrtc.so) was not found on the library path: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// Where the CUDA headers are looked for.
pub fn include_dirs() -> Vec<PathBuf> {
    if let Some(dirs) = std::env::var_os("CHINGU_CUDA_INCLUDE") {
        return std::env::split_paths(&dirs).collect();
    }
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("include"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.into_iter().filter(|d| d.join("cuda_fp16.h").exists()).collect()
}

/// Compiles one kernel file (`#include "common.cuh"` inlined) for `arch` (`compute_XY` gives
/// PTX, `sm_XY` CUBIN) with `extra` NVRTC options.
pub fn compile(file: &str, source: &str, arch: &str, extra: &[&str]) -> Result<Compiled, GpuError> {
    require()?;
    let full = sources::with_common_inlined(source);
    let src = CString::new(full).expect("kernel source has no NUL");
    let name = CString::new(file).expect("file name has no NUL");
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    for dir in include_dirs() {
        options.push(format!("--include-path={}", dir.display()));
    }
    options.extend(extra.iter().map(|s| s.to_string()));
    let fail = |log: String| GpuError::Compile { file: file.into(), arch: arch.into(), log };
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    // SAFETY: `prog` is live until destroyed below; `src`/`name` outlive it.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = log_text(&result::get_program_log(prog).unwrap_or_default());
        let image = match compiled {
            Err(e) => Err(fail(if log.is_empty() { format!("{e:?}") } else { log.clone() })),
            Ok(()) if arch.starts_with("sm_") => cubin(prog).map_err(fail),
            Ok(()) => result::get_ptx(prog)
                .map(|ptx| ptx.iter().map(|&c| c as u8).collect())
                .map_err(|e| fail(format!("{e:?}"))),
        };
        let _ = result::destroy_program(prog);
        image.map(|image| Compiled { image, log })
    };
    outcome
}

/// PTX of one kernel file for `arch` (`compute_XY`), from the on-disk cache when this exact
/// source, architecture and NVRTC version were compiled before, else compiled and cached.
/// The cache is `$CHINGU_KERNEL_CACHE`, else `$XDG_CACHE_HOME/chingu/kernels`, else
/// `~/.cache/chingu/kernels`; entries are written to a temporary name and renamed, so a crash
/// never leaves a half-written one, and an unreadable cache only costs a compilation.
pub fn compile_cached(file: &str, source: &str, arch: &str) -> Result<Vec<u8>, GpuError> {
    let (major, minor) = version()?;
    let full = sources::with_common_inlined(source);
    let key = xxhash_rust::xxh3::xxh3_128(format!("{major}.{minor}\0{arch}\0{full}").as_bytes());
    let path = cache_dir().map(|d| d.join(format!("{file}.{arch}.{key:032x}.ptx")));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if bytes.last() == Some(&0) {
            return Ok(bytes);
        }
    }
    let compiled = compile(file, source, arch, &[])?;
    if let Some(path) = path {
        // A cache that cannot be written only costs a compilation next time.
        let _ = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| super::tune_store::write_new(&path, &compiled.image));
    }
    Ok(compiled.image)
}

/// The kernel cache's directory (see [`compile_cached`]); cuBLASLt's kept tuning choices live
/// in its `cublaslt-tune` (`super::tune_store`).
pub(super) fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CHINGU_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("chingu").join("kernels"))
}

/// CUBIN bytes of a program compiled for a real architecture.
unsafe fn cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    // SAFETY: `prog` was compiled; out-parameter.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| format!("{e:?}"))?;
    let mut bytes = vec![0u8; size];
    // SAFETY: `bytes` holds `size` bytes.
    unsafe { sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| format!("{e:?}"))?;
    Ok(bytes)
}

fn log_text(raw: &[c_char]) -> String {
    if raw.is_empty() {
        return String::new();
    }
    // SAFETY: NVRTC's log is NUL-terminated.
    let text = unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy();
    text.trim().to_string()
}
