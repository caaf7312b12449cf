//! Where a GPU step's time goes, launch by launch (see [`crate::profile`]): with
//! `CHINGU_PROFILE=1` every kernel launch and GEMM waits for the device before and after
//! itself and adds its time to a table keyed by kernel name (GEMMs by shape). Waiting
//! serialises the host with the device, so a profiled step is slower than a real one; the
//! table says which kernels dominate, not how fast a step runs. With `CHINGU_PROFILE=events`
//! each launch is bracketed by two events in the device's queue instead ([`Device::span_start`]),
//! nothing waits, and the spans' times join the table at the device's next synchronisation:
//! the device's own time per launch at the step's real pace (a device without events, the
//! emulator, is timed as with `1`). A span runs from the device reaching one event to the
//! next, so it also holds any time the device sat idle waiting for the host to queue the
//! launch (a product's first use, which plans it, or a host-bound step). Off by default: then the only cost is one flag test per
//! launch. `chingu bench-train --device cuda` prints the table for a few extra steps after its
//! timed ones.

use std::time::Instant;

use super::{Device, Gpu, GpuError};
use crate::profile::Mode;
pub use crate::profile::{enabled, report, reset};

/// Runs `work` (one launch on `dev`), timed under `name()` when profiling.
pub fn time<R>(
    dev: &Gpu,
    name: impl FnOnce() -> String,
    work: impl FnOnce() -> Result<R, GpuError>,
) -> Result<R, GpuError> {
    match crate::profile::mode() {
        Mode::Off => work(),
        Mode::Events => match dev.span_start()? {
            Some(start) => {
                let result = work();
                // Ended even when `work` failed, so the device's record stays paired; the
                // work's own error comes first (after a device error, recording fails too).
                let ended = dev.span_end(start, name());
                let value = result?;
                ended?;
                Ok(value)
            }
            None => alone(dev.as_ref(), name, work),
        },
        Mode::Alone => alone(dev.as_ref(), name, work),
    }
}

/// `work` between two waits for `dev`, timed by the host's clock.
fn alone<R>(
    dev: &dyn Device,
    name: impl FnOnce() -> String,
    work: impl FnOnce() -> Result<R, GpuError>,
) -> Result<R, GpuError> {
    dev.synchronize()?;
    let started = Instant::now();
    let result = work()?;
    dev.synchronize()?;
    crate::profile::record(name(), started.elapsed().as_secs_f64());
    Ok(result)
}
