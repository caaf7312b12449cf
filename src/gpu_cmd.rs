//! `chingu gpu`: what this build and this machine offer for GPU training — whether the build
//! has CUDA support, the driver and devices found, NVRTC's version, NCCL's (several GPU
//! workers need it), and whether every kernel compiles and loads for each device's
//! architecture. Says plainly what is missing, then lists the environment variables that tune
//! GPU work, with their values.

/// Runs `chingu gpu`: the checks, then the settings that tune GPU work.
#[cfg(feature = "cuda")]
pub fn run() -> anyhow::Result<()> {
    let checked = check();
    print_settings();
    checked
}

/// The environment variables the GPU backend reads, each with what it does.
#[cfg(feature = "cuda")]
const SETTINGS: &[(&str, &str)] = &[
    (
        chingu_kernels::gpu::ops::ATTENTION_VAR,
        "attention kernels: auto (by shape), wmma, mma, gemm or wgmma (Hopper's warpgroup MMA \
         forward, H100/H200 only)",
    ),
    (
        chingu_kernels::gpu::ops::SAVE_PROBS_VAR,
        "0 = the cuBLASLt attention path recomputes the softmax in backward (less memory)",
    ),
    (
        chingu_kernels::gpu::ops::PIPELINE_VAR,
        "fused attention: 1 = load the next tile while using one, 0 = not (unset: where it costs no occupancy)",
    ),
    (
        chingu_kernels::gpu::ops::WARPS_VAR,
        "fused attention: 4 or 8 warps a block (unset: 4 for heads up to 64, else the most resident)",
    ),
    (
        chingu_kernels::gpu::ops::SCORES_VAR,
        "f32 = the cuBLASLt attention path keeps scores and their gradient in fp32 (default f16)",
    ),
    (
        chingu_kernels::gpu::ops::CAUSAL_BAND_VAR,
        "query rows a band of the cuBLASLt path's causal attention (default 512; 0 = no bands)",
    ),
    (
        chingu_kernels::gpu::ops::LN_BACKWARD_BLOCKS_VAR,
        "N = the LayerNorm backward in at most N blocks, more rows a warp (default: 4 rows a warp)",
    ),
    (
        "CHINGU_GELU_EPILOGUE",
        "0 = the feed-forward GELU in its own kernel, not in cuBLASLt's product",
    ),
    (
        chingu_kernels::gpu::backend::BIAS_GRAD_EPILOGUE_VAR,
        "1 = linear layers' bias gradients in cuBLASLt's weight-gradient product (BGRADB), not kernels",
    ),
    (
        chingu_kernels::gpu::cuda::TUNE_VAR,
        "unset or 1 = the fastest of cuBLASLt's first 8 algorithms (CHINGU_GEMM_TUNE_CANDIDATES) \
         per product shape, timed once and kept on disk; again = time anew; 0 = cuBLASLt's first",
    ),
    (
        chingu_kernels::gpu::cuda::TUNE_CANDIDATES_VAR,
        "N = time cuBLASLt's first N algorithms per product shape when tuning (default 8; with \
         CHINGU_GEMM_TUNE=again, shapes already kept are timed over the N too)",
    ),
    (
        chingu_kernels::gpu::cuda::TUNE_ARRAYS_VAR,
        "1 = tune the pointer-array batches too (timed at their first batch; default 0: \
         cuBLASLt's first answer)",
    ),
    (
        chingu_kernels::gpu::gemm::ARRAYS_VAR,
        "unset or 1 = the cuBLASLt attention path's per-head products of one shape as one \
         pointer-array batch; 0 = one launch each",
    ),
    (
        chingu_kernels::gpu::backend::WEIGHT_GRAD_BATCH_VAR,
        "1 = attention projections' weight gradients as one pointer-array batch and their bias \
         gradients in one launch (default 0: one layer at a time)",
    ),
    (
        "CHINGU_PROFILE",
        "bench-train prints where a step's time goes: 1 = each launch timed alone, events = \
         each launch's device time at the step's pace",
    ),
    (
        "CHINGU_KERNEL_CACHE",
        "where compiled kernels and cuBLASLt's tuned choices are kept (default ~/.cache/chingu/kernels)",
    ),
];

/// Prints [`SETTINGS`] with their values here.
#[cfg(feature = "cuda")]
fn print_settings() {
    println!("settings (environment variables; unset takes the default):");
    for (name, what) in SETTINGS {
        let value = std::env::var(name).unwrap_or_else(|_| "unset".into());
        println!("  {name:<30} {value:<6} {what}");
    }
}

