//! The emulated device's own checks (`chingu_kernels::gpu::emu`): its schedules — a compared
//! launch finds a data race that the in-order schedule hides, names the allocation and
//! argument, passes a race-free launch of the same kernel, and refuses memory it could not
//! restore; settings parse as documented — and the guards around every allocation, which
//! catch a write past a buffer's end or before its start; and its memory limit, which
//! refuses an allocation that does not fit as a full GPU does (and under which the GEMM
//! attention path halves its chunk of scores until its scratch fits, with P saved by its
//! forward or not; its backward reads the P saved).
//!
//! The race is a real kernel given overlapping arguments: `add_assign_f32(acc, x, n)` with
//! `x` one element behind `acc`, so thread i reads what thread i − 1 writes. In order,
//! thread i − 1 always runs first (and block b − 1 before block b), so the result is the
//! prefix sum; under a shuffled schedule some reads come first and see the old values.

use std::ffi::c_void;

use chingu_kernels::gpu::emu::{EmuDevice, Schedule};
use chingu_kernels::gpu::{DeviceBuffer, Gpu, GpuError};
use half::f16;
use std::sync::Arc;

const N: usize = 2048;
const THREADS: u32 = 256;

/// Launches `add_assign_f32(acc, x, N)`: `acc[i] += x[i]` for i < N, one thread each.
///
/// # Safety
/// `acc` and `x` must address N floats of host memory (the emulated device's memory is).
unsafe fn add_assign(dev: &Gpu, acc: u64, x: u64) -> Result<(), GpuError> {
    let n = N as i32;
    let mut args = [
        &acc as *const _ as *mut c_void,
        &x as *const _ as *mut c_void,
        &n as *const _ as *mut c_void,
    ];
    let grid = (N as u32).div_ceil(THREADS);
    // SAFETY: the arguments match add_assign_f32(float*, const float*, int); the caller
    // guarantees the extents.
    unsafe { dev.launch("add_assign_f32", (grid, 1, 1), (THREADS, 1, 1), 0, &mut args) }
}

/// `add_assign_f32(buf + 1, buf, N)` over ones: element i + 1 gets element i's new or old
/// value, whichever the schedule lets it see.
fn overlapping_add(dev: &Gpu) -> (Result<(), GpuError>, Vec<f32>) {
    let buf = DeviceBuffer::from_host(dev, &vec![1.0f32; N + 1]).unwrap();
    // SAFETY: the buffer holds N + 1 floats.
    let result = unsafe { add_assign(dev, buf.ptr() + 4, buf.ptr()) };
    (result, buf.to_host().unwrap())
}

fn device(schedule: Schedule) -> Gpu {
    Arc::new(EmuDevice::with_schedule(schedule))
}

#[test]
fn in_order_the_race_gives_the_prefix_sum() {
    let (result, values) = overlapping_add(&device(Schedule::InOrder));
    result.unwrap();
    let want: Vec<f32> = (1..=N + 1).map(|i| i as f32).collect();
    assert_eq!(values, want);
}

#[test]
fn a_shuffled_schedule_changes_the_racy_result() {
    let (result, values) = overlapping_add(&device(Schedule::Shuffled { seed: 3 }));
    result.unwrap();
    let prefix_sum = values.iter().enumerate().filter(|&(i, &v)| v == (i + 1) as f32).count();
    assert!(
        prefix_sum < N / 2,
        "only {} of {} elements differ from the in-order result",
        N + 1 - prefix_sum,
        N + 1
    );
    // The same seed replays the same schedule.
    let (_, again) = overlapping_add(&device(Schedule::Shuffled { seed: 3 }));
    assert_eq!(values, again);
}

#[test]
fn a_compared_launch_reports_the_race_by_kernel_allocation_and_argument() {
    let (result, _) = overlapping_add(&device(Schedule::Compared { seed: 3 }));
    let message = match result {
        Err(GpuError::Emulation { kernel, message }) => {
            assert_eq!(kernel, "add_assign_f32");
            message
        }
        other => panic!("expected an emulation error, got {other:?}"),
    };
    for needle in [
        "depends on the order of threads or blocks",
        &format!("the allocation of {} bytes", (N + 1) * 4),
        "pointer argument #0 points into it",
        "in order, ",
        "under the shuffled schedule (seed 0x",
    ] {
        assert!(message.contains(needle), "{needle:?} is not in: {message}");
    }
}

