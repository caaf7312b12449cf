//! Every CUDA kernel against the CPU backend, through the same checked launchers
//! (`chingu_kernels::gpu::ops`): always on the emulated device (the .cu sources compiled by
//! g++ against `kernels/cuda/emu/cuda_emu.h`, run on the CPU — this is what CI runs), and
//! also on a real GPU when `CHINGU_GPU_TESTS=1` (then a missing GPU is a failure, not a skip).
//!
//! Inputs are fresh random values rounded to fp16; the CPU reference (f32) gets the same
//! rounded values. Outputs are poisoned (NaN) before every launch, so an element a kernel
//! never writes fails. The emulated device runs every launch in order and under a shuffled
//! schedule and fails on any difference (`gpu::test_devices`), so a data race that the
//! shuffled order exposes fails too, and so does a write outside a buffer (guard bytes). Tolerances, per op, are |got − want| ≤ atol + rtol·|want|:
//! - elementwise fp16 outputs: rtol 2·2⁻¹¹ (one fp16 rounding of the result, plus the
//!   rounding of `expf` differences), atol 1e-3 for values near zero;
//! - reductions into fp16 (LayerNorm, cross-entropy gradients): fp32 sums in another order
//!   than the CPU's plus one fp16 rounding: rtol 4e-3, atol 2e-3 (×max|want| for sums);
//! - fp32 results (dγ, dβ, bias and embedding gradients, AdamW): rtol 1e-4..1e-5, see each
//!   test; the mask of dropout and the fp16 casts must match exactly;
//! - fused attention (fp16 tensor-core products, fp32 softmax): P and dS are rounded to fp16
//!   (2⁻¹¹ relative) before their products and every output once more, and the sums over
//!   keys / queries mix signs, so an element's error scales with the largest terms of its
//!   sum, not with the element: atol 2e-3·max|want|, rtol 4e-3 (the worst error observed
//!   on the test shapes is 1e-3·max|want|; a wrong mask or a missed rescale is off by far
//!   more). The fp32
//!   log-sum-exp must match the one computed here in f64 to 1e-4·(1 + |want|).

use chingu_kernels::gpu::emu::EmuDevice;
use chingu_kernels::gpu::ops::AttentionKernels;
use chingu_kernels::gpu::{ops, sources, DeviceBuffer, Gpu, GpuError};
use chingu_kernels::rng::SplitMix64;
use chingu_kernels::{AdamW, AttentionShape, Backend, Cpu, DropoutKey};
use half::f16;

/// The devices every test body runs on.
fn devices() -> Vec<Gpu> {
    chingu_kernels::gpu::test_devices()
}

fn cpu() -> Cpu<f32> {
    Cpu::new()
}

/// Uniform values in [lo, hi), rounded to fp16 (returned as f16 and as their exact f32).
fn random_half(rng: &mut SplitMix64, n: usize, lo: f64, hi: f64) -> (Vec<f16>, Vec<f32>) {
    let h: Vec<f16> = (0..n).map(|_| f16::from_f64(lo + (hi - lo) * rng.next_f64())).collect();
    let f = h.iter().map(|x| x.to_f32()).collect();
    (h, f)
}

fn random_f32(rng: &mut SplitMix64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| (lo + (hi - lo) * rng.next_f64()) as f32).collect()
}

fn poisoned_half(dev: &Gpu, n: usize) -> DeviceBuffer<f16> {
    DeviceBuffer::from_host(dev, &vec![f16::NAN; n]).unwrap()
}

fn poisoned_f32(dev: &Gpu, n: usize) -> DeviceBuffer<f32> {
    // NaN as an f32 and as both halves of one (where a buffer holds fp16 pairs, as the GEMM
    // attention path's P after lse).
    DeviceBuffer::from_host(dev, &vec![f32::from_bits(0x7FC0_7FC0); n]).unwrap()
}

fn up<T: chingu_kernels::gpu::Element>(dev: &Gpu, data: &[T]) -> DeviceBuffer<T> {
    DeviceBuffer::from_host(dev, data).unwrap()
}

fn down_half(buf: &DeviceBuffer<f16>) -> Vec<f32> {
    buf.to_host().unwrap().iter().map(|x| x.to_f32()).collect()
}

/// Fails with the worst element when any |got − want| > atol + rtol·|want| (NaN fails).
fn assert_close(what: &str, dev: &Gpu, got: &[f32], want: &[f32], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what} on {}: length", dev.name());
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        let within = excess <= 0.0;
        if !within && worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
            worst = Some((i, if excess.is_nan() { f64::INFINITY } else { excess }));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what} on {}: element {i} is {} but the CPU backend gives {} (atol {atol}, rtol {rtol})",
            dev.name(),
            got[i],
            want[i]
        );
    }
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
}

const SIZES: &[usize] = &[1, 31, 256, 4099, 70_001];

#[test]
fn every_kernel_in_the_sources_is_in_the_emulated_build() {
    let mut in_sources: Vec<String> =
        sources::FILES.iter().flat_map(|(_, src)| sources::kernel_names(src)).collect();
    let mut emulated = EmuDevice::kernel_names();
    in_sources.sort();
    emulated.sort();
    assert!(in_sources.len() >= 20, "found only {in_sources:?}");
    assert_eq!(in_sources, emulated);
}

#[test]
fn casts_round_to_nearest_even_exactly() {
    let mut rng = SplitMix64(1);
    for dev in devices() {
        for &n in SIZES {
            // Values across fp16's range, subnormals and overflow included.
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let mag = 10f64.powf(-9.0 + 14.0 * rng.next_f64());
                    let v = if i % 2 == 0 { mag } else { -mag };
                    v as f32
                })
                .collect();
            let input = up(&dev, &x);
            let mut out = poisoned_half(&dev, n);
            ops::cast_f32_to_f16(&dev, &mut out, &input).unwrap();
            let got: Vec<u16> = out.to_host().unwrap().iter().map(|h| h.to_bits()).collect();
            let want: Vec<u16> = x.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            assert_eq!(got, want, "cast_f32_to_f16 on {}", dev.name());
            let mut back = poisoned_f32(&dev, n);
            ops::cast_f16_to_f32(&dev, &mut back, &out).unwrap();
            let want_back: Vec<u32> =
                want.iter().map(|&b| f16::from_bits(b).to_f32().to_bits()).collect();
            let got_back: Vec<u32> = back.to_host().unwrap().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_back, want_back, "cast_f16_to_f32 on {}", dev.name());
        }
    }
}

#[test]
fn activations_match_the_cpu_backend() {
    let mut rng = SplitMix64(2);
    for dev in devices() {
        for &n in SIZES {
            let (xh, x) = random_half(&mut rng, n, -6.0, 6.0);
            let (dyh, dy) = random_half(&mut rng, n, -2.0, 2.0);
            let (xd, dyd) = (up(&dev, &xh), up(&dev, &dyh));
            type Fwd = fn(&Gpu, &mut DeviceBuffer<f16>, &DeviceBuffer<f16>) -> Result<(), GpuError>;
            type Bwd = fn(
                &Gpu,
                &mut DeviceBuffer<f16>,
                &DeviceBuffer<f16>,
                &DeviceBuffer<f16>,
            ) -> Result<(), GpuError>;
            type CpuFwd = fn(&Cpu<f32>, &mut Vec<f32>, &Vec<f32>);
            type CpuBwd = fn(&Cpu<f32>, &mut Vec<f32>, &Vec<f32>, &Vec<f32>);
            let cases: [(&str, Fwd, Bwd, CpuFwd, CpuBwd); 2] = [
                (
                    "gelu",
                    ops::gelu_forward,
                    ops::gelu_backward,
                    |c, y, x| c.gelu_forward(y, x),
                    |c, dx, dy, x| c.gelu_backward(dx, dy, x),
                ),
                (
                    "relu",
                    ops::relu_forward,
                    ops::relu_backward,
                    |c, y, x| c.relu_forward(y, x),
                    |c, dx, dy, x| c.relu_backward(dx, dy, x),
                ),
            ];
            for (name, fwd, bwd, cpu_fwd, cpu_bwd) in cases {
                let mut y = poisoned_half(&dev, n);
                fwd(&dev, &mut y, &xd).unwrap();
                let mut want = vec![0.0; n];
                cpu_fwd(&cpu(), &mut want, &x);
                assert_close(
                    &format!("{name} forward, n {n}"),
                    &dev,
                    &down_half(&y),
                    &want,
                    1e-3,
                    2.0 / 2048.0,
                );
                let mut dx = poisoned_half(&dev, n);
                bwd(&dev, &mut dx, &dyd, &xd).unwrap();
                let mut want = vec![0.0; n];
                cpu_bwd(&cpu(), &mut want, &dy, &x);
                assert_close(
                    &format!("{name} backward, n {n}"),
                    &dev,
                    &down_half(&dx),
                    &want,
                    1e-3,
                    2.0 / 2048.0,
                );
            }
        }
    }
}

