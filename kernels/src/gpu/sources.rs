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
    ("layernorm.cu", include_str!("../../cuda/layernorm.cu")),
    ("reduce.cu", include_str!("../../cuda/reduce.cu")),
];

/// A kernel file with `#include "common.cuh"` replaced by the header itself, as NVRTC gets it
/// (so only the CUDA toolkit's own headers need an include path).
pub fn with_common_inlined(source: &str) -> String {
    source.replace("#include \"common.cuh\"", COMMON)
}

/// The `extern "C"` kernel names defined in a source, in order.
pub fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__global__ void ") {
        rest = &rest[at + "__global__ void ".len()..];
        let end = rest.find('(').unwrap_or(0);
        names.push(rest[..end].trim().to_string());
    }
    names
}