#[test]
fn a_compared_launch_without_a_race_passes_and_leaves_the_in_order_result() {
    let dev = device(Schedule::Compared { seed: 3 });
    let acc = DeviceBuffer::from_host(&dev, &vec![1.0f32; N]).unwrap();
    let x: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let x = DeviceBuffer::from_host(&dev, &x).unwrap();
    // SAFETY: separate buffers of N floats.
    unsafe { add_assign(&dev, acc.ptr(), x.ptr()) }.unwrap();
    // Run once, not twice: each element got x added exactly once.
    let want: Vec<f32> = (0..N).map(|i| 1.0 + i as f32).collect();
    assert_eq!(acc.to_host().unwrap(), want);
}

#[test]
fn schedules_parse_as_documented() {
    assert_eq!(Schedule::parse("in-order"), Ok(Schedule::InOrder));
    assert_eq!(Schedule::parse("shuffled:42"), Ok(Schedule::Shuffled { seed: 42 }));
    assert_eq!(Schedule::parse("compared:0x10"), Ok(Schedule::Compared { seed: 16 }));
    assert_eq!(Schedule::parse("compared"), Ok(Schedule::TESTS));
    for bad in ["", "random", "in-order:3", "shuffled:x", "compared:-1"] {
        let err = Schedule::parse(bad).unwrap_err();
        assert!(
            err.contains("in-order, shuffled[:SEED] or compared[:SEED]")
                || err.contains("is not a seed"),
            "{bad:?}: {err}"
        );
    }
}

/// `scale_f32(buf + shift floats, 2, N + extra)`: `extra` floats more than the buffer holds
/// past `shift`, or from `shift` floats before its start when `shift` is negative.
fn scale_outside(dev: &Gpu, shift: i64, extra: usize) -> Result<Vec<f32>, GpuError> {
    let buf = DeviceBuffer::from_host(dev, &vec![1.0f32; N]).unwrap();
    let ptr = (buf.ptr() as i64 + 4 * shift) as u64;
    let (factor, n) = (2.0f32, (N + extra) as i32);
    let mut args = [
        &ptr as *const _ as *mut c_void,
        &factor as *const _ as *mut c_void,
        &n as *const _ as *mut c_void,
    ];
    let grid = (N as u32 + extra as u32).div_ceil(THREADS);
    // SAFETY: the arguments match scale_f32(float*, float, int); the writes past the buffer
    // land in the emulated allocation's guard, which is there to take them.
    unsafe { dev.launch("scale_f32", (grid, 1, 1), (THREADS, 1, 1), 0, &mut args) }?;
    buf.to_host()
}

#[test]
fn a_write_past_the_end_of_a_buffer_is_reported_under_every_schedule() {
    for schedule in [Schedule::InOrder, Schedule::Shuffled { seed: 1 }, Schedule::TESTS] {
        let dev = device(schedule);
        assert_eq!(scale_outside(&dev, 0, 0).unwrap(), vec![2.0f32; N], "{schedule:?}");
        let message = match scale_outside(&dev, 0, 3) {
            Err(GpuError::Emulation { kernel, message }) if kernel == "scale_f32" => message,
            other => panic!("{schedule:?}: expected an emulation error, got {other:?}"),
        };
        for needle in [
            &format!("wrote outside the allocation of {} bytes", N * 4),
            "pointer argument #0 points into it",
            "guard bytes changed up to 12 bytes past its end",
        ] {
            assert!(message.contains(needle), "{schedule:?}: {needle:?} is not in: {message}");
        }
    }
}

#[test]
fn a_write_before_the_start_of_a_buffer_is_reported_under_every_schedule() {
    for schedule in [Schedule::InOrder, Schedule::Shuffled { seed: 1 }, Schedule::TESTS] {
        let dev = device(schedule);
        // Two floats before the buffer, then all but its last two.
        let message = match scale_outside(&dev, -2, 0) {
            Err(GpuError::Emulation { kernel, message }) if kernel == "scale_f32" => message,
            other => panic!("{schedule:?}: expected an emulation error, got {other:?}"),
        };
        for needle in [
            &format!("wrote outside the allocation of {} bytes", N * 4),
            "pointer argument #0 points into it",
            // Doubling a guard word changes its high bytes only: 6 of the 8 bytes written.
            "guard bytes changed from 6 bytes before its start",
        ] {
            assert!(message.contains(needle), "{schedule:?}: {needle:?} is not in: {message}");
        }
        // The guard was refilled: the next launch on a fresh buffer is not blamed.
        assert_eq!(scale_outside(&dev, 0, 0).unwrap(), vec![2.0f32; N], "{schedule:?}");
    }
}