#[test]
fn residual_scale_and_bias_match_the_cpu_backend() {
    let mut rng = SplitMix64(3);
    for dev in devices() {
        // Bias gradient: the scalar kernel (1, 33 columns) and the tiled one (multiples of
        // 8: a tile's columns partly past the end, a partial last chunk of rows, many column
        // tiles, 3 chunks; 320-row chunks, 64 of them, over one and over three tiles).
        let shapes = [
            (1, 1),
            (7, 33),
            (130, 256),
            (3, 1000),
            (2000, 24),
            (257, 2056),
            (700, 72),
            (20480, 8),
            (20480, 136),
        ];
        for &(rows, cols) in &shapes {
            let n = rows * cols;
            let (ah, a) = random_half(&mut rng, n, -4.0, 4.0);
            let (bh, b) = random_half(&mut rng, n, -4.0, 4.0);
            let mut acc = up(&dev, &ah);
            ops::add_assign(&dev, &mut acc, &up(&dev, &bh)).unwrap();
            let mut want = a.clone();
            cpu().add_assign(&mut want, &b);
            assert_close("add_assign", &dev, &down_half(&acc), &want, 1e-3, 1.0 / 2048.0);

            // fp32 accumulation (gradients over micro-batches): exact as on the CPU.
            let (fa, fb) = (random_f32(&mut rng, n, -4.0, 4.0), random_f32(&mut rng, n, -4.0, 4.0));
            let mut facc = up(&dev, &fa);
            ops::add_assign_f32(&dev, &mut facc, &up(&dev, &fb)).unwrap();
            let mut fwant = fa.clone();
            cpu().add_assign(&mut fwant, &fb);
            assert_close("add_assign_f32", &dev, &facc.to_host().unwrap(), &fwant, 0.0, 0.0);

            ops::scale_f16(&dev, &mut acc, 0.37).unwrap();
            let mut want_scaled =
                down_half(&up(&dev, &want.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()));
            cpu().scale(&mut want_scaled, 0.37);
            assert_close("scale_f16", &dev, &down_half(&acc), &want_scaled, 1e-3, 2.0 / 2048.0);

            // Bias add, and its gradient accumulated onto existing values.
            let (biash, bias) = random_half(&mut rng, cols, -1.0, 1.0);
            let mut y = up(&dev, &ah);
            ops::bias_add(&dev, &mut y, &up(&dev, &biash), rows, cols).unwrap();
            let want: Vec<f32> = (0..n).map(|i| a[i] + bias[i % cols]).collect();
            assert_close("bias_add", &dev, &down_half(&y), &want, 1e-3, 1.0 / 2048.0);
            let start = random_f32(&mut rng, cols, -1.0, 1.0);
            let mut db = up(&dev, &start);
            ops::bias_backward(&dev, &mut db, &up(&dev, &bh), rows, cols).unwrap();
            let want: Vec<f32> = (0..cols)
                .map(|c| {
                    start[c] + (0..rows).map(|r| f64::from(b[r * cols + c])).sum::<f64>() as f32
                })
                .collect();
            assert_close(
                "bias_backward",
                &dev,
                &db.to_host().unwrap(),
                &want,
                1e-4 * rows as f64,
                1e-5,
            );
        }
    }
}

/// The bias gradient in its one-launch tiled form (`bias_backward_tile_f16`: the last block
/// of each column tile adds the chunks' partial rows) has exactly the bits of the sums in the
/// documented order, computed here in f32: each chunk's rows by row lane (rows l, l + 32, … of
/// the chunk), the 32 lane sums in lane order; then the chunks' partial rows by lane again
/// (chunks l, l + 32, …), those 32 sums in lane order, added to the start value. Shapes with
/// one chunk, several, more chunks than 32 lanes, a short last chunk and a ragged last tile
/// of columns (cols not a multiple of 64), and one wider (4,104 columns: 65 tiles) than all
/// the shapes before it, so the device's counters are made anew. A second call must add the
/// same amount again: a call's last blocks put the device's per-tile counters back to zero for
/// the next call (a counter left at the chunk count makes no block of the next call the last,
/// and leaves `db` as it was).
#[test]
fn tiled_bias_gradient_adds_its_chunks_in_the_documented_order() {
    let mut rng = SplitMix64(0xb1a5);
    for dev in devices() {
        let shapes = [(300, 64), (5000, 200), (18_432, 136), (40_000, 24), (300, 4_104)];
        for &(rows, cols) in &shapes {
            let (dyh, dy) = random_half(&mut rng, rows * cols, -4.0, 4.0);
            let start = random_f32(&mut rng, cols, -1.0, 1.0);
            let chunk = ops::bias_grad_chunk(rows, true);
            let chunks = rows.div_ceil(chunk);
            let lane_order = |terms: &mut dyn Iterator<Item = (usize, f32)>| -> f32 {
                let mut lanes = [0f32; 32];
                for (i, v) in terms {
                    lanes[i % 32] += v;
                }
                lanes.iter().fold(0f32, |t, &l| t + l)
            };
            let sums: Vec<f32> = (0..cols)
                .map(|c| {
                    let partial = |k: usize| {
                        let (first, last) = (k * chunk, ((k + 1) * chunk).min(rows));
                        lane_order(&mut (first..last).map(|r| (r - first, dy[r * cols + c])))
                    };
                    lane_order(&mut (0..chunks).map(|k| (k, partial(k))))
                })
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut db = up(&dev, &start);
            let dy_dev = up(&dev, &dyh);
            let mut want = start.clone();
            for call in 1..=2 {
                ops::bias_backward(&dev, &mut db, &dy_dev, rows, cols).unwrap();
                want.iter_mut().zip(&sums).for_each(|(w, s)| *w += s);
                assert_eq!(
                    bits(&db.to_host().unwrap()),
                    bits(&want),
                    "call {call}, {rows} × {cols} ({chunks} chunks) on {}",
                    dev.name()
                );
            }
        }
    }
}

