//! Data-parallel training with the gradients summed on the device (`Comm::Device`: NCCL on
//! GPUs), through the real training loop: two ranks on the emulated GPU joined by an
//! `EmuCollective` group end bit-identical to each other and to one rank accumulating the same two
//! micro-batches (the summation is one commutative addition), and a device collective of one
//! rank changes nothing. With `CHINGU_GPU_TESTS=1|only` (and feature "cuda") the last check
//! runs on the GPU through NCCL with world size 1: the communicator, its stream and the events
//! that order it against the compute stream, inside training.

mod common;

use std::sync::Arc;

use common::{options, prepared};

use chingu_kernels::gpu::backend::GpuBackend;
use chingu_kernels::gpu::collective::{DeviceCollective, EmuCollective};
use chingu_kernels::gpu::emu::EmuDevice;
use chingu_kernels::Backend;
use chingu_model::{Model, Optimizer};
use chingu_worker::checkpoint::TrainState;
use chingu_worker::collective::Solo;
use chingu_worker::trainer::{train_parallel, Comm, Parallel, Requests, TrainEvent, TrainOptions};

/// Per-step losses and the final parameters of one rank.
type Trained = (Vec<u64>, Vec<Vec<u32>>);

fn train(
    backend: GpuBackend,
    opts: &TrainOptions,
    collective: Comm<'_>,
    accumulate: usize,
) -> Trained {
    let mut no_checkpoint =
        |_: &Model<GpuBackend>, _: &Optimizer<GpuBackend>, _: TrainState| Ok(None);
    let parallel = Parallel {
        collective,
        accumulate,
        requests: &mut Requests::default,
        checkpoint: &mut no_checkpoint,
    };
    let mut losses = Vec::new();
    let mut observe = |e: &TrainEvent| {
        if let TrainEvent::Step(r) = e {
            losses.push(r.loss.to_bits());
        }
    };
    let outcome = train_parallel(backend, opts, parallel, &mut observe).unwrap();
    let b = &outcome.model.backend;
    let params = outcome
        .model
        .params
        .iter()
        .map(|p| b.to_f32(p).iter().map(|x| x.to_bits()).collect())
        .collect();
    (losses, params)
}

fn emu_backend() -> GpuBackend {
    GpuBackend::new(Arc::new(EmuDevice::new()))
}

#[test]
fn two_ranks_summing_on_the_device_equal_one_rank_accumulating_two() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared(dir.path());
    let steps = 2;
    let alone = train(
        emu_backend(),
        &options(&data, &dir.path().join("a"), steps),
        Comm::Host(&mut Solo),
        2,
    );
    assert_eq!(alone.0.len(), steps as usize);

    let ranks: Vec<Trained> = std::thread::scope(|scope| {
        let handles: Vec<_> = EmuCollective::group(2)
            .into_iter()
            .map(|mut member| {
                let opts = options(&data, &dir.path().join(format!("r{}", member.rank())), steps);
                scope.spawn(move || train(emu_backend(), &opts, Comm::Device(&mut member), 1))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ranks[0], ranks[1], "both ranks hold the same weights and report the same losses");
    assert!(ranks[0].1 == alone.1, "weights: 2 ranks x 1 slot vs 1 rank x 2 slots differ");
    // The reported loss crosses ranks as f32 parts, so it agrees to f32 precision only.
    for (two, one) in ranks[0].0.iter().zip(&alone.0) {
        let (two, one) = (f64::from_bits(*two), f64::from_bits(*one));
        assert!((two - one).abs() <= 1e-6 * one.abs(), "loss {two} vs {one}");
    }
}

/// The devices the world-size-1 check runs on: the emulator with an `EmuCollective` group of one; with
/// `CHINGU_GPU_TESTS`, CUDA device 0 with NCCL (a missing library is a failure, not a skip).
fn one_rank_collectives() -> Vec<(GpuBackend, Box<dyn DeviceCollective>)> {
    let wanted = std::env::var("CHINGU_GPU_TESTS").unwrap_or_default();
    let mut out: Vec<(GpuBackend, Box<dyn DeviceCollective>)> = Vec::new();
    if wanted != "only" {
        out.push((emu_backend(), Box::new(EmuCollective::group(1).pop().unwrap())));
    }
    if wanted == "1" || wanted == "only" {
        #[cfg(feature = "cuda")]
        {
            use chingu_kernels::gpu::cuda::CudaDevice;
            use chingu_kernels::gpu::nccl::{unique_id, NcclCollective};
            let dev = CudaDevice::new(0).expect("CHINGU_GPU_TESTS is set but the GPU did not open");
            let id = unique_id().expect("NCCL's unique id (is libnccl.so on the library path?)");
            let comm = NcclCollective::new(&dev, &id, 0, 1).expect("NCCL communicator of one rank");
            out.push((GpuBackend::new(Arc::new(dev)), Box::new(comm)));
        }
        #[cfg(not(feature = "cuda"))]
        panic!("CHINGU_GPU_TESTS={wanted} needs chingu-worker built with feature \"cuda\"");
    }
    out
}

#[test]
fn a_device_collective_of_one_rank_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared(dir.path());
    for (backend, mut collective) in one_rank_collectives() {
        let name = backend_name(&backend);
        let opts = options(&data, &dir.path().join("one"), 2);
        let plain = train(backend.clone(), &opts, Comm::Host(&mut Solo), 1);
        let summed = train(backend, &opts, Comm::Device(collective.as_mut()), 1);
        assert_eq!(plain.0.len(), 2, "{name}");
        assert!(
            plain == summed,
            "{name}: training through a device collective of one rank changed the result"
        );
    }
}

fn backend_name(backend: &GpuBackend) -> String {
    backend.device().name()
}
