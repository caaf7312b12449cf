//! `chingu gpu`: what this build and this machine offer for GPU training — whether the build
//! has CUDA support, the driver and devices found, NVRTC's version, and whether every kernel
//! compiles and loads for each device's architecture. Says plainly what is missing.

/// Runs `chingu gpu`.
#[cfg(feature = "cuda")]
pub fn run() -> anyhow::Result<()> {
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