#[test]
fn empty_buffers_allocate_and_free_under_the_compared_schedule() {
    let dev = device(Schedule::TESTS);
    for _ in 0..3 {
        let empty = DeviceBuffer::<f32>::from_host(&dev, &[]).unwrap();
        assert!(empty.is_empty());
        assert!(empty.to_host().unwrap().is_empty());
    }
    // The device still compares launches afterwards.
    assert_eq!(scale_outside(&dev, 0, 0).unwrap(), vec![2.0f32; N]);
}

#[test]
fn a_compared_launch_refuses_memory_it_cannot_restore() {
    let dev = device(Schedule::TESTS);
    let mut host = vec![1.0f32; N];
    let x = DeviceBuffer::from_host(&dev, &vec![1.0f32; N]).unwrap();
    // An in-place update of memory the device does not own would be applied twice.
    // SAFETY: `host` holds N floats (the emulated device runs on host memory), though the
    // compared launch must refuse it before running.
    let result = unsafe { add_assign(&dev, host.as_mut_ptr() as u64, x.ptr()) };
    match result {
        Err(GpuError::Emulation { message, .. }) => {
            assert!(message.contains("pointer argument #0"), "{message}");
            assert!(message.contains("not in this emulated device's memory"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(host, vec![1.0f32; N], "the refused launch must not have run");
}

#[test]
fn a_memory_limit_refuses_what_does_not_fit_and_frees_give_it_back() {
    let emu = Arc::new(EmuDevice::new().with_memory_limit(3000));
    let dev: Gpu = emu.clone();
    let first = DeviceBuffer::<f32>::uninit(&dev, 500).expect("2000 bytes fit in 3000");
    match DeviceBuffer::<f32>::uninit(&dev, 300) {
        Err(e @ GpuError::OutOfMemory { bytes: 1200, in_use: Some((2000, 3000)) }) => {
            let text = e.to_string();
            assert_eq!(
                text,
                "out of device memory: 1.2 KiB more did not fit (2.0 KiB of 2.9 KiB in use)"
            );
        }
        Err(other) => panic!("expected out of memory, got {other}"),
        Ok(_) => panic!("3200 bytes must not fit in 3000"),
    }
    drop(first);
    let second = DeviceBuffer::<f32>::uninit(&dev, 750).expect("the freed 2000 bytes came back");
    assert_eq!(second.len(), 750);
    assert_eq!(emu.peak_allocated(), 3000);
}

/// The GEMM attention path's forward and backward on an emulated device with `limit`
/// bytes, S and dP in fp16 when `half_scores`, every score block in one chunk if it fits, P
/// saved by the forward when `save_probs`
/// (then `edit_probs`, if given, changes it before the backward): (out, lse, dq, dk, dv), the
/// peak of memory in use, and that peak as the forward left it.
fn gemm_attention_under(
    limit: usize,
    half_scores: bool,
    save_probs: bool,
    edit_probs: Option<fn(&mut [f16])>,
) -> Result<(Vec<Vec<u32>>, usize, usize), GpuError> {
    use chingu_kernels::backend::AttentionShape;
    use chingu_kernels::gpu::ops::{self, AttentionKernels};
    // Without pointer-array batches: the limits below count the attention path's scratch,
    // which their address arrays (kept for reuse) would add to. (A batch with no room for its
    // addresses: gpu_gemm.rs.)
    let emu = Arc::new(EmuDevice::new().without_pointer_arrays().with_memory_limit(limit));
    let dev: Gpu = emu.clone();
    let s = AttentionShape {
        batch: 3,
        q_len: 24,
        k_len: 24,
        heads: 2,
        head_dim: 16,
        causal: true,
        q_offset: 0,
    };
    let n = s.batch * s.q_len * s.heads * s.head_dim;
    let values = |seed: usize| -> Vec<f16> {
        (0..n).map(|i| f16::from_f32((((i * 37 + seed * 11) % 23) as f32 - 11.0) / 8.0)).collect()
    };
    let (q, k, v, d_out) = (
        DeviceBuffer::from_host(&dev, &values(1))?,
        DeviceBuffer::from_host(&dev, &values(2))?,
        DeviceBuffer::from_host(&dev, &values(3))?,
        DeviceBuffer::from_host(&dev, &values(4))?,
    );
    // Every output before the forward, so the backward needs little more than its scratch
    // beyond what the forward had (a limit that halves the forward's chunk leaves it room).
    let (mut dq, mut dk, mut dv) = (
        DeviceBuffer::<f16>::uninit(&dev, n)?,
        DeviceBuffer::<f16>::uninit(&dev, n)?,
        DeviceBuffer::<f16>::uninit(&dev, n)?,
    );
    let key_len = [24, 7, 16];
    let one_chunk =
        AttentionKernels::Gemm { scores_per_chunk: usize::MAX, causal_band: 8, half_scores };
    let lse_len = s.batch * s.heads * s.q_len;
    let stats_len = if save_probs { one_chunk.stats_len(s) } else { lse_len };
    let mut out = DeviceBuffer::<f16>::uninit(&dev, n)?;
    let mut lse = DeviceBuffer::<f32>::uninit(&dev, stats_len)?;
    ops::attention_forward_using(one_chunk, &dev, &mut out, &mut lse, &q, &k, &v, &key_len, s)?;
    let forward_peak = emu.peak_allocated();
    if let (true, Some(edit)) = (save_probs, edit_probs) {
        // P's halves, two an f32 slot from the first 16-byte boundary after lse.
        let mut stats = lse.to_host()?;
        let tail = &mut stats[lse_len.next_multiple_of(4)..];
        let mut probs: Vec<f16> = tail.iter().flat_map(|x| halves(*x)).collect();
        edit(&mut probs);
        for (slot, pair) in tail.iter_mut().zip(probs.chunks(2)) {
            *slot = f32::from_bits(
                u32::from(pair[0].to_bits())
                    | u32::from(pair.get(1).map_or(0, |h| h.to_bits())) << 16,
            );
        }
        lse = DeviceBuffer::from_host(&dev, &stats)?;
    }
    ops::attention_backward_using(
        one_chunk, &dev, &mut dq, &mut dk, &mut dv, &d_out, &q, &k, &v, &out, &lse, &key_len, s,
    )?;
    let bits = |b: &DeviceBuffer<f16>| -> Result<Vec<u32>, GpuError> {
        Ok(b.to_host()?.iter().map(|x| u32::from(x.to_bits())).collect())
    };
    let lse_bits = lse.to_host()?[..lse_len].iter().map(|x| x.to_bits()).collect();
    let results = vec![bits(&out)?, lse_bits, bits(&dq)?, bits(&dk)?, bits(&dv)?];
    Ok((results, emu.peak_allocated(), forward_peak))
}

/// The two halves in an f32 slot's bits, low first (the device is little-endian).
fn halves(x: f32) -> [f16; 2] {
    let bits = x.to_bits();
    [f16::from_bits(bits as u16), f16::from_bits((bits >> 16) as u16)]
}

/// The GEMM attention path's scratch grows with its chunk; where the device has no room for
/// it, the chunk is halved until it fits, with the same result bit for bit — with P saved by
/// the forward and without, and in the forward too (which then writes P chunk by chunk at
/// each chunk's place); with S and dP in fp32 and in fp16 (half their scratch).
#[test]
fn gemm_attention_halves_its_chunk_when_the_scratch_does_not_fit() {
    // 6 blocks of 24 × 24 scores; the scratch's bytes a score, with S and dP `sb` bytes (4 or
    // 2) and P, dS 2: forward sb (S; P goes to the statistics) or sb + 2 (S and P), backward
    // sb + 2 (dP, dS) or 2·sb + 4 (S, P, dP, dS).
    let scores = 6 * 24 * 24;
    for (half_scores, save_probs) in [(false, false), (false, true), (true, false), (true, true)] {
        let sb = if half_scores { 2 } else { 4 };
        let (full, peak, forward_peak) =
            gemm_attention_under(usize::MAX, half_scores, save_probs, None).expect("no limit");
        let (forward_scratch, backward_scratch) = if save_probs {
            (sb * scores, (sb + 2) * scores)
        } else {
            ((sb + 2) * scores, (2 * sb + 4) * scores)
        };
        // Under the peak by a third of a pass's scratch: room for a smaller chunk only, in the
        // backward alone, then in the forward as well.
        for (limit, forward_halves) in
            [(peak - backward_scratch / 3, false), (forward_peak - forward_scratch / 3, true)]
        {
            let (halved, halved_peak, halved_forward_peak) =
                gemm_attention_under(limit, half_scores, save_probs, None)
                    .expect("a smaller chunk fits");
            let what = format!(
                "fp16 scores: {half_scores}, P saved: {save_probs}, limit {limit} of {peak}"
            );
            assert!(halved_peak <= limit && halved_peak < peak, "{what}: peak {halved_peak}");
            if forward_halves {
                assert!(halved_forward_peak < forward_peak, "{what}: the forward's chunk halves");
            }
            assert_eq!(halved, full, "the chunking changes no result ({what})");
        }
        // With no room for even one block's backward scratch, the out-of-memory error stands.
        match gemm_attention_under(peak - backward_scratch + 100, half_scores, save_probs, None) {
            Err(GpuError::OutOfMemory { .. }) => {}
            Err(other) => panic!("expected out of memory, got {other}"),
            Ok(_) => panic!("one block's scratch cannot fit in 100 bytes"),
        }
    }
}

/// Where the forward saved P, the backward takes it from there instead of recomputing it: the
/// same out and lse either way, gradients equal to fp16's precision (dS from P rounded to fp16
/// instead of fp32), and a P zeroed between forward and backward zeroes dV (dV = Pᵀ·dO).
#[test]
fn gemm_attention_backward_reads_the_probabilities_its_forward_saved() {
    let (recomputed, ..) = gemm_attention_under(usize::MAX, false, false, None).unwrap();
    let (saved, ..) = gemm_attention_under(usize::MAX, false, true, None).unwrap();
    assert_eq!(saved[..2], recomputed[..2], "out and lse do not depend on saving P");
    let value = |bits: u32| f16::from_bits(bits as u16).to_f32();
    for (name, i) in [("dq", 2), ("dk", 3), ("dv", 4)] {
        let scale = recomputed[i].iter().map(|&b| value(b).abs()).fold(0.0, f32::max);
        assert!(scale > 0.1, "{name}: a gradient to compare ({scale})");
        for (n, (&a, &b)) in saved[i].iter().zip(&recomputed[i]).enumerate() {
            let (a, b) = (value(a), value(b));
            assert!((a - b).abs() <= 2e-3 * scale, "{name}[{n}]: {a} with P saved, {b} without");
        }
    }
    assert!(saved[4].iter().any(|&b| value(b) != 0.0), "dV is not zero to begin with");
    let (zeroed, ..) =
        gemm_attention_under(usize::MAX, false, true, Some(|p| p.fill(f16::ZERO))).unwrap();
    assert!(zeroed[4].iter().all(|&b| value(b) == 0.0), "dV = Pᵀ·dO with P zeroed");
}

/// `linear_backward`'s bias gradient three ways: summed in the weight gradient's product
/// (`with_fused_bias_grad(true)`), by the column-sum kernels (the default), and on a device whose
/// products refuse the fused sum (as a cuBLASLt without the kernel), where the backend must
/// fall back to those kernels: bit for bit the kernels' result, dx and dW too. Every way adds
/// onto the gradients already there (db starts nonzero), and the fused sum agrees with the
/// kernels' to fp32 rounding (the order of additions differs).
#[test]
fn a_device_without_the_fused_bias_gradient_falls_back_to_the_kernels() {
    use chingu_kernels::gpu::backend::GpuBackend;
    use chingu_kernels::{Backend, BufRole};
    let (rows, in_dim, out_dim) = (70, 24, 40);
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 29 + seed * 13) % 31) as f32 - 15.0) / 16.0).collect()
    };
    let run = |backend: GpuBackend| -> Vec<Vec<f32>> {
        let dy = backend.upload_f32_as(&values(rows * out_dim, 1), BufRole::Activation);
        let x = backend.upload_f32_as(&values(rows * in_dim, 2), BufRole::Activation);
        let w = backend.upload_f32_as(&values(out_dim * in_dim, 3), BufRole::Parameter);
        let mut dx = backend.zeros_as(rows * in_dim, BufRole::Activation);
        let mut dw = backend.upload_f32_as(&values(out_dim * in_dim, 4), BufRole::Gradient);
        let mut db = backend.upload_f32_as(&values(out_dim, 5), BufRole::Gradient);
        backend.linear_backward(
            Some(&mut dx),
            false,
            &mut dw,
            Some(&mut db),
            &dy,
            &x,
            &w,
            rows,
            in_dim,
            out_dim,
        );
        vec![backend.to_f32(&dx), backend.to_f32(&dw), backend.to_f32(&db)]
    };
    let fused = run(GpuBackend::new(Arc::new(EmuDevice::new())).with_fused_bias_grad(true));
    let kernels = run(GpuBackend::new(Arc::new(EmuDevice::new())).with_fused_bias_grad(false));
    let refused = run(GpuBackend::new(Arc::new(EmuDevice::new().without_bias_grad_epilogue()))
        .with_fused_bias_grad(true));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (name, (a, b)) in ["dx", "dW", "db"].iter().zip(refused.iter().zip(&kernels)) {
        assert_eq!(bits(a), bits(b), "{name}: the fallback must be the kernels' path");
    }
    // The inputs are multiples of 1/16 and the sums stay far below 2^20, so every fp32
    // addition is exact: both orders give the same bits, and the sum is the host's.
    let dy = values(rows * out_dim, 1);
    let prior = values(out_dim, 5);
    let want: Vec<f32> = (0..out_dim)
        .map(|c| prior[c] + (0..rows).map(|r| dy[r * out_dim + c]).sum::<f32>())
        .collect();
    assert_eq!(bits(&fused[2]), bits(&want), "fused db = prior + Σ_rows dy");
    assert_eq!(bits(&kernels[2]), bits(&want), "kernels' db = prior + Σ_rows dy");
    assert_eq!(bits(&fused[1]), bits(&kernels[1]), "dW does not depend on where db is summed");
}

