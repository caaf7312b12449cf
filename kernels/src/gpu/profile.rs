//! Where a GPU step's time goes: with `CHINGU_PROFILE=1` every kernel launch and GEMM waits for
//! the device before and after itself and adds its time to a table keyed by kernel name (GEMMs
//! by shape). Waiting serialises the host with the device, so a profiled step is slower than a
//! real one; the table says which kernels dominate, not how fast a step runs. Off by default:
//! then the only cost is one flag test per launch. `chingu bench-train --device cuda` prints the
//! table for a few extra steps after its timed ones.

use std::time::Instant;

use super::{Gpu, GpuError};
pub use crate::profile::{enabled, report, reset};

/// Runs `work` (one launch on `dev`), timed under `name()` when profiling.
pub fn time<R>(
    dev: &Gpu,
    name: impl FnOnce() -> String,
    work: impl FnOnce() -> Result<R, GpuError>,
) -> Result<R, GpuError> {
    if !enabled() {
        return work();
    }
    dev.synchronize()?;
    let started = Instant::now();
    let result = work()?;
    dev.synchronize()?;
    crate::profile::record(name(), started.elapsed().as_secs_f64());
    Ok(result)
}
