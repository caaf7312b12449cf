//! A GPU that runs out of memory in the middle of training (the emulated device with a memory
//! limit) ends the run with an error that says so and what to lower — not a panic — and the
//! error is one a launched job does not restart for (a restart would fail the same way). A
//! limit the run fits in changes nothing, and the memory the backend reports (what the
//! trainer logs) is the run's peak against the limit.

mod common;

use std::sync::Arc;

use common::{options, prepared};

use chingu_kernels::gpu::backend::GpuBackend;
use chingu_kernels::gpu::emu::EmuDevice;
use chingu_kernels::gpu::GpuError;
use chingu_kernels::Backend;
use chingu_worker::trainer::{train, TrainEvent};
use chingu_worker::WorkerError;

/// The last step and every parameter's bits.
type Trained = (u64, Vec<Vec<u32>>);

/// Trains two steps on `dev`; returns the outcome and whether training had started.
fn two_steps(
    dev: Arc<EmuDevice>,
    dir: &std::path::Path,
    run: &str,
) -> (Result<Trained, WorkerError>, bool) {
    let data = prepared(dir);
    let opts = options(&data, &dir.join(run), 2);
    let mut started = false;
    let mut observe = |e: &TrainEvent| started |= matches!(e, TrainEvent::Started { .. });
    let outcome = train(GpuBackend::new(dev), &opts, &mut observe).map(|o| {
        let b = &o.model.backend;
        let bits = |p| b.to_f32(p).iter().map(|x| x.to_bits()).collect();
        (o.step, o.model.params.iter().map(bits).collect())
    });
    (outcome, started)
}

#[test]
fn out_of_device_memory_mid_step_is_a_fatal_error_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = Arc::new(EmuDevice::new());
    let (outcome, _) = two_steps(roomy.clone(), dir.path(), "roomy");
    assert_eq!(outcome.unwrap().0, 2);
    let peak = roomy.peak_allocated();
    assert!(peak > 0);

    // One byte short of what the run needed at its peak: the model and optimizer fit (the
    // run starts), a step's activations do not.
    let tight = Arc::new(EmuDevice::new().with_memory_limit(peak - 1));
    let (outcome, started) = two_steps(tight, dir.path(), "tight");
    assert!(started, "the model and optimizer must fit; the step must not");
    let err = outcome.expect_err("training past the device's memory must fail");
    let WorkerError::Device { failure, .. } = &err else {
        panic!("expected a device failure, got {err:?}");
    };
    assert!(failure.out_of_memory, "{failure:?}");
    assert!(err.is_deterministic(), "out of memory repeats after a restart: {err}");
    let text = err.to_string();
    for expected in [
        "GPU backend, ",
        "out of device memory",
        "did not fit",
        "160 tokens now",
        "--batch-tokens",
        "CHINGU_ATTN_SAVE_PROBS=0",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }
    // The device's size as the error prints it (the part after "… of ").
    let sized = GpuError::OutOfMemory { bytes: 0, in_use: Some((0, peak - 1)) }.to_string();
    let limit = format!(" of {}", sized.rsplit(" of ").next().unwrap());
    assert!(text.contains(&limit), "{limit:?} missing from: {text}");
}

#[test]
fn a_memory_limit_the_run_fits_in_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = Arc::new(EmuDevice::new());
    let (free, _) = two_steps(roomy.clone(), dir.path(), "free");
    let exact = Arc::new(EmuDevice::new().with_memory_limit(roomy.peak_allocated()));
    let (limited, _) = two_steps(exact.clone(), dir.path(), "limited");
    let (free, limited) = (free.unwrap(), limited.unwrap());
    assert_eq!(limited.0, 2);
    assert!(free == limited, "a limit the run fits in changed the trained weights");
    assert_eq!(exact.peak_allocated(), roomy.peak_allocated());
    // What the trainer logs as the device's memory: the peak, of the limit.
    let backend = GpuBackend::new(exact.clone());
    assert_eq!(backend.device_memory(), Some((exact.peak_allocated(), exact.peak_allocated())));
    assert_eq!(GpuBackend::new(roomy).device_memory(), None, "no limit, no total to tell");
}