/// The bias gradients of several tensors of one shape in one launch (`bias_backward_many`:
/// `bias_backward_tiles_f16`, a tensor per grid.z) have exactly the bits of one
/// `bias_backward` each, for 2, 3 and 4 tensors, over shapes with one chunk, many, a ragged
/// last tile and one wider than the rest (the device's counters made anew for 4 × 65 tiles);
/// called twice, so each tensor's counters must be back at zero after the first call (and a
/// tensor's counters must be its own: one shared between tensors makes a block of another
/// tensor the last of its tile). Five tensors take `bias_backward` each (its tiled kernel, one
/// launch each), and columns not a multiple of 8 its untiled pair of launches each, with the
/// same bits; an emulated device that counts its launches shows which path ran.
#[test]
fn bias_gradients_of_several_tensors_in_one_launch_equal_one_launch_each() {
    let mut rng = SplitMix64(0xb1a6);
    for dev in devices() {
        let cases = [
            (2, 300, 64),
            (3, 5000, 200),
            (3, 18_432, 136),
            (4, 700, 72),
            (4, 300, 4_104),
            (5, 300, 64),
            (3, 300, 36),
        ];
        for &(count, rows, cols) in &cases {
            let dys: Vec<DeviceBuffer<f16>> = (0..count)
                .map(|_| up(&dev, &random_half(&mut rng, rows * cols, -4.0, 4.0).0))
                .collect();
            let starts: Vec<Vec<f32>> =
                (0..count).map(|_| random_f32(&mut rng, cols, -1.0, 1.0)).collect();
            let mut each: Vec<DeviceBuffer<f32>> = starts.iter().map(|s| up(&dev, s)).collect();
            let mut many: Vec<DeviceBuffer<f32>> = starts.iter().map(|s| up(&dev, s)).collect();
            let bits = |v: &DeviceBuffer<f32>| {
                v.to_host().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            for call in 1..=2 {
                for (db, dy) in each.iter_mut().zip(&dys) {
                    ops::bias_backward(&dev, db, dy, rows, cols).unwrap();
                }
                let mut dbs: Vec<&mut DeviceBuffer<f32>> = many.iter_mut().collect();
                let dy_refs: Vec<&DeviceBuffer<f16>> = dys.iter().collect();
                ops::bias_backward_many(&dev, &mut dbs, &dy_refs, rows, cols).unwrap();
                for z in 0..count {
                    assert_eq!(
                        bits(&many[z]),
                        bits(&each[z]),
                        "call {call}, tensor {z} of {count}, {rows} × {cols} on {}",
                        dev.name()
                    );
                    assert_ne!(bits(&many[z]), bits(&up(&dev, &starts[z])), "tensor {z} added to");
                }
            }
        }
        let (mut db, dy) = (up(&dev, &[0f32; 8]), up(&dev, &[f16::ZERO; 16]));
        let mut dbs = vec![&mut db];
        let err = ops::bias_backward_many(&dev, &mut dbs, &[&dy, &dy], 2, 8).unwrap_err();
        assert!(err.to_string().contains("1 bias gradients for 2"), "{err}");
    }
    let schedule = chingu_kernels::gpu::emu::Schedule::TESTS;
    let schedule = chingu_kernels::gpu::emu::Schedule::from_env(schedule).unwrap();
    let counted = std::sync::Arc::new(EmuDevice::with_schedule(schedule));
    let dev: Gpu = counted.clone();
    // (tensors, columns, launches of the batched, tiled and untiled kernels)
    let cases = [(3, 64, [1, 0, 0]), (4, 72, [1, 0, 0]), (5, 64, [0, 5, 0]), (3, 36, [0, 0, 3])];
    let kernels =
        ["bias_backward_tiles_f16", "bias_backward_tile_f16", "bias_backward_partial_f16"];
    for (count, cols, launches) in cases {
        let rows = 300;
        let dys: Vec<DeviceBuffer<f16>> = (0..count)
            .map(|_| up(&dev, &random_half(&mut rng, rows * cols, -4.0, 4.0).0))
            .collect();
        let mut dbs: Vec<DeviceBuffer<f32>> =
            (0..count).map(|_| up(&dev, &vec![0f32; cols])).collect();
        let before = kernels.map(|k| counted.launches_of(k));
        let mut db_refs: Vec<&mut DeviceBuffer<f32>> = dbs.iter_mut().collect();
        let dy_refs: Vec<&DeviceBuffer<f16>> = dys.iter().collect();
        ops::bias_backward_many(&dev, &mut db_refs, &dy_refs, rows, cols).unwrap();
        let ran: Vec<usize> =
            kernels.iter().zip(before).map(|(k, b)| counted.launches_of(k) - b).collect();
        assert_eq!(ran, launches, "{count} tensors of {cols} columns: {kernels:?}");
    }
}

#[test]
fn dropout_drops_exactly_what_the_cpu_backend_drops() {
    let mut rng = SplitMix64(4);
    for dev in devices() {
        for &n in SIZES {
            // 1e-6 rounds to no dropout at all (below 2^-17): nothing dropped or scaled.
            for &p in &[0.1f32, 0.5, 1e-6] {
                // Inputs away from zero, so a dropped element is exactly the zeros.
                let (xh, x) = random_half(&mut rng, n, 0.5, 3.0);
                let key = DropoutKey { seed: 7 + n as u64, step: 3, site: 11 };
                let mut buf = up(&dev, &xh);
                ops::dropout(&dev, &mut buf, p, key).unwrap();
                let got = down_half(&buf);
                let mut want = x.clone();
                cpu().dropout(&mut want, p, key);
                for i in 0..n {
                    assert_eq!(
                        got[i] == 0.0,
                        want[i] == 0.0,
                        "dropout mask at {i} of {n} on {}",
                        dev.name()
                    );
                }
                assert_close(&format!("dropout p {p}"), &dev, &got, &want, 1e-3, 1.0 / 2048.0);
            }
        }
    }
}

/// The fused dropout kernels (`add_dropped`, `dropped_copy`) against the ops they replace,
/// bit for bit, and against the CPU backend's dropout then add/copy.
#[test]
fn fused_dropout_equals_dropout_then_its_op() {
    let mut rng = SplitMix64(44);
    for dev in devices() {
        for &n in SIZES {
            for &p in &[0.1f32, 0.5] {
                let (xh, x) = random_half(&mut rng, n, -3.0, 3.0);
                let (acch, acc) = random_half(&mut rng, n, -2.0, 2.0);
                let key = DropoutKey { seed: 3 + n as u64, step: 9, site: 5 };
                let xd = up(&dev, &xh);

                // The unfused sequences on the device: dropout, then add / nothing.
                let mut dropped = up(&dev, &xh);
                ops::dropout(&dev, &mut dropped, p, key).unwrap();
                let mut want_acc = up(&dev, &acch);
                ops::add_assign(&dev, &mut want_acc, &dropped).unwrap();

                // x = acc + dropout(x), in place over x.
                let mut got_acc = up(&dev, &xh);
                ops::add_dropped(&dev, &mut got_acc, &up(&dev, &acch), p, key).unwrap();
                let mut got_copy = poisoned_half(&dev, n);
                ops::dropped_copy(&dev, &mut got_copy, &xd, p, key).unwrap();
                let bits = |b: &DeviceBuffer<f16>| -> Vec<u16> {
                    b.to_host().unwrap().iter().map(|h| h.to_bits()).collect()
                };
                assert_eq!(bits(&got_acc), bits(&want_acc), "add_dropped, n {n}, p {p}");
                assert_eq!(bits(&got_copy), bits(&dropped), "dropped_copy, n {n}, p {p}");
                assert_eq!(bits(&xd), xh.iter().map(|h| h.to_bits()).collect::<Vec<_>>());

                // And the CPU backend's dropout, then its add.
                let mut cpu_dropped = x.clone();
                cpu().dropout(&mut cpu_dropped, p, key);
                let mut cpu_acc = acc.clone();
                cpu().add_assign(&mut cpu_acc, &cpu_dropped);
                // The device rounds the dropped value to fp16 before adding (2⁻¹¹ of it), and
                // the sum once more (2⁻¹¹ of the result).
                let what = format!("add_dropped p {p}");
                let atol = max_abs(&cpu_dropped) / 2048.0;
                assert_close(&what, &dev, &down_half(&got_acc), &cpu_acc, atol, 1.0 / 2048.0);
                let what = format!("dropped_copy p {p}");
                assert_close(&what, &dev, &down_half(&got_copy), &cpu_dropped, 1e-3, 1.0 / 2048.0);
            }
        }
    }
}

#[test]
fn layernorm_matches_the_cpu_backend() {
    let mut rng = SplitMix64(5);
    for dev in devices() {
        // Widths for every kernel family: the vector kernels (multiples of 8 up to 1,024:
        // 16–256 vec1, 384 vec2, 520 and 768 vec3 with a partial last vector in 520, 1,000
        // vec4; 300 and 1,000 rows give many blocks of several rows a warp, the last block
        // part full), the scalar warp kernels (100, 777: not multiples of 8) and the block
        // kernel (1,030).
        for &(rows, width) in &[
            (1, 16),
            (37, 200),
            (70, 256),
            (300, 384),
            (40, 520),
            (5, 768),
            (1000, 768),
            (20, 1000),
            (9, 100),
            (600, 100), // 150 warps' partials: column_sum_f32's groups take several each
            (11, 777),
            (33, 1030),
        ] {
            let n = rows * width;
            // A row mean far from zero checks the two-pass variance.
            let (xh, x) = random_half(&mut rng, n, 2.0, 6.0);
            let (gh, g) = random_half(&mut rng, width, 0.5, 1.5);
            let (bh, b) = random_half(&mut rng, width, -0.5, 0.5);
            let (xd, gd, bd) = (up(&dev, &xh), up(&dev, &gh), up(&dev, &bh));
            let mut y = poisoned_half(&dev, n);
            let (mut mean, mut rstd) = (poisoned_f32(&dev, rows), poisoned_f32(&dev, rows));
            ops::layernorm_forward(&dev, &mut y, &mut mean, &mut rstd, &xd, &gd, &bd, rows, width)
                .unwrap();
            let (mut want_y, mut want_mean, mut want_rstd) =
                (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
            cpu().layernorm_forward(
                &mut want_y,
                &mut want_mean,
                &mut want_rstd,
                &x,
                &g,
                &b,
                rows,
                width,
            );
            assert_close("layernorm y", &dev, &down_half(&y), &want_y, 2e-3, 4e-3);
            assert_close("layernorm mean", &dev, &mean.to_host().unwrap(), &want_mean, 1e-5, 1e-5);
            assert_close("layernorm rstd", &dev, &rstd.to_host().unwrap(), &want_rstd, 1e-5, 1e-3);

            // Backward from the CPU's statistics, accumulating onto non-zero dx, dγ, dβ.
            let (dyh, dy) = random_half(&mut rng, n, -1.0, 1.0);
            let (dx0h, dx0) = random_half(&mut rng, n, -0.5, 0.5);
            let (dg0, db0) =
                (random_f32(&mut rng, width, -1.0, 1.0), random_f32(&mut rng, width, -1.0, 1.0));
            let mut dx = up(&dev, &dx0h);
            let (mut dgam, mut dbet) = (up(&dev, &dg0), up(&dev, &db0));
            ops::layernorm_backward(
                &dev,
                &mut dx,
                &mut dgam,
                &mut dbet,
                &up(&dev, &dyh),
                &xd,
                &up(&dev, &want_mean),
                &up(&dev, &want_rstd),
                &gd,
                rows,
                width,
            )
            .unwrap();
            let (mut want_dx, mut want_dg, mut want_db) = (dx0.clone(), dg0.clone(), db0.clone());
            cpu().layernorm_backward(
                &mut want_dx,
                &mut want_dg,
                &mut want_db,
                &dy,
                &x,
                &want_mean,
                &want_rstd,
                &g,
                rows,
                width,
            );
            let dx_got = down_half(&dx);
            assert_close(
                "layernorm dx",
                &dev,
                &dx_got,
                &want_dx,
                2e-3 * max_abs(&want_dx).max(1.0),
                4e-3,
            );
            let sum_tol = 1e-5 * rows as f64;
            assert_close(
                "layernorm dgamma",
                &dev,
                &dgam.to_host().unwrap(),
                &want_dg,
                sum_tol,
                1e-4,
            );
            assert_close(
                "layernorm dbeta",
                &dev,
                &dbet.to_host().unwrap(),
                &want_db,
                sum_tol,
                1e-4,
            );
        }
    }
}

/// The residual stream's fused LayerNorm kernels give, bit for bit, the pairs they replace:
/// forward, `add_dropped` (or `add_assign` at p 0) then `layernorm_forward`; backward,
/// `layernorm_backward` then `dropped_copy` — at every vector width (and at widths the vector
/// kernels do not take, where the launcher runs the pair itself), with and without dropout.
/// (The pairs are checked against the CPU backend above and in the dropout tests.)
#[test]
fn fused_residual_layernorm_equals_the_kernels_it_replaces() {
    let mut rng = SplitMix64(14);
    for dev in devices() {
        for &(rows, width) in &[(37, 200), (300, 384), (70, 768), (20, 1000), (9, 100), (5, 1030)] {
            for p in [0.0f32, 0.1] {
                let n = rows * width;
                let what = format!("{rows} × {width}, p {p}, on {}", dev.name());
                let key = DropoutKey { seed: 21 + n as u64, step: 4, site: 10_002 };
                let (sh, _) = random_half(&mut rng, n, -1.0, 1.0);
                let (rh, _) = random_half(&mut rng, n, 2.0, 6.0);
                let (gh, _) = random_half(&mut rng, width, 0.5, 1.5);
                let (bh, _) = random_half(&mut rng, width, -0.5, 0.5);
                let (gd, bd, rd) = (up(&dev, &gh), up(&dev, &bh), up(&dev, &rh));
                let half_bits = |b: &DeviceBuffer<f16>| -> Vec<u16> {
                    b.to_host().unwrap().iter().map(|x| x.to_bits()).collect()
                };
                let float_bits = |b: &DeviceBuffer<f32>| -> Vec<u32> {
                    b.to_host().unwrap().iter().map(|x| x.to_bits()).collect()
                };

                // Forward: the pair, then the fused kernel on the same inputs.
                let mut pair_x = up(&dev, &sh);
                if p > 0.0 {
                    ops::add_dropped(&dev, &mut pair_x, &rd, p, key).unwrap();
                } else {
                    ops::add_assign(&dev, &mut pair_x, &rd).unwrap();
                }
                let (mut pair_y, mut pair_mean, mut pair_rstd) =
                    (poisoned_half(&dev, n), poisoned_f32(&dev, rows), poisoned_f32(&dev, rows));
                ops::layernorm_forward(
                    &dev,
                    &mut pair_y,
                    &mut pair_mean,
                    &mut pair_rstd,
                    &pair_x,
                    &gd,
                    &bd,
                    rows,
                    width,
                )
                .unwrap();
                let mut x = up(&dev, &sh);
                let (mut y, mut mean, mut rstd) =
                    (poisoned_half(&dev, n), poisoned_f32(&dev, rows), poisoned_f32(&dev, rows));
                ops::add_dropped_layernorm_forward(
                    &dev, &mut x, &rd, p, key, &mut y, &mut mean, &mut rstd, &gd, &bd, rows, width,
                )
                .unwrap();
                assert_eq!(half_bits(&x), half_bits(&pair_x), "forward sum, {what}");
                assert_eq!(half_bits(&y), half_bits(&pair_y), "forward y, {what}");
                assert_eq!(float_bits(&mean), float_bits(&pair_mean), "forward mean, {what}");
                assert_eq!(float_bits(&rstd), float_bits(&pair_rstd), "forward rstd, {what}");
                if p > 0.0 {
                    let zeros =
                        x.to_host().unwrap().iter().zip(&rh).filter(|(a, b)| a == b).count();
                    assert!(zeros > 0 && zeros < n, "{what}: some elements dropped ({zeros})");
                }

                // Backward onto non-zero dx, dγ, dβ, from the forward's statistics.
                let (dyh, _) = random_half(&mut rng, n, -1.0, 1.0);
                let (dx0, _) = random_half(&mut rng, n, -0.5, 0.5);
                let (dg0, db0) = (
                    random_f32(&mut rng, width, -1.0, 1.0),
                    random_f32(&mut rng, width, -1.0, 1.0),
                );
                let dyd = up(&dev, &dyh);
                let (mut pair_dx, mut pair_dg, mut pair_db) =
                    (up(&dev, &dx0), up(&dev, &dg0), up(&dev, &db0));
                ops::layernorm_backward(
                    &dev,
                    &mut pair_dx,
                    &mut pair_dg,
                    &mut pair_db,
                    &dyd,
                    &x,
                    &mean,
                    &rstd,
                    &gd,
                    rows,
                    width,
                )
                .unwrap();
                let mut pair_dropped = poisoned_half(&dev, n);
                ops::dropped_copy(&dev, &mut pair_dropped, &pair_dx, p, key).unwrap();
                let (mut dx, mut dg, mut db) = (up(&dev, &dx0), up(&dev, &dg0), up(&dev, &db0));
                let mut dropped = poisoned_half(&dev, n);
                ops::layernorm_backward_dropped(
                    &dev,
                    &mut dx,
                    &mut dg,
                    &mut db,
                    &dyd,
                    &x,
                    &mean,
                    &rstd,
                    &gd,
                    rows,
                    width,
                    &mut dropped,
                    p,
                    key,
                )
                .unwrap();
                assert_eq!(half_bits(&dx), half_bits(&pair_dx), "backward dx, {what}");
                assert_eq!(float_bits(&dg), float_bits(&pair_dg), "backward dγ, {what}");
                assert_eq!(float_bits(&db), float_bits(&pair_db), "backward dβ, {what}");
                assert_eq!(half_bits(&dropped), half_bits(&pair_dropped), "dropout(dx), {what}");
            }
        }
    }
}

#[test]
fn embedding_matches_the_cpu_backend() {
    let mut rng = SplitMix64(6);
    for dev in devices() {
        for &(vocab, width, rows) in &[(5, 8, 1), (50, 24, 100), (300, 256, 333)] {
            let (th, t) = random_half(&mut rng, vocab * width, -1.0, 1.0);
            let (ph, p) = random_half(&mut rng, 40 * width, -1.0, 1.0);
            // Few distinct ids, so many rows share one (the backward's hard case).
            let ids: Vec<u32> = (0..rows)
                .map(|_| (rng.next_u64() % vocab.min(7) as u64) as u32 * (vocab as u32 / 7).max(1))
                .collect();
            let pos: Vec<usize> = (0..rows).map(|i| i % 40).collect();
            let scale = (width as f32).sqrt();
            let mut out = poisoned_half(&dev, rows * width);
            ops::embedding_forward(
                &dev,
                &mut out,
                &up(&dev, &th),
                &up(&dev, &ph),
                &ids,
                &pos,
                width,
                scale,
            )
            .unwrap();
            let mut want = vec![0.0; rows * width];
            cpu().embedding_forward(&mut want, &t, &p, &ids, &pos, width, scale);
            assert_close("embedding forward", &dev, &down_half(&out), &want, 1e-3, 1.0 / 2048.0);

            let (dh, d) = random_half(&mut rng, rows * width, -1.0, 1.0);
            let start = random_f32(&mut rng, vocab * width, -1.0, 1.0);
            let mut dt = up(&dev, &start);
            ops::embedding_backward(&dev, &mut dt, &up(&dev, &dh), &ids, width, scale).unwrap();
            let mut want = start.clone();
            cpu().embedding_backward(&mut want, &d, &ids, width, scale);
            assert_close(
                "embedding backward",
                &dev,
                &dt.to_host().unwrap(),
                &want,
                1e-5 * rows as f64 * f64::from(scale),
                1e-5,
            );
        }
        let err = ops::embedding_forward(
            &dev,
            &mut poisoned_half(&dev, 8),
            &up(&dev, &[f16::ZERO; 16]),
            &up(&dev, &[f16::ZERO; 8]),
            &[2],
            &[0],
            8,
            1.0,
        );
        assert!(
            matches!(err, Err(GpuError::Shape { .. })),
            "id 2 of a 2-row table must be rejected: {err:?}"
        );
    }
}

#[test]
fn cross_entropy_matches_the_cpu_backend() {
    let mut rng = SplitMix64(7);
    const IGNORE: u32 = 0;
    for dev in devices() {
        for &(rows, vocab) in &[(1, 7), (37, 1000), (9, 16_000)] {
            let (lh, l) = random_half(&mut rng, rows * vocab, -8.0, 8.0);
            let targets: Vec<u32> = (0..rows)
                .map(|i| {
                    if i % 5 == 3 {
                        IGNORE
                    } else {
                        1 + (rng.next_u64() % (vocab as u64 - 1)) as u32
                    }
                })
                .collect();
            for &loss_scale in &[1.0f32, 1024.0] {
                let mut dl = poisoned_half(&dev, rows * vocab);
                let (loss, counted) = ops::cross_entropy(
                    &dev,
                    &mut dl,
                    &up(&dev, &lh),
                    &targets,
                    vocab,
                    IGNORE,
                    0.1,
                    loss_scale,
                )
                .unwrap();
                let mut want_grad = vec![0.0; rows * vocab];
                let (want_loss, want_counted) =
                    cpu().cross_entropy(&mut want_grad, &l, &targets, vocab, IGNORE, 0.1);
                assert_eq!(counted, want_counted);
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                    "loss {loss} vs {want_loss} on {}",
                    dev.name()
                );
                let got: Vec<f32> = down_half(&dl).iter().map(|g| g / loss_scale).collect();
                let atol = 2e-3 * max_abs(&want_grad);
                assert_close(
                    &format!("cross-entropy grad, scale {loss_scale}"),
                    &dev,
                    &got,
                    &want_grad,
                    atol,
                    4e-3,
                );
            }
        }
    }
}

#[test]
fn gradient_norm_is_exact_and_deterministic() {
    let mut rng = SplitMix64(8);
    for dev in devices() {
        let tensors: Vec<Vec<f32>> =
            [1usize, 1000, 70_001, 3].iter().map(|&n| random_f32(&mut rng, n, -3.0, 3.0)).collect();
        let bufs: Vec<DeviceBuffer<f32>> = tensors.iter().map(|t| up(&dev, t)).collect();
        let refs: Vec<&DeviceBuffer<f32>> = bufs.iter().collect();
        let got = ops::sum_squares(&dev, &refs).unwrap();
        let want: f64 = tensors.iter().flatten().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((got - want).abs() <= 1e-12 * want, "Σx² {got} vs {want} on {}", dev.name());
        assert_eq!(
            got.to_bits(),
            ops::sum_squares(&dev, &refs).unwrap().to_bits(),
            "same bits twice"
        );
        let cpu_sum: f64 = tensors.iter().map(|t| cpu().sum_squares(t)).sum();
        assert!((got - cpu_sum).abs() <= 1e-12 * want);
    }
}

#[test]
fn unscale_detects_overflow() {
    let mut rng = SplitMix64(9);
    for dev in devices() {
        let a = random_f32(&mut rng, 5000, -100.0, 100.0);
        let mut b = random_f32(&mut rng, 300, -100.0, 100.0);
        let (mut da, mut db) = (up(&dev, &a), up(&dev, &b));
        assert!(!ops::unscale(&dev, &mut [&mut da, &mut db], 1.0 / 64.0).unwrap());
        let want: Vec<f32> = a.iter().map(|v| v * (1.0 / 64.0)).collect();
        assert_close("unscale", &dev, &da.to_host().unwrap(), &want, 0.0, 0.0);
        b[123] = f32::INFINITY;
        let mut db = up(&dev, &b);
        assert!(ops::unscale(&dev, &mut [&mut da, &mut db], 0.5).unwrap(), "inf must be reported");
        b[123] = f32::NAN;
        let mut db = up(&dev, &b);
        assert!(ops::unscale(&dev, &mut [&mut db], 0.5).unwrap(), "NaN must be reported");

        let (h, _) = random_half(&mut rng, 777, -1.0, 1.0);
        assert!(ops::all_finite_f16(&dev, &up(&dev, &h)).unwrap());
        let mut h2 = h.clone();
        h2[776] = f16::INFINITY;
        assert!(!ops::all_finite_f16(&dev, &up(&dev, &h2)).unwrap());
    }
}

#[test]
fn adamw_matches_the_cpu_backend() {
    let mut rng = SplitMix64(10);
    for dev in devices() {
        for &n in SIZES {
            let p = random_f32(&mut rng, n, -1.0, 1.0);
            let g = random_f32(&mut rng, n, -100.0, 100.0);
            let m = random_f32(&mut rng, n, -0.01, 0.01);
            let v = random_f32(&mut rng, n, 0.0, 1e-4);
            let s = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-9,
                weight_decay: 0.01,
                step: 17,
                // A loss scale's inverse times a clipping factor, as the optimizer passes.
                grad_scale: 0.37 / 1024.0,
            };
            let (mut dp, mut dm, mut dv) = (up(&dev, &p), up(&dev, &m), up(&dev, &v));
            let mut half = poisoned_half(&dev, n);
            ops::adamw(&dev, &mut dp, Some(&mut half), &up(&dev, &g), &mut dm, &mut dv, s).unwrap();
            let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
            cpu().adamw(&mut wp, &g, &mut wm, &mut wv, s);
            let got_p = dp.to_host().unwrap();
            // Unfused and in the CPU's order (adamw.cu), the update is the CPU's, bit for bit.
            let bits = |x: &[f32]| -> Vec<u32> { x.iter().map(|v| v.to_bits()).collect() };
            assert_eq!(bits(&got_p), bits(&wp), "adamw param on {}, n {n}", dev.name());
            assert_eq!(bits(&dm.to_host().unwrap()), bits(&wm), "adamw m on {}", dev.name());
            assert_eq!(bits(&dv.to_host().unwrap()), bits(&wv), "adamw v on {}", dev.name());
            let want_half: Vec<u16> = got_p.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
            let got_half: Vec<u16> = half.to_host().unwrap().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got_half, want_half, "fp16 copy of the master weights on {}", dev.name());
        }
    }
}

