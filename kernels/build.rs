//! With feature "emu", compiles every kernel in `cuda/` with the system C++ compiler against
//! our CUDA emulation layer (`cuda/emu/cuda_emu.h`), so the kernels run on the CPU in tests.

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    if std::env::var_os("CARGO_FEATURE_EMU").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cuda/emu/launch_all.cpp")
        .include("cuda")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        // Kernels are device code written for nvcc: unused launch parameters are normal.
        .flag_if_supported("-Wno-unused-parameter")
        // `#pragma unroll` is for NVRTC (register arrays); g++ may unroll as it likes.
        .flag_if_supported("-Wno-unknown-pragmas")
        // The emulated `__fmul_rn`, `__fadd_rn`, … are plain operators: unfused here, as
        // their names promise (g++ would otherwise contract them into fma on a host that
        // has one, and AdamW's bit-for-bit test against the CPU backend would fail there).
        .flag_if_supported("-ffp-contract=off")
        .compile("chingu_emu");
}
