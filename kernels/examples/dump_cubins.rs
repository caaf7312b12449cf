//! Writes every kernel file's CUBIN (NVRTC, the same source and options as the runtime) to a
//! directory, for reading the machine code without a GPU: `bench/sass_loops.py` counts the
//! attention kernels' tile-loop instructions from them.
//!
//! ```text
//! cargo run -q -p chingu-kernels --example dump_cubins -- sm_90 /tmp/cubins
//! ```
//! Needs libnvrtc on the library path and the CUDA headers (`CHINGU_CUDA_INCLUDE`), as the
//! `nvrtc` test does.

use chingu_kernels::gpu::{nvrtc, sources};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(arch), Some(dir)) = (args.next(), args.next()) else {
        return Err("usage: dump_cubins <sm_XY> <directory>".into());
    };
    if !arch.starts_with("sm_") {
        return Err(format!("{arch}: give a real architecture (sm_80, sm_90, ...)").into());
    }
    std::fs::create_dir_all(&dir)?;
    for (file, source) in sources::FILES {
        let compiled = nvrtc::compile(file, source, &arch, &[])?;
        let path = std::path::Path::new(&dir).join(format!("{file}.{arch}.cubin"));
        std::fs::write(&path, &compiled.image)?;
        println!("{}", path.display());
    }
    Ok(())
}