/// `chingu gpu`'s checks.
#[cfg(feature = "cuda")]
fn check() -> anyhow::Result<()> {
    use chingu_kernels::gpu::cuda::CudaDevice;
    use chingu_kernels::gpu::{nvrtc, Device};

    println!("build: CUDA support compiled in (cudarc, dynamic loading)");
    if !CudaDevice::driver_present() {
        println!("driver: no CUDA driver (libcuda.so) found — training runs on the CPU");
        return Ok(());
    }
    let count = CudaDevice::count();
    println!("driver: found; {count} CUDA device(s)");
    match nvrtc::version() {
        Ok((major, minor)) => {
            println!("NVRTC: {major}.{minor}; CUDA headers from {:?}", nvrtc::include_dirs())
        }
        Err(err) => {
            println!("NVRTC: {err}");
            anyhow::bail!("kernels cannot be compiled without NVRTC");
        }
    }
    match CudaDevice::cublaslt_version() {
        Some(v) => println!(
            "cuBLASLt: {}.{}.{} (pointer-array batches for CHINGU_GEMM_ARRAYS: {})",
            v / 10000,
            v / 100 % 100,
            v % 100,
            if v >= 120_900 {
                "yes, where it has a kernel for the shape"
            } else {
                "no: 12.9 or newer"
            }
        ),
        None => println!(
            "cuBLASLt: libcublasLt.so not found — GPU matrix products need the CUDA toolkit's \
             cuBLAS libraries on the library path"
        ),
    }
    match chingu_kernels::gpu::nccl::version() {
        Some(v) => println!(
            "NCCL: {}.{}.{} (several GPU workers sum gradients on the GPUs)",
            v / 10000,
            v / 100 % 100,
            v % 100
        ),
        None => println!(
            "NCCL: libnccl.so not found — one GPU trains fine; several GPU workers need NCCL \
             (`scripts/nccl-link`) or workers.collective = \"ring\""
        ),
    }
    for ordinal in 0..count {
        match CudaDevice::new(ordinal) {
            Ok(dev) => println!("{}: every kernel compiled and loaded", dev.name()),
            Err(err) => anyhow::bail!("cuda:{ordinal}: {err}"),
        }
    }
    Ok(())
}

/// Runs `chingu gpu`.
#[cfg(not(feature = "cuda"))]
pub fn run() -> anyhow::Result<()> {
    println!(
        "build: no CUDA support in this build (rebuild with `cargo build --release --features cuda`); \
         training runs on the CPU"
    );
    Ok(())
}

/// Where `--device` puts the work (training, answering, evaluating).
pub enum Selected {
    /// The CPU backend.
    Cpu,
    /// A CUDA device, every kernel compiled and loaded.
    #[cfg(feature = "cuda")]
    Cuda(chingu_kernels::gpu::Gpu),
}

/// Resolves `--device auto|cpu|cuda`: `auto` takes GPU 0 when this build has CUDA support and
/// a device opens, else says in one line why not and takes the CPU; `cuda` fails instead.
/// `work` names what the device is for in those lines ("training", "answering",
/// "evaluating").
pub fn select(device: &str, work: &str) -> anyhow::Result<Selected> {
    if device == "cpu" {
        return Ok(Selected::Cpu);
    }
    #[cfg(feature = "emu")]
    if chingu_kernels::gpu::emu::emulation_requested() {
        eprintln!("chingu: CHINGU_EMULATED_GPU=1: the CUDA kernels run emulated on the CPU");
        // CHINGU_EMU_SCHEDULE picks the launch schedule (in order unless set).
        let dev = chingu_kernels::gpu::emu::EmuDevice::from_env()?;
        return Ok(Selected::Cuda(std::sync::Arc::new(dev)));
    }
    #[cfg(feature = "cuda")]
    {
        use chingu_kernels::gpu::cuda::CudaDevice;
        use chingu_kernels::gpu::Device;
        match CudaDevice::open_for(0) {
            Ok(dev) => {
                eprintln!("chingu: {work} on {} (fp16 mixed precision)", dev.name());
                Ok(Selected::Cuda(std::sync::Arc::new(dev)))
            }
            Err(why) if device == "auto" => {
                eprintln!("chingu: {why}; {work} on the CPU");
                Ok(Selected::Cpu)
            }
            Err(why) => anyhow::bail!("--device cuda: {why}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        if device == "cuda" {
            anyhow::bail!(
                "--device cuda: this build has no CUDA support (rebuild with --features cuda)"
            );
        }
        eprintln!(
            "chingu: this build has no CUDA support (build with --features cuda); {work} on the CPU"
        );
        Ok(Selected::Cpu)
    }
}