/// Causal self-attention on the GEMM path in bands of 8 query rows: the forward computes and
/// stores P only where a band's rows can see keys, row i up to the end of its band (zeros
/// past the diagonal inside it), and never touches the scores above the bands' diagonal:
/// there the statistics buffer keeps its fresh device memory's fill (all bits 1). With bands
/// off, every key of every row is written. (That the results are right, banded or not, is
/// `gpu_kernels.rs`' attention test.)
#[test]
fn causal_bands_leave_the_scores_above_their_diagonal_untouched() {
    use chingu_kernels::backend::AttentionShape;
    use chingu_kernels::gpu::ops::{self, AttentionKernels};
    let dev: Gpu = Arc::new(EmuDevice::new());
    let (tq, band) = (20usize, 8usize);
    let s = AttentionShape {
        batch: 1,
        q_len: tq,
        k_len: tq,
        heads: 1,
        head_dim: 16,
        causal: true,
        q_offset: 0,
    };
    let n = tq * 16;
    let values: Vec<f16> = (0..n).map(|i| f16::from_f32(((i % 13) as f32 - 6.0) / 8.0)).collect();
    let x = DeviceBuffer::from_host(&dev, &values).unwrap();
    for (causal_band, half_scores) in [(band, false), (0, false), (band, true)] {
        let kernels =
            AttentionKernels::Gemm { scores_per_chunk: usize::MAX, causal_band, half_scores };
        let mut out = DeviceBuffer::<f16>::uninit(&dev, n).unwrap();
        let mut stats = DeviceBuffer::<f32>::uninit(&dev, kernels.stats_len(s)).unwrap();
        ops::attention_forward_using(kernels, &dev, &mut out, &mut stats, &x, &x, &x, &[tq], s)
            .unwrap();
        let stats = stats.to_host().unwrap();
        // P after lse from the first 16-byte boundary, rows of 24 keys (20 rounded up to 8).
        let probs: Vec<f16> =
            stats[tq.next_multiple_of(4)..].iter().flat_map(|x| halves(*x)).collect();
        let ld = tq.next_multiple_of(8);
        for i in 0..tq {
            let computed = if causal_band > 0 { ((i / band + 1) * band).min(tq) } else { tq };
            for j in 0..tq {
                let p = probs[i * ld + j];
                let what = format!("band {causal_band}: P[{i}][{j}] = {p}");
                if j >= computed {
                    assert_eq!(p.to_bits(), 0xFFFF, "{what}: above the bands, must be untouched");
                } else if j > i {
                    assert_eq!(p.to_bits(), 0, "{what}: masked inside the band, must be 0");
                } else {
                    assert!(p.to_f32() > 0.0 && p.to_f32() <= 1.0, "{what}: a probability");
                }
            }
        }
    }
}
