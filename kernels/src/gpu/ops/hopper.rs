//! Launchers of the Hopper-only kernels (`kernels/cuda/hopper.cu`, wgmma): loaded on a
//! compute-capability 9.0 GPU and on the emulator ([`Device::has_kernel`] says where).
//!
//! [`Device::has_kernel`]: crate::gpu::Device::has_kernel

use std::ffi::c_void;

use half::f16;

use super::{expect_len, launch, shape};
use crate::gpu::{DeviceBuffer, Gpu, GpuError};

/// The shared-memory layouts [`wgmma_tile`] stages B in (hopper.cu describes each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgmmaLayout {
    /// K-major (B's columns as rows of K), 128-byte swizzle.
    KMajorSwizzle128 = 0,
    /// MN-major (B's rows of N), 128-byte swizzle.
    MnMajorSwizzle128 = 1,
    /// K-major, 8 × 8 core matrices, no swizzle.
    KMajorInterleaved = 2,
    /// MN-major, 8 × 8 core matrices, no swizzle.
    MnMajorInterleaved = 3,
}

impl WgmmaLayout {
    /// Every layout.
    pub const ALL: [WgmmaLayout; 4] = [
        WgmmaLayout::KMajorSwizzle128,
        WgmmaLayout::MnMajorSwizzle128,
        WgmmaLayout::KMajorInterleaved,
        WgmmaLayout::MnMajorInterleaved,
    ];
}

/// The probe shapes `(N, K)` hopper.cu has an instance for.
pub const WGMMA_TILE_SHAPES: [(usize, usize); 2] = [(64, 192), (192, 64)];

/// The kernel of probe shape `(n, k)`.
pub fn wgmma_tile_kernel(n: usize, k: usize) -> Option<&'static str> {
    match (n, k) {
        (64, 192) => Some("wgmma_tile_n64_k192_f16"),
        (192, 64) => Some("wgmma_tile_n192_k64_f16"),
        _ => None,
    }
}

/// `d [64×n] = a [64×k] · b [k×n]` (fp16 in, fp32 out, row-major) by one warpgroup through
/// wgmma, B staged in shared memory in `layout` and A read from registers, or from shared
/// memory too (K-major, 128-byte swizzle) with `a_in_smem`: a probe of the layouts the
/// emulator and the Hopper kernels assume (see hopper.cu).
pub fn wgmma_tile(
    dev: &Gpu,
    d: &mut DeviceBuffer<f32>,
    a: &DeviceBuffer<f16>,
    b: &DeviceBuffer<f16>,
    (n, k): (usize, usize),
    layout: WgmmaLayout,
    a_in_smem: bool,
) -> Result<(), GpuError> {
    const OP: &str = "wgmma_tile";
    let kernel = wgmma_tile_kernel(n, k).ok_or_else(|| {
        shape(OP, format!("no instance for N {n}, K {k} (has {WGMMA_TILE_SHAPES:?})"))
    })?;
    expect_len(OP, "d", d, 64 * n)?;
    expect_len(OP, "a", a, 64 * k)?;
    expect_len(OP, "b", b, k * n)?;
    // B (and A) staged, plus up to 1024 bytes to align the tiles to the swizzle's atoms.
    let shared = 2 * k * n + if a_in_smem { 2 * 64 * k } else { 0 } + 1024;
    if shared > dev.max_dynamic_shared(kernel) {
        return Err(shape(
            OP,
            format!(
                "{shared} bytes of shared memory, over the device's {}",
                dev.max_dynamic_shared(kernel)
            ),
        ));
    }
    let (layout_arg, a_arg) = (layout as i32, i32::from(a_in_smem));
    launch(
        dev,
        kernel,
        (1, 1, 1),
        (128, 1, 1),
        shared as u32,
        args![d.ptr(), a.ptr(), b.ptr(), layout_arg, a_arg],
    )
}
