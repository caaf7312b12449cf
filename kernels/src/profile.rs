//! Where a step's time goes, op by op: with `CHINGU_PROFILE=1` every CPU op and every GPU
//! launch or GEMM adds its wall time to a table keyed by name (products by shape), and
//! `chingu bench-train` prints the table for a few extra steps after its timed ones.
//!
//! CPU ops are synchronous, so their times are exact and add up to the step minus the model's
//! own host work. On a GPU, `CHINGU_PROFILE=1` makes each launch wait for the device before and
//! after itself (see [`crate::gpu::profile`]), so a profiled step is slower than a real one and
//! each time includes a launch's latency; `CHINGU_PROFILE=events` instead brackets each launch
//! with two CUDA events and waits for nothing, so the step keeps its pace and each time is the
//! device's own (on the emulator, and for CPU ops, it is `1`'s wall time). Off by default: then
//! the only cost is one flag test per op.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Calls and seconds per name.
static TOTALS: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

/// How ops are timed, from `CHINGU_PROFILE` at the first op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Unset (or any other value): nothing is timed.
    Off,
    /// `1`: every op timed alone by the host's clock (a GPU launch waits before and after).
    Alone,
    /// `events`: GPU launches timed by the device's events, without waiting; CPU ops as `1`.
    Events,
}

/// The profiling mode (see [`Mode`]).
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        crate::settings::read("CHINGU_PROFILE", "1, events or 0", |t| {
            match t.to_ascii_lowercase().as_str() {
                "1" => Some(Mode::Alone),
                "events" => Some(Mode::Events),
                "0" => Some(Mode::Off),
                _ => None,
            }
        })
        .unwrap_or(Mode::Off)
    })
}

/// True when ops are timed (`CHINGU_PROFILE=1` or `events`).
pub fn enabled() -> bool {
    mode() != Mode::Off
}

/// Adds one call of `seconds` under `name`.
pub fn record(name: String, seconds: f64) {
    let mut totals = TOTALS.lock().expect("profile");
    let entry = totals.entry(name).or_default();
    entry.0 += 1;
    entry.1 += seconds;
}

/// Times the rest of a scope when profiling: `let _timed = profile::scope(|| "op".into());`.
pub fn scope(name: impl FnOnce() -> String) -> Option<Scope> {
    enabled().then(|| Scope { name: name(), started: Instant::now() })
}

/// A running timer from [`scope`]; records itself when dropped.
pub struct Scope {
    name: String,
    started: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        record(std::mem::take(&mut self.name), self.started.elapsed().as_secs_f64());
    }
}

/// Forgets everything timed so far.
pub fn reset() {
    TOTALS.lock().expect("profile").clear();
}

/// The table so far, largest total first, per `steps` steps: name, calls and milliseconds per
/// step, share of the timed total.
pub fn report(steps: usize) -> String {
    let totals = TOTALS.lock().expect("profile");
    let mut rows: Vec<(&String, &(u64, f64))> = totals.iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let all: f64 = rows.iter().map(|r| r.1 .1).sum();
    let per = steps.max(1) as f64;
    let mut out = format!(
        "| op | calls/step | ms/step | share |\n|---|---:|---:|---:|\n| all timed | {:.0} | {:.2} | 100% |\n",
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