#[test]
fn adamw_over_many_tensors_in_one_launch_equals_one_launch_each() {
    let mut rng = SplitMix64(12);
    for dev in devices() {
        let settings = AdamW {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.0,
            step: 5,
            grad_scale: 0.5 / 256.0,
        };
        let decays = [0.01f32, 0.0, 0.1, 0.01, 0.0];
        // (param, grad, m, v) per tensor, uploaded twice: one set per way of updating.
        let host: Vec<[Vec<f32>; 4]> = SIZES
            .iter()
            .map(|&n| {
                [
                    random_f32(&mut rng, n, -1.0, 1.0),
                    random_f32(&mut rng, n, -50.0, 50.0),
                    random_f32(&mut rng, n, -0.01, 0.01),
                    random_f32(&mut rng, n, 0.0, 1e-4),
                ]
            })
            .collect();
        let upload = || -> Vec<[DeviceBuffer<f32>; 4]> {
            host.iter().map(|t| [0, 1, 2, 3].map(|i| up(&dev, &t[i]))).collect()
        };
        let (mut one_each, multi) = (upload(), upload());
        let mut halves: Vec<DeviceBuffer<f16>> =
            SIZES.iter().map(|&n| poisoned_half(&dev, n)).collect();
        for (t, bufs) in one_each.iter_mut().enumerate() {
            let [p, g, m, v] = bufs;
            let s = AdamW { weight_decay: decays[t], ..settings };
            // The second tensor has no fp16 copy.
            let half = (t != 1).then_some(&mut halves[t]);
            ops::adamw(&dev, p, half, g, m, v, s).unwrap();
        }
        let multi_halves: Vec<DeviceBuffer<f16>> =
            SIZES.iter().map(|&n| poisoned_half(&dev, n)).collect();
        let tensors: Vec<ops::AdamwTensor<'_>> = multi
            .iter()
            .enumerate()
            .map(|(t, [p, g, m, v])| ops::AdamwTensor {
                param: p,
                half: (t != 1).then_some(&multi_halves[t]),
                grad: g,
                m,
                v,
                weight_decay: decays[t],
            })
            .collect();
        let table = ops::AdamwTable::new(&tensors).unwrap();
        let uploaded = DeviceBuffer::from_host(&dev, &table.words).unwrap();
        ops::adamw_multi(&dev, &table, &uploaded, settings).unwrap();
        for t in 0..SIZES.len() {
            for (i, what) in ["param", "grad", "m", "v"].iter().enumerate() {
                let bits = |b: &DeviceBuffer<f32>| -> Vec<u32> {
                    b.to_host().unwrap().iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(
                    bits(&one_each[t][i]),
                    bits(&multi[t][i]),
                    "{what} of tensor {t} on {}",
                    dev.name()
                );
            }
            if t != 1 {
                let bits = |b: &DeviceBuffer<f16>| -> Vec<u16> {
                    b.to_host().unwrap().iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(bits(&halves[t]), bits(&multi_halves[t]), "fp16 copy of tensor {t}");
            }
        }
    }
}

/// `adamw_multi_f32` takes 4 floats a 128-bit access where a tensor's buffers are 16-byte
/// aligned (8 for its fp16 copy), and element by element where they are not: a tensor whose
/// buffers start one element into allocations (so no pointer is aligned) gets the same bits
/// as the aligned tensor by `adamw_f32`, and the element before it is left alone.
#[test]
fn adamw_over_unaligned_tensors_equals_aligned() {
    let mut rng = SplitMix64(13);
    for dev in devices() {
        let s = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.01,
            step: 3,
            grad_scale: 0.25 / 512.0,
        };
        for n in [5usize, 4099, 8200] {
            let host = [
                random_f32(&mut rng, n + 1, -1.0, 1.0),
                random_f32(&mut rng, n + 1, -50.0, 50.0),
                random_f32(&mut rng, n + 1, -0.01, 0.01),
                random_f32(&mut rng, n + 1, 0.0, 1e-4),
            ];
            // Aligned: elements 1..=n in buffers of their own, updated by adamw_f32.
            let [mut p, g, mut m, mut v] = [0, 1, 2, 3].map(|i| up(&dev, &host[i][1..]));
            let mut half = poisoned_half(&dev, n);
            ops::adamw(&dev, &mut p, Some(&mut half), &g, &mut m, &mut v, s).unwrap();
            // Unaligned: the same elements one element into n + 1 (4 bytes; 2 for the halves).
            let shifted = [0, 1, 2, 3].map(|i| up(&dev, &host[i]));
            let shifted_half = poisoned_half(&dev, n + 1);
            let blocks = n.div_ceil(16 * 256);
            let mut words: Vec<u64> = [0, 1, 2, 3].map(|i| shifted[i].ptr() + 4).to_vec();
            words.insert(1, shifted_half.ptr() + 2);
            words.extend([n as u64, 0, blocks as u64, u64::from(s.weight_decay.to_bits())]);
            let table = ops::AdamwTable { words, tensors: 1, blocks };
            let uploaded = DeviceBuffer::from_host(&dev, &table.words).unwrap();
            ops::adamw_multi(&dev, &table, &uploaded, s).unwrap();
            for (i, (what, aligned)) in
                [("param", &p), ("grad", &g), ("m", &m), ("v", &v)].into_iter().enumerate()
            {
                let got = shifted[i].to_host().unwrap();
                let bits = |x: &[f32]| -> Vec<u32> { x.iter().map(|x| x.to_bits()).collect() };
                let what = format!("{what}, n {n}, on {}", dev.name());
                assert_eq!(got[0].to_bits(), host[i][0].to_bits(), "{what}: element before");
                assert_eq!(bits(&got[1..]), bits(&aligned.to_host().unwrap()), "{what}");
            }
            let got_half: Vec<u16> =
                shifted_half.to_host().unwrap().iter().map(|x| x.to_bits()).collect();
            let want_half: Vec<u16> = half.to_host().unwrap().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got_half[0], f16::NAN.to_bits(), "fp16 copy, n {n}: element before");
            assert_eq!(got_half[1..], want_half[..], "fp16 copy, n {n}");
        }
    }
}

