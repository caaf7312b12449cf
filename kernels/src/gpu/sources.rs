//! The kernel sources, embedded in the binary so a GPU build compiles them at start-up with
//! NVRTC for the device's architecture (no toolkit, no files to find at run time).

/// The shared header every kernel file includes.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// Every kernel file: (file name, source).
pub const FILES: &[(&str, &str)] = &[
    ("adamw.cu", include_str!("../../cuda/adamw.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("attention_gemm.cu", include_str!("../../cuda/attention_gemm.cu")),
    ("cross_entropy.cu", include_str!("../../cuda/cross_entropy.cu")),
    ("dropout.cu", include_str!("../../cuda/dropout.cu")),
    ("elementwise.cu", include_str!("../../cuda/elementwise.cu")),
    ("embedding.cu", include_str!("../../cuda/embedding.cu")),
    ("hopper.cu", include_str!("../../cuda/hopper.cu")),
    ("layernorm.cu", include_str!("../../cuda/layernorm.cu")),
    ("reduce.cu", include_str!("../../cuda/reduce.cu")),
];

/// Kernel files of nothing but Hopper (compute capability 9.0) kernels — wgmma — which other
/// devices leave out.
pub const HOPPER_FILES: &[&str] = &["hopper.cu"];

/// Whether `kernel` is a Hopper kernel (`wgmma`; its name says so): only a 9.0 device loads
/// it, since for any other target its body is a trap.
pub fn hopper_only(kernel: &str) -> bool {
    kernel.contains("wgmma")
}

/// The NVRTC target a device of compute capability `major.minor` compiles `file` for:
/// `compute_XY`, and on a 9.0 device `compute_90a` (the architecture-specific target wgmma
/// needs: the wgmma kernels of every file are more than a trap there); `None` (left out, its
/// kernels not loaded) for [`HOPPER_FILES`] on any other device.
pub fn arch_for(file: &str, major: i32, minor: i32) -> Option<String> {
    if (major, minor) == (9, 0) {
        Some("compute_90a".to_string())
    } else if HOPPER_FILES.contains(&file) {
        None
    } else {
        Some(format!("compute_{major}{minor}"))
    }
}

/// A kernel file with `#include "common.cuh"` replaced by the header itself, as NVRTC gets it
/// (so only the CUDA toolkit's own headers need an include path).
pub fn with_common_inlined(source: &str) -> String {
    source.replace("#include \"common.cuh\"", COMMON)
}

/// The `extern "C"` kernel names defined in a source, in order (a `__launch_bounds__(…)`
/// between `void` and the name is passed over).
pub fn kernel_names(source: &str) -> Vec<String> {
    const BOUNDS: &str = "__launch_bounds__";
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__global__ void ") {
        rest = rest[at + "__global__ void ".len()..].trim_start();
        if let Some(after) = rest.strip_prefix(BOUNDS) {
            rest = after.find(')').map_or(after, |close| &after[close + 1..]).trim_start();
        }
        let end = rest.find('(').unwrap_or(0);
        names.push(rest[..end].trim().to_string());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{arch_for, hopper_only, kernel_names, HOPPER_FILES};

    #[test]
    fn hopper_files_only_on_hopper() {
        assert_eq!(arch_for("hopper.cu", 9, 0).as_deref(), Some("compute_90a"));
        assert_eq!(arch_for("hopper.cu", 8, 9), None);
        assert_eq!(arch_for("hopper.cu", 10, 0), None);
        assert_eq!(arch_for("attention.cu", 9, 0).as_deref(), Some("compute_90a"));
        assert_eq!(arch_for("attention.cu", 8, 6).as_deref(), Some("compute_86"));
        assert!(hopper_only("attention_forward_wgmma_c12s2_f16"));
        assert!(hopper_only("wgmma_tile_n64_k192_f16"));
        assert!(!hopper_only("attention_forward_mma_c12s2_f16"));
        // Every kernel of a Hopper-only file is a Hopper kernel by name.
        for (file, source) in super::FILES {
            if HOPPER_FILES.contains(file) {
                assert!(kernel_names(source).iter().all(|k| hopper_only(k)), "{file}");
            }
        }
    }

    #[test]
    fn kernel_names_skip_launch_bounds() {
        let source = "extern \"C\" __global__ void plain(int n) {}\n\
                      extern \"C\" __global__ void __launch_bounds__(512)\n    bounded(int n) {}";
        assert_eq!(kernel_names(source), ["plain", "bounded"]);
    }
}
