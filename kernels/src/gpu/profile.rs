//! Where a GPU step's time goes: with `CHINGU_PROFILE=1` every kernel launch and GEMM waits for
//! the device before and after itself and adds its time to a table keyed by kernel name (GEMMs
//! by shape). Waiting serialises the host with the device, so a profiled step is slower than a
//! real one; the table says which kernels dominate, not how fast a step runs. Off by default:
//! then the only cost is one flag test per launch. `chingu bench-train --device cuda` prints the
//! table for a few extra steps after its timed ones.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::{Gpu, GpuError};

/// Launches and seconds per name.
static TOTALS: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

/// True when `CHINGU_PROFILE=1` was set at the first launch.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("CHINGU_PROFILE").as_deref() == Ok("1"))
}

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
    let seconds = started.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().expect("profile");
    let entry = totals.entry(name()).or_default();
    entry.0 += 1;
    entry.1 += seconds;
    Ok(result)
}

/// Forgets everything timed so far.
pub fn reset() {
    TOTALS.lock().expect("profile").clear();
}

/// The table so far, largest total first, per `steps` steps: name, launches and milliseconds
/// per step, share of the timed total.
pub fn report(steps: usize) -> String {
    let totals = TOTALS.lock().expect("profile");
    let mut rows: Vec<(&String, &(u64, f64))> = totals.iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let all: f64 = rows.iter().map(|r| r.1 .1).sum();
    let per = steps.max(1) as f64;
    let mut out = format!(
        "| kernel | launches/step | ms/step | share |\n|---|---:|---:|---:|\n| all timed | {:.0} | {:.2} | 100% |\n",
        rows.iter().map(|r| r.1 .0 as f64).sum::<f64>() / per,
        1e3 * all / per
    );
    for (name, (calls, seconds)) in rows {
        out.push_str(&format!(
            "| {name} | {:.0} | {:.3} | {:.1}% |\n",
            *calls as f64 / per,
            1e3 * seconds / per,
            100.0 * seconds / all.max(1e-12)
        ));
    }
    out
}