/// log Σ_j exp(s·q_i·k_j) over the keys query i sees, in f64 (−inf when it sees none), in
/// the kernels' `[B, H, Tq]` order.
fn reference_lse(q: &[f32], k: &[f32], key_len: &[usize], s: AttentionShape) -> Vec<f32> {
    let (d, dh) = (s.width(), s.head_dim);
    let scale = 1.0 / (dh as f64).sqrt();
    let mut lse = Vec::with_capacity(s.batch * s.heads * s.q_len);
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let mut limit = key_len[b].min(s.k_len);
                if s.causal {
                    limit = limit.min(s.q_offset + i + 1);
                }
                let scores: Vec<f64> = (0..limit)
                    .map(|j| {
                        let qr = &q[(b * s.q_len + i) * d + h * dh..][..dh];
                        let kr = &k[(b * s.k_len + j) * d + h * dh..][..dh];
                        qr.iter().zip(kr).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                lse.push(if limit == 0 { f32::NEG_INFINITY } else { (max + sum.ln()) as f32 });
            }
        }
    }
    lse
}

/// The largest |q_i·k_j|/√Dh over every batch row, head, query and key (f64).
fn max_scaled_score(q: &[f32], k: &[f32], s: AttentionShape) -> f64 {
    let (d, dh) = (s.width(), s.head_dim);
    let mut max = 0.0f64;
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qr = &q[(b * s.q_len + i) * d + h * dh..][..dh];
                for j in 0..s.k_len {
                    let kr = &k[(b * s.k_len + j) * d + h * dh..][..dh];
                    let dot: f64 =
                        qr.iter().zip(kr).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
                    max = max.max(dot.abs());
                }
            }
        }
    }
    max / (dh as f64).sqrt()
}

#[test]
fn attention_matches_the_cpu_backend() {
    let mut rng = SplitMix64(11);
    // (batch, q_len, k_len, heads, head_dim, causal, q_offset, key_len per batch row)
    type Case = (usize, usize, usize, usize, usize, bool, usize, &'static [usize]);
    let cases: &[Case] = &[
        (2, 17, 33, 2, 16, false, 0, &[33, 5]), // cross-attention, partial tiles
        (3, 33, 33, 2, 64, true, 0, &[33, 1, 20]), // causal self-attention
        (2, 1, 70, 2, 64, true, 69, &[70, 40]), // decoding one token with a KV cache
        (1, 70, 70, 1, 64, true, 0, &[70]),     // several tiles each way, causal
        (2, 5, 9, 1, 192, false, 0, &[9, 3]),   // the large head width (seed-768's)
        (1, 70, 70, 2, 192, true, 0, &[70]),    // …over several 64-row blocks and 32-key tiles
        (1, 70, 70, 1, 176, false, 0, &[66]),   // CT 12 narrow enough for two stages in 99 KiB
        (1, 40, 70, 1, 112, false, 0, &[61]),   // …CT 8 (dQ)
        (1, 24, 40, 1, 240, false, 0, &[37]),   // …CT 16 (dK/dV)
        (2, 4, 20, 2, 16, true, 10, &[20, 0]),  // chunked decoding; a row with no key
        (1, 80, 100, 1, 64, true, 10, &[100]),  // a chunk after a cache: rows 54+ see keys 64+
        (1, 33, 17, 3, 32, false, 0, &[17]),    // more queries than keys
        (1, 130, 130, 1, 64, true, 0, &[130]),  // multi-tile 64-row blocks, causal
        (3, 200, 200, 2, 64, false, 0, &[200, 77, 131]), // multi-tile, partial key lengths
        (1, 40, 40, 1, 128, true, 0, &[40]),    // two 64-column passes
        (1, 20, 24, 1, 256, true, 4, &[23]),    // widest head: four passes, T 16 at 99 KiB
        (1, 4, 1024, 1, 16, false, 0, &[1021]), // long rows: 1,021 of 1,024 keys visible
        (1, 3, 1100, 2, 16, true, 1097, &[1100]), // …and past 1,024 keys, decoding at the end
    ];
    for dev in devices() {
        for &(batch, q_len, k_len, heads, head_dim, causal, q_offset, key_len) in cases {
            let s = AttentionShape { batch, q_len, k_len, heads, head_dim, causal, q_offset };
            let what = format!("{s:?}, key_len {key_len:?}");
            let d = s.width();
            let (nq, nk) = (batch * q_len * d, batch * k_len * d);
            let (qh, q) = random_half(&mut rng, nq, -2.0, 2.0);
            let (kh, k) = random_half(&mut rng, nk, -2.0, 2.0);
            let (vh, v) = random_half(&mut rng, nk, -1.0, 1.0);
            let (doh, d_out) = random_half(&mut rng, nq, -1.0, 1.0);
            let (qd, kd, vd, dod) = (up(&dev, &qh), up(&dev, &kh), up(&dev, &vh), up(&dev, &doh));

            let (mut want_out, mut probs) =
                (vec![0.0; nq], vec![0.0; batch * heads * q_len * k_len]);
            cpu().attention_forward(&mut want_out, &mut probs, &q, &k, &v, key_len, s);
            let want_lse = reference_lse(&q, &k, key_len, s);
            let (mut want_dq, mut want_dk, mut want_dv) =
                (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            cpu().attention_backward(
                &mut want_dq,
                &mut want_dk,
                &mut want_dv,
                &d_out,
                &q,
                &k,
                &v,
                &want_out,
                &probs,
                key_len,
                s,
            );
            // Every kernel family against the same references, each with the statistics
            // buffer it asks for (`stats_len`: the GEMM path's P after lse where it saves P).
            // The GEMM path also with lse alone (P recomputed in backward), in one chunk, one
            // (batch row, head) block a chunk, three blocks a chunk, so chunks start and end
            // inside batch rows, and four, so a last chunk is shorter than the others.
            let lse_only = batch * heads * q_len;
            // And in causal bands (the causal self-attention cases, longer than a band) of 8
            // and 16 query rows, so the last band is short (33, 70, 130 rows), with P saved
            // and recomputed, in one chunk and in chunks of three blocks.
            let gemm = |scores_per_chunk, causal_band| AttentionKernels::Gemm {
                scores_per_chunk,
                causal_band,
                half_scores: false,
            };
            let block = q_len * k_len.next_multiple_of(8);
            let banded = gemm(1 << 27, 8);
            // The default GEMM path (S and dP in fp16) and the same in fp32
            // (`CHINGU_ATTN_SCORES=f32`, as the closure above): P saved, recomputed, in bands.
            let (half, single) =
                (AttentionKernels::GEMM, AttentionKernels::GEMM.with_half_scores(false));
            let families = [
                (AttentionKernels::Wmma, lse_only),
                (AttentionKernels::Mma, lse_only),
                // The wgmma forward (its backward another family's): on the emulator and on a
                // Hopper GPU; elsewhere said and left out below.
                (AttentionKernels::Wgmma, lse_only),
                (single, single.stats_len(s)),
                (single, lse_only),
                (gemm(1, 0), lse_only),
                (gemm(3 * block, 0), lse_only),
                (gemm(4 * block, 0), lse_only),
                (banded, banded.stats_len(s)),
                (banded, lse_only),
                (gemm(3 * block, 16), lse_only),
                (half, half.stats_len(s)),
                (half, lse_only),
                (gemm(3 * block, 16).with_half_scores(true), lse_only),
            ];
            // fp16 scores add one rounding of each score s (scaled: |Δs| ≤ 2⁻¹¹·|s|): lse
            // moves by at most the largest such error, each P by up to twice it relative
            // (2⁻¹⁰·max|s|), and the outputs' and gradients' sums with it; dP's rounding is
            // of the same relative size. So those families get 2⁻¹¹·max|s| more on lse and
            // 2⁻¹⁰·max|s|·max|want| more on every output and gradient.
            let max_score = max_scaled_score(&q, &k, s);
            // The GEMM path's default saves P in every case here (a test of the test).
            assert!(half.stats_len(s) > lse_only + lse_only.max(1), "{what}");
            assert!(matches!(half, AttentionKernels::Gemm { half_scores: true, .. }));
            for (kernels, stats_len) in families {
                if kernels == AttentionKernels::Wgmma && !ops::has_wgmma(&dev) {
                    eprintln!("{}: no wgmma kernels (not a Hopper GPU): not run", dev.name());
                    continue;
                }
                let saves = if stats_len > lse_only { "P saved" } else { "lse alone" };
                let what = format!("{kernels:?} kernels ({saves}), {what}");
                let half_scores =
                    matches!(kernels, AttentionKernels::Gemm { half_scores: true, .. });
                let (score_lse, score_rel) =
                    if half_scores { (max_score / 2048.0, max_score / 1024.0) } else { (0.0, 0.0) };
                let mut out = poisoned_half(&dev, nq);
                let mut lse = poisoned_f32(&dev, stats_len);
                ops::attention_forward_using(
                    kernels, &dev, &mut out, &mut lse, &qd, &kd, &vd, key_len, s,
                )
                .unwrap();
                let atol = (2e-3 + score_rel) * max_abs(&want_out);
                assert_close(
                    &format!("attention out, {what}"),
                    &dev,
                    &down_half(&out),
                    &want_out,
                    atol,
                    4e-3,
                );
                let got_lse = lse.to_host().unwrap();
                for (n, (&g, &w)) in got_lse.iter().zip(&want_lse).enumerate() {
                    let ok = if w.is_infinite() {
                        g == w
                    } else {
                        (f64::from(g) - f64::from(w)).abs()
                            <= 1e-4 * (1.0 + f64::from(w).abs()) + score_lse
                    };
                    assert!(ok, "attention lse[{n}] is {g}, want {w}, {what} on {}", dev.name());
                }

                let (mut dq, mut dk, mut dv) =
                    (poisoned_half(&dev, nq), poisoned_half(&dev, nk), poisoned_half(&dev, nk));
                ops::attention_backward_using(
                    kernels, &dev, &mut dq, &mut dk, &mut dv, &dod, &qd, &kd, &vd, &out, &lse,
                    key_len, s,
                )
                .unwrap();
                for (name, got, want) in
                    [("dq", &dq, &want_dq), ("dk", &dk, &want_dk), ("dv", &dv, &want_dv)]
                {
                    let atol = (2e-3 + score_rel) * max_abs(want);
                    assert_close(
                        &format!("attention {name}, {what}"),
                        &dev,
                        &down_half(got),
                        want,
                        atol,
                        4e-3,
                    );
                }
            }
        }
    }
}

#[test]
fn attention_rejects_a_head_width_the_kernels_do_not_take() {
    let dev = devices().remove(0);
    let s = AttentionShape {
        batch: 1,
        q_len: 3,
        k_len: 3,
        heads: 2,
        head_dim: 20,
        causal: false,
        q_offset: 0,
    };
    let x = up(&dev, &[f16::ONE; 120]);
    let (mut out, mut lse) = (poisoned_half(&dev, 120), poisoned_f32(&dev, 6));
    let err = ops::attention_forward(&dev, &mut out, &mut lse, &x, &x, &x, &[3], s).unwrap_err();
    assert!(matches!(err, GpuError::Shape { .. }), "{err:?}");
    assert!(err.to_string().contains("head_dim 20"), "{err}");
    let (mut dq, mut dk, mut dv) =
        (poisoned_half(&dev, 120), poisoned_half(&dev, 120), poisoned_half(&dev, 120));
    let err =
        ops::attention_backward(&dev, &mut dq, &mut dk, &mut dv, &x, &x, &x, &x, &x, &lse, &[3], s)
            .unwrap_err();
    assert!(err.to_string().contains("head_dim 20"), "{err}");
}

#[test]
fn launchers_reject_mismatched_shapes() {
    let dev = devices().remove(0);
    let x = up(&dev, &[f16::ONE; 10]);
    let mut y = poisoned_half(&dev, 9);
    let err = ops::gelu_forward(&dev, &mut y, &x).unwrap_err();
    assert!(
        err.to_string().contains("gelu_forward_f16: y holds 9 f16 elements, expected 10"),
        "{err}"
    );
    let mut ln_y = poisoned_half(&dev, 10);
    let (mut mean, mut rstd) = (poisoned_f32(&dev, 2), poisoned_f32(&dev, 2));
    let err = ops::layernorm_forward(
        &dev,
        &mut ln_y,
        &mut mean,
        &mut rstd,
        &x,
        &up(&dev, &[f16::ONE; 4]),
        &up(&dev, &[f16::ONE; 5]),
        2,
        5,
    )
    .unwrap_err();
    assert!(err.to_string().contains("gamma holds 4"), "{err}");
    let err =
        ops::dropout(&dev, &mut y, 1.0, DropoutKey { seed: 0, step: 0, site: 0 }).unwrap_err();
    assert!(err.to_string().contains("must be in [0, 1)"), "{err}");
}

/// The wgmma probes (kernels/cuda/hopper.cu): every staging layout, A from registers and from
/// shared memory, both instances, against the product in f64 of the same fp16 values. A
/// misread layout or descriptor scrambles whole rows or columns (errors of the size of the
/// values, ~5 here), so the bound — 1e-3 of each element's Σ|a·b| (fp32 accumulation) — is
/// far from it. On a GPU other than Hopper the kernels are not loaded: said, not run. Every
/// combination is tried before the test fails, so one GPU run reports all of them.
#[test]
fn wgmma_tile_probes_match_the_product() {
    use chingu_kernels::gpu::ops::hopper::{self, WgmmaLayout, WGMMA_TILE_SHAPES};
    let mut rng = SplitMix64(0x6867_6d6d);
    for dev in devices() {
        let mut failures = Vec::new();
        for (n, k) in WGMMA_TILE_SHAPES {
            let kernel = hopper::wgmma_tile_kernel(n, k).unwrap();
            if !dev.has_kernel(kernel) {
                eprintln!("{}: {kernel} not loaded (not a Hopper GPU): probe not run", dev.name());
                continue;
            }
            let (a_h, a) = random_half(&mut rng, 64 * k, -1.0, 1.0);
            let (b_h, b) = random_half(&mut rng, k * n, -1.0, 1.0);
            let (mut want, mut scale) = (vec![0.0f64; 64 * n], vec![0.0f64; 64 * n]);
            for r in 0..64 {
                for c in 0..n {
                    for i in 0..k {
                        let p = f64::from(a[r * k + i]) * f64::from(b[i * n + c]);
                        want[r * n + c] += p;
                        scale[r * n + c] += p.abs();
                    }
                }
            }
            assert!(want.iter().any(|w| w.abs() > 1.0), "a degenerate product");
            let (a_dev, b_dev) = (
                DeviceBuffer::from_host(&dev, &a_h).unwrap(),
                DeviceBuffer::from_host(&dev, &b_h).unwrap(),
            );
            for layout in WgmmaLayout::ALL {
                for a_in_smem in [false, true] {
                    let mut d = poisoned_f32(&dev, 64 * n);
                    hopper::wgmma_tile(&dev, &mut d, &a_dev, &b_dev, (n, k), layout, a_in_smem)
                        .unwrap();
                    let got = d.to_host().unwrap();
                    let bad: Vec<usize> = (0..64 * n)
                        .filter(|&i| {
                            // NaN (an element never written) counts as wrong too.
                            let err = (f64::from(got[i]) - want[i]).abs();
                            err.is_nan() || err > 1e-3 * scale[i] + 1e-6
                        })
                        .collect();
                    let what = format!(
                        "{}: N {n} K {k} {layout:?} A from {}",
                        dev.name(),
                        if a_in_smem { "shared memory" } else { "registers" }
                    );
                    if bad.is_empty() {
                        eprintln!("{what}: ok");
                    } else {
                        let first: Vec<String> = bad
                            .iter()
                            .take(4)
                            .map(|&i| {
                                format!("({}, {}) {} want {:.4}", i / n, i % n, got[i], want[i])
                            })
                            .collect();
                        failures.push(format!(
                            "{what}: {} of {} wrong, e.g. {first:?}",
                            bad.len(),
                            64 * n
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "wgmma probes:\n{}", failures.join("\n"));
    }
}
