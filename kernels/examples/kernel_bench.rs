//! Times every kernel op at the shapes of one `seed-256` training step at batch
//! 18 × (1024 + 1024) tokens, through the checked launchers of `chingu_kernels::gpu::ops`.
//!
//! ```text
//! kernel_bench [--device cuda|emu] [--reps N] [--json PATH] [--attention-families]
//! ```
//!
//! `--attention-families` times only the last section, every attention family at head widths
//! 64, 128 and 192 (`scripts/gpu-check` reruns it with the register-resident kernels' launch
//! forced: `CHINGU_ATTN_WARPS`, `CHINGU_ATTN_PIPELINE`).
//!
//! `--device cuda` (the default) runs on GPU 0; `--device emu` runs the same launchers on
//! the CPU emulation of CUDA at tiny shapes (N ÷ 64, V ÷ 16, T ÷ 16, parameters ÷ 64), only
//! to smoke-test this program. Each op is launched 3 times to warm up, then `reps` times
//! between two device synchronisations; the time is the host wall time of that loop divided
//! by `reps` (some launchers synchronise or read a result back themselves: that is part of
//! what the op costs). Inputs are fresh random values from SplitMix64, never zeros.
//!
//! GB/s is the minimum traffic of the op (every input read once, every output written once,
//! an accumulated buffer counted as one read and one write) over the time; the formula is
//! given beside each op. Attention also reports TFLOP/s: 4·B·H·Tq·Tk·Dh for the forward,
//! 2.5× that for the backward, halved when causal. `bench/kernel_bench.py` times the same
//! ops in PyTorch and `bench/kernel_compare.py` puts the two JSON files side by side.

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chingu_kernels::gpu::gemm::{self, GemmOut};
use chingu_kernels::gpu::ops::AttentionKernels;
use chingu_kernels::gpu::{ops, DeviceBuffer, Element, Gpu, GpuError};
use chingu_kernels::rng::{mix, SplitMix64};
use chingu_kernels::{AdamW, AttentionShape, DropoutKey};
use half::f16;
use rayon::prelude::*;

/// Launches before timing.
const WARMUP: usize = 3;
/// Parameters of the `seed-256` model (vocabulary 16,000, tied embeddings).
const SEED_256_PARAMS: usize = 15_156_224;
/// Label smoothing and dropout of the `seed-256` preset.
const SMOOTHING: f32 = 0.1;
const DROPOUT: f32 = 0.1;
/// Elements per independently seeded chunk of random input (so filling runs in parallel).
const CHUNK: usize = 1 << 16;

struct Args {
    device: String,
    reps: usize,
    json: Option<PathBuf>,
    attention_families: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { device: "cuda".into(), reps: 20, json: None, attention_families: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => args.device = value()?,
            "--reps" => {
                let v = value()?;
                args.reps = v.parse().map_err(|_| format!("--reps {v}: not a number"))?;
                if args.reps == 0 {
                    return Err("--reps must be at least 1".into());
                }
            }
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--attention-families" => args.attention_families = true,
            "-h" | "--help" => {
                println!(
                    "kernel_bench [--device cuda|emu] [--reps N (20)] [--json PATH] \
                     [--attention-families]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.device != "cuda" && args.device != "emu" {
        return Err(format!("--device {}: choose cuda or emu", args.device));
    }
    Ok(args)
}

/// The shapes of one training step.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    /// Token rows of one stack: batch × sequence length.
    n: usize,
    /// Model width, feed-forward width, heads, head width.
    d: usize,
    f: usize,
    h: usize,
    dh: usize,
    /// Vocabulary.
    v: usize,
    /// Attention batch and sequence length (Tq = Tk).
    b: usize,
    t: usize,
    /// Trainable parameters (AdamW, gradient norm).
    params: usize,
}

impl Shapes {
    fn seed_256() -> Self {
        Self {
            n: 18 * 1024,
            d: 256,
            f: 1024,
            h: 4,
            dh: 64,
            v: 16_000,
            b: 18,
            t: 1024,
            params: SEED_256_PARAMS,
        }
    }

    /// The emulator's smoke-test shapes.
    fn tiny() -> Self {
        let s = Self::seed_256();
        Self { n: s.n / 64, v: s.v / 16, t: s.t / 16, params: s.params / 64, ..s }
    }
}

/// One timed op.
struct Row {
    op: &'static str,
    shape: String,
    seconds: f64,
    bytes: f64,
    flops: Option<f64>,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }

    fn tflops(&self) -> Option<f64> {
        self.flops.map(|f| f / self.seconds / 1e12)
    }
}

/// Warms up, then times `reps` launches between two synchronisations; seconds per launch.
/// `launch` gets the launch's index (0, 1, … across warm-up and timing).
fn time_op(
    dev: &Gpu,
    reps: usize,
    mut launch: impl FnMut(usize) -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    for i in 0..WARMUP {
        launch(i)?;
    }
    dev.synchronize()?;
    let start = Instant::now();
    for i in 0..reps {
        launch(WARMUP + i)?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// `n` uniform values in [lo, hi) from SplitMix64, filled in parallel chunks.
fn random_vec<T: Send>(seed: u64, n: usize, lo: f64, hi: f64, conv: fn(f64) -> T) -> Vec<T> {
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            let mut rng = SplitMix64(mix(seed ^ mix(c as u64 + 1)));
            let len = CHUNK.min(n - c * CHUNK);
            (0..len).map(move |_| conv(lo + (hi - lo) * rng.next_f64()))
        })
        .collect()
}

/// A device buffer of random fp16 values in [lo, hi).
fn random_half(
    dev: &Gpu,
    seed: u64,
    n: usize,
    lo: f64,
    hi: f64,
) -> Result<DeviceBuffer<f16>, GpuError> {
    DeviceBuffer::from_host(dev, &random_vec(seed, n, lo, hi, f16::from_f64))
}

/// A device buffer of random fp32 values in [lo, hi).
fn random_f32(
    dev: &Gpu,
    seed: u64,
    n: usize,
    lo: f64,
    hi: f64,
) -> Result<DeviceBuffer<f32>, GpuError> {
    DeviceBuffer::from_host(dev, &random_vec(seed, n, lo, hi, |x| x as f32))
}

/// Output space (never read before the op writes it).
fn out<T: Element>(dev: &Gpu, n: usize) -> Result<DeviceBuffer<T>, GpuError> {
    DeviceBuffer::uninit(dev, n)
}

/// `n` random ids in [lo, hi).
fn random_ids(seed: u64, n: usize, lo: u32, hi: u32) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| lo + (rng.next_u64() % u64::from(hi - lo)) as u32).collect()
}

fn distinct(ids: &[u32]) -> usize {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len()
}

const H: f64 = 2.0; // bytes of an fp16
const S: f64 = 4.0; // bytes of an fp32 / int32

fn run(dev: &Gpu, s: Shapes, reps: usize, families_only: bool) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    let (n, d, f, v) = (s.n, s.d, s.f, s.v);
    let (nf, df, ff, vf, pf) = (n as f64, d as f64, f as f64, v as f64, s.params as f64);
    let nd = format!("{n}x{d}");
    let mut seed = 0x6368_696e_6775_u64; // "chingu"
    let mut next_seed = || {
        seed += 1;
        seed
    };
    let mut push = |op, shape: String, seconds, bytes, flops| {
        let row = Row { op, shape, seconds, bytes, flops };
        eprintln!("{:<22} {:<28} {:>10.1} µs", row.op, row.shape, row.seconds * 1e6);
        rows.push(row);
    };

    // Everything but the attention families, unless only they are asked for.
    if !families_only {
        // --- LayerNorm over N × D, and N × 768 (seed-768's rows: the 3-vector kernels) --------
        for d in [d, 768].into_iter().take(if d == 768 { 1 } else { 2 }) {
            let (df, nd) = (d as f64, format!("{n}x{d}"));
            let x = random_half(dev, next_seed(), n * d, -2.0, 2.0)?;
            let gamma = random_half(dev, next_seed(), d, 0.5, 1.5)?;
            let beta = random_half(dev, next_seed(), d, -0.5, 0.5)?;
            let mut y = out::<f16>(dev, n * d)?;
            let (mut mean, mut rstd) = (out::<f32>(dev, n)?, out::<f32>(dev, n)?);
            // x, y: 2·N·D fp16; γ, β: 2·D fp16; mean, rstd written: 2·N fp32.
            let t = time_op(dev, reps, |_| {
                ops::layernorm_forward(dev, &mut y, &mut mean, &mut rstd, &x, &gamma, &beta, n, d)
            })?;
            push(
                "layernorm_fwd",
                nd.clone(),
                t,
                H * (2.0 * nf * df + 2.0 * df) + S * 2.0 * nf,
                None,
            );

            let dy = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            let mut dx = random_half(dev, next_seed(), n * d, -0.5, 0.5)?;
            let mut dgamma = random_f32(dev, next_seed(), d, -1.0, 1.0)?;
            let mut dbeta = random_f32(dev, next_seed(), d, -1.0, 1.0)?;
            // dy, x read and dx accumulated (read + write): 4·N·D fp16; mean, rstd: 2·N fp32;
            // γ: D fp16; dγ, dβ accumulated: 4·D fp32.
            let t = time_op(dev, reps, |_| {
                ops::layernorm_backward(
                    dev,
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                    &dy,
                    &x,
                    &mean,
                    &rstd,
                    &gamma,
                    n,
                    d,
                )
            })?;
            push(
                "layernorm_bwd",
                nd.clone(),
                t,
                H * (4.0 * nf * df + df) + S * (2.0 * nf + 4.0 * df),
                None,
            );

            // The residual stream's fused forms (the model's, pre-norm), against the pairs
            // they replace: add_dropped + layernorm_fwd, layernorm_bwd + dropped_copy (their
            // rows here and below). Forward: x (the sublayer output) and the residual read,
            // the sum and y written: 4·N·D fp16, γ, β, mean, rstd as above.
            let residual = random_half(dev, next_seed(), n * d, -2.0, 2.0)?;
            let mut sum = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            let t = time_op(dev, reps, |i| {
                let key = DropoutKey { seed: 7, step: i as u64, site: 4 };
                ops::add_dropped_layernorm_forward(
                    dev, &mut sum, &residual, DROPOUT, key, &mut y, &mut mean, &mut rstd, &gamma,
                    &beta, n, d,
                )
            })?;
            push(
                "layernorm_fwd_add_dropped",
                nd.clone(),
                t,
                H * (4.0 * nf * df + 2.0 * df) + S * 2.0 * nf,
                None,
            );
            // Backward: layernorm_bwd's traffic, and dropout(dx) written: 5·N·D fp16.
            let mut dropped = out::<f16>(dev, n * d)?;
            let t = time_op(dev, reps, |i| {
                let key = DropoutKey { seed: 7, step: i as u64, site: 4 };
                ops::layernorm_backward_dropped(
                    dev,
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                    &dy,
                    &x,
                    &mean,
                    &rstd,
                    &gamma,
                    n,
                    d,
                    &mut dropped,
                    DROPOUT,
                    key,
                )
            })?;
            push(
                "layernorm_bwd_dropped",
                nd.clone(),
                t,
                H * (5.0 * nf * df + df) + S * (2.0 * nf + 4.0 * df),
                None,
            );
        }

        // --- GELU over N × F ----------------------------------------------------------------
        {
            let x = random_half(dev, next_seed(), n * f, -4.0, 4.0)?;
            let mut y = out::<f16>(dev, n * f)?;
            // x read, y written: 2·N·F fp16.
            let t = time_op(dev, reps, |_| ops::gelu_forward(dev, &mut y, &x))?;
            push("gelu_fwd", format!("{n}x{f}"), t, H * 2.0 * nf * ff, None);
            let dy = random_half(dev, next_seed(), n * f, -1.0, 1.0)?;
            let mut dx = out::<f16>(dev, n * f)?;
            // dy, x read, dx written: 3·N·F fp16.
            let t = time_op(dev, reps, |_| ops::gelu_backward(dev, &mut dx, &dy, &x))?;
            push("gelu_bwd", format!("{n}x{f}"), t, H * 3.0 * nf * ff, None);
        }

        // --- Dropout and the residual add over N × D -----------------------------------------
        {
            let mut buf = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            // In place: read and written once, 2·N·D fp16. A new mask every launch.
            let t = time_op(dev, reps, |i| {
                let key = DropoutKey { seed: 7, step: i as u64, site: 3 };
                ops::dropout(dev, &mut buf, DROPOUT, key)
            })?;
            push("dropout", nd.clone(), t, H * 2.0 * nf * df, None);

            let mut acc = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            let x = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            // acc read and written, x read: 3·N·D fp16.
            let t = time_op(dev, reps, |_| ops::add_assign(dev, &mut acc, &x))?;
            push("add_assign", nd.clone(), t, H * 3.0 * nf * df, None);

            // The two fused into one pass (the model's residual add, acc = x + dropout(acc)):
            // the same 3·N·D fp16.
            let t = time_op(dev, reps, |i| {
                let key = DropoutKey { seed: 7, step: i as u64, site: 3 };
                ops::add_dropped(dev, &mut acc, &x, DROPOUT, key)
            })?;
            push("add_dropped", nd.clone(), t, H * 3.0 * nf * df, None);

            // Dropout into a new buffer (a sublayer's output gradient): 2·N·D fp16.
            let mut copy = out::<f16>(dev, n * d)?;
            let t = time_op(dev, reps, |i| {
                let key = DropoutKey { seed: 7, step: i as u64, site: 3 };
                ops::dropped_copy(dev, &mut copy, &x, DROPOUT, key)
            })?;
            push("dropped_copy", nd.clone(), t, H * 2.0 * nf * df, None);

            // Bias gradient, both passes (db += column sums of dy): N·D fp16 read, D fp32 read and
            // written.
            let mut db = random_f32(dev, next_seed(), d, -1.0, 1.0)?;
            let t = time_op(dev, reps, |_| ops::bias_backward(dev, &mut db, &x, n, d))?;
            push("bias_bwd", nd.clone(), t, H * nf * df + 2.0 * S * df, None);
            // …and at seed-768's widths (its attention and feed-forward layers' dy: 84 and 12
            // of a step's 96 calls).
            for width in [768, 3072] {
                let dy = random_half(dev, next_seed(), n * width, -1.0, 1.0)?;
                let mut db = random_f32(dev, next_seed(), width, -1.0, 1.0)?;
                let t = time_op(dev, reps, |_| ops::bias_backward(dev, &mut db, &dy, n, width))?;
                let w = width as f64;
                push("bias_bwd", format!("{n}x{width}"), t, H * nf * w + 2.0 * S * w, None);
            }
            // Attention's three projections' bias gradients at seed-768's width: one launch
            // each (training's default), against one launch for the three
            // (`bias_backward_many`, with CHINGU_GEMM_WEIGHT_GRAD_BATCH=1).
            let width = 768;
            let dys: Vec<DeviceBuffer<f16>> = (0..3)
                .map(|_| random_half(dev, next_seed(), n * width, -1.0, 1.0))
                .collect::<Result<_, _>>()?;
            let mut dbs: Vec<DeviceBuffer<f32>> = (0..3)
                .map(|_| random_f32(dev, next_seed(), width, -1.0, 1.0))
                .collect::<Result<_, _>>()?;
            let (w, label) = (width as f64, format!("3 x {n}x{width}"));
            let bytes = 3.0 * (H * nf * w + 2.0 * S * w);
            let t = time_op(dev, reps, |_| {
                dbs.iter_mut()
                    .zip(&dys)
                    .try_for_each(|(db, dy)| ops::bias_backward(dev, db, dy, n, width))
            })?;
            push("bias_bwd_each", label.clone(), t, bytes, None);
            let dy_refs: Vec<&DeviceBuffer<f16>> = dys.iter().collect();
            let t = time_op(dev, reps, |_| {
                let mut db_refs: Vec<&mut DeviceBuffer<f32>> = dbs.iter_mut().collect();
                ops::bias_backward_many(dev, &mut db_refs, &dy_refs, n, width)
            })?;
            push("bias_bwd_one_launch", label, t, bytes, None);

            // A linear layer's weight and bias gradients, dW += dyᵀ·x (D × D, fp32) and db +=
            // Σ_rows dy: the product then the bias kernels, against the bias summed in the
            // product (cuBLASLt's BGRADB) and added. dy and x read, dW and db read and written;
            // 2·N·D·D FLOPs.
            let mut dw = random_f32(dev, next_seed(), d * d, -1.0, 1.0)?;
            let bytes = 2.0 * H * nf * df + 2.0 * S * df * df + 2.0 * S * df;
            let flops = Some(2.0 * nf * df * df);
            let t = time_op(dev, reps, |_| {
                gemm::gemm(dev, GemmOut::F32(&mut dw), &acc, true, &x, false, d, d, n, true, None)?;
                ops::bias_backward(dev, &mut db, &acc, n, d)
            })?;
            push("weight_bias_grad_kernels", format!("{n}x{d}x{d}"), t, bytes, flops);
            let mut fresh = out::<f32>(dev, d)?;
            let mut fused = |_| -> Result<(), GpuError> {
                gemm::gemm_bias_grad(
                    dev,
                    &mut dw,
                    &mut fresh,
                    &acc,
                    true,
                    &x,
                    false,
                    (d, d, n),
                    true,
                )?;
                ops::add_assign_f32(dev, &mut db, &fresh)
            };
            match fused(0) {
                Err(GpuError::Unsupported(why)) => {
                    eprintln!("weight_bias_grad_fused: not timed, {why}")
                }
                first => {
                    first?;
                    let t = time_op(dev, reps, fused)?;
                    push("weight_bias_grad_fused", format!("{n}x{d}x{d}"), t, bytes, flops);
                }
            }
        }

        // --- Embedding: N rows gathered from a V × D table plus positions --------------------
        {
            let table = random_half(dev, next_seed(), v * d, -1.0, 1.0)?;
            let positions = random_half(dev, next_seed(), s.t * d, -1.0, 1.0)?;
            let ids = random_ids(next_seed(), n, 0, v as u32);
            let pos: Vec<usize> = (0..n).map(|i| i % s.t).collect();
            let (rows_used, pos_used) = (distinct(&ids) as f64, s.t.min(n) as f64);
            let scale = (d as f32).sqrt();
            let mut emb = out::<f16>(dev, n * d)?;
            // Distinct table rows and position rows read once, output written: fp16 × D each;
            // ids and positions uploaded: 2·N int32.
            let t = time_op(dev, reps, |_| {
                ops::embedding_forward(dev, &mut emb, &table, &positions, &ids, &pos, d, scale)
            })?;
            let shape = format!("{n} rows of {v}x{d}");
            push(
                "embedding_fwd",
                shape.clone(),
                t,
                H * df * (rows_used + pos_used + nf) + S * 2.0 * nf,
                None,
            );

            let d_out = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
            let mut d_table = random_f32(dev, next_seed(), v * d, -1.0, 1.0)?;
            // d_out read: N·D fp16; distinct rows of d_table accumulated (read + write): fp32 × D
            // each; ids: N int32 (the launcher's sorted order and groups are host-side extras).
            let t = time_op(dev, reps, |_| {
                ops::embedding_backward(dev, &mut d_table, &d_out, &ids, d, scale)
            })?;
            push("embedding_bwd", shape, t, H * nf * df + S * (2.0 * rows_used * df + nf), None);
        }

        // --- Cross-entropy (loss and gradient in one kernel) over N × V logits ---------------
        {
            let logits = random_half(dev, next_seed(), n * v, -8.0, 8.0)?;
            let mut d_logits = out::<f16>(dev, n * v)?;
            let targets = random_ids(next_seed(), n, 1, v as u32);
            // logits read, d_logits written: 2·N·V fp16; targets read, row losses written: 2·N int32/fp32.
            let t = time_op(dev, reps, |_| {
                ops::cross_entropy(dev, &mut d_logits, &logits, &targets, v, 0, SMOOTHING, 1024.0)
                    .map(|_| ())
            })?;
            push("cross_entropy", format!("{n}x{v}"), t, H * 2.0 * nf * vf + S * 2.0 * nf, None);
        }

        // --- AdamW and the gradient norm over every parameter --------------------------------
        {
            let p = s.params;
            let mut param = random_f32(dev, next_seed(), p, -0.1, 0.1)?;
            let mut half = out::<f16>(dev, p)?;
            let grad = random_f32(dev, next_seed(), p, -0.01, 0.01)?;
            let mut m = random_f32(dev, next_seed(), p, -1e-3, 1e-3)?;
            let mut var = random_f32(dev, next_seed(), p, 1e-8, 1e-6)?;
            // Repetition i's settings (a new step each time, as in training).
            let settings = |i: usize| AdamW {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-9,
                weight_decay: 0.01,
                step: 1 + i as u64,
                grad_scale: 1.0 / 65536.0,
            };
            // param, m, v read and written, grad read: 7·P fp32; the fp16 copy written: P fp16.
            let t = time_op(dev, reps, |i| {
                ops::adamw(dev, &mut param, Some(&mut half), &grad, &mut m, &mut var, settings(i))
            })?;
            push("adamw", format!("{p} params"), t, S * 7.0 * pf + H * pf, None);

            // The multi-tensor kernel a training step runs (here over one tensor of all the
            // parameters): the same traffic.
            let table = ops::AdamwTable::new(&[ops::AdamwTensor {
                param: &param,
                half: Some(&half),
                grad: &grad,
                m: &m,
                v: &var,
                weight_decay: 0.01,
            }])?;
            let uploaded = DeviceBuffer::from_host(dev, &table.words)?;
            let t = time_op(dev, reps, |i| ops::adamw_multi(dev, &table, &uploaded, settings(i)))?;
            push("adamw_multi", format!("{p} params"), t, S * 7.0 * pf + H * pf, None);

            // Each element read once: P fp32 (the f64 result is read back to the host).
            let t = time_op(dev, reps, |_| ops::sum_squares(dev, &[&grad]).map(|_| ()))?;
            push("sum_squares", format!("{p} f32"), t, S * pf, None);
        }

        // --- Self-attention, Tq = Tk = T, every key visible ----------------------------------
        {
            let (b, t_len) = (s.b, s.t);
            let key_len = vec![t_len; b];
            let x_len = b * t_len * d;
            let q = random_half(dev, next_seed(), x_len, -2.0, 2.0)?;
            let k = random_half(dev, next_seed(), x_len, -2.0, 2.0)?;
            let vv = random_half(dev, next_seed(), x_len, -1.0, 1.0)?;
            let d_out = random_half(dev, next_seed(), x_len, -1.0, 1.0)?;
            let (xf, lse_f) = (x_len as f64, (b * s.h * t_len) as f64);
            for causal in [false, true] {
                let shape = AttentionShape {
                    batch: b,
                    q_len: t_len,
                    k_len: t_len,
                    heads: s.h,
                    head_dim: s.dh,
                    causal,
                    q_offset: 0,
                };
                let label = format!(
                    "B{b} H{} T{t_len} Dh{}{}",
                    s.h,
                    s.dh,
                    if causal { " causal" } else { "" }
                );
                let fwd_flops = 4.0 * (b * s.h) as f64 * (t_len * t_len * s.dh) as f64
                    / if causal { 2.0 } else { 1.0 };
                let mut o = out::<f16>(dev, x_len)?;
                let mut lse = out::<f32>(dev, b * s.h * t_len)?;
                // q, k, v read, out written: 4·B·T·D fp16; lse written: B·H·T fp32.
                let fwd_bytes = H * 4.0 * xf + S * lse_f;
                // The kernels training picks for this shape (`AttentionKernels::fastest_for`; the
                // register-resident ones at head width 64 since run 17, WMMA before).
                let t = time_op(dev, reps, |_| {
                    ops::attention_forward(dev, &mut o, &mut lse, &q, &k, &vv, &key_len, shape)
                })?;
                let (fwd_op, bwd_op, both_op) = if causal {
                    ("attn_fwd_causal", "attn_bwd_causal", "attn_fwd_bwd_causal")
                } else {
                    ("attn_fwd", "attn_bwd", "attn_fwd_bwd")
                };
                push(fwd_op, label.clone(), t, fwd_bytes, Some(fwd_flops));
                // The WMMA forward beside it (CHINGU_ATTN=wmma).
                let t = time_op(dev, reps, |_| {
                    ops::attention_forward_using(
                        AttentionKernels::Wmma,
                        dev,
                        &mut o,
                        &mut lse,
                        &q,
                        &k,
                        &vv,
                        &key_len,
                        shape,
                    )
                })?;
                let wmma_op = if causal { "attn_fwd_wmma_causal" } else { "attn_fwd_wmma" };
                push(wmma_op, label.clone(), t, fwd_bytes, Some(fwd_flops));

                let (mut dq, mut dk, mut dv) =
                    (out::<f16>(dev, x_len)?, out::<f16>(dev, x_len)?, out::<f16>(dev, x_len)?);
                // d_out, q, k, v, out read and dq, dk, dv written: 8·B·T·D fp16; lse read:
                // B·H·T fp32.
                let bwd_bytes = H * 8.0 * xf + S * lse_f;
                let t = time_op(dev, reps, |_| {
                    ops::attention_backward(
                        dev, &mut dq, &mut dk, &mut dv, &d_out, &q, &k, &vv, &o, &lse, &key_len,
                        shape,
                    )
                })?;
                push(bwd_op, label.clone(), t, bwd_bytes, Some(2.5 * fwd_flops));
                // The WMMA backward beside it (CHINGU_ATTN=wmma).
                let t = time_op(dev, reps, |_| {
                    ops::attention_backward_using(
                        AttentionKernels::Wmma,
                        dev,
                        &mut dq,
                        &mut dk,
                        &mut dv,
                        &d_out,
                        &q,
                        &k,
                        &vv,
                        &o,
                        &lse,
                        &key_len,
                        shape,
                    )
                })?;
                let wmma_op = if causal { "attn_bwd_wmma_causal" } else { "attn_bwd_wmma" };
                push(wmma_op, label.clone(), t, bwd_bytes, Some(2.5 * fwd_flops));

                // Forward then backward, as a training step runs them (what the PyTorch side can
                // time for scaled_dot_product_attention): the sum of the two minimum traffics.
                let t = time_op(dev, reps, |_| {
                    ops::attention_forward(dev, &mut o, &mut lse, &q, &k, &vv, &key_len, shape)?;
                    ops::attention_backward(
                        dev, &mut dq, &mut dk, &mut dv, &d_out, &q, &k, &vv, &o, &lse, &key_len,
                        shape,
                    )
                })?;
                push(both_op, label, t, fwd_bytes + bwd_bytes, Some(3.5 * fwd_flops));
            }
        }
    }
    // --- the GEMM attention path's products, two layouts --------------------------------
    // Training runs each product once per head, batched over the B batch rows, reading one
    // head's columns of `[B·T, H·Dh]` in place (rows H·Dh apart). A head-major layout
    // (`[B·H, T, Dh]`, dense) would make each one product batched over all B·H blocks: these
    // rows time both at seed-768's heads (and seed-256's), fp16 out as training stores them,
    // to say whether that layout (and the copies into it and back) would pay.
    if !families_only {
        for head_dim in [64, 192] {
            product_layout_rows(dev, s, reps, head_dim, &mut next_seed, &mut push)?;
        }
        // seed-768's width only on a GPU (the emulator's smoke run stays short).
        let widths = if dev.name().starts_with("emu") { vec![s.d] } else { vec![s.d, 768] };
        for width in widths {
            projection_rows(dev, s, reps, width, &mut next_seed, &mut push)?;
        }
    }
    // --- every kernel family at head widths 64, 128 and 192 (seed-768's: 4 heads of 192) --
    // The automatic choice (`AttentionKernels::fastest_for`) follows these rows. (Row names
    // are `&'static str`: the dozen made here are leaked.)
    for head_dim in [64, 128, 192] {
        let (b, t_len, heads) = (s.b, s.t, 4);
        let key_len = vec![t_len; b];
        let x_len = b * t_len * heads * head_dim;
        let q = random_half(dev, next_seed(), x_len, -2.0, 2.0)?;
        let k = random_half(dev, next_seed(), x_len, -2.0, 2.0)?;
        let vv = random_half(dev, next_seed(), x_len, -1.0, 1.0)?;
        let shape = AttentionShape {
            batch: b,
            q_len: t_len,
            k_len: t_len,
            heads,
            head_dim,
            causal: false,
            q_offset: 0,
        };
        let label = format!("B{b} H{heads} T{t_len} Dh{head_dim}");
        // The GEMM path with every score in one chunk (no bound on its scratch): what the
        // chunking costs.
        let one_chunk = AttentionKernels::Gemm {
            scores_per_chunk: usize::MAX,
            causal_band: 512,
            half_scores: false,
        };
        // The `gemm` rows keep S and dP in fp32, as every earlier run timed them; the
        // `gemm_f16scores` rows store them in fp16 (the default since the thirteenth session).
        let f32_scores = AttentionKernels::GEMM.with_half_scores(false);
        let half_scores = AttentionKernels::GEMM.with_half_scores(true);
        let flops = 4.0 * (b * heads) as f64 * (t_len * t_len * head_dim) as f64;
        let bytes = H * 4.0 * x_len as f64 + S * (b * heads * t_len) as f64;
        let mut o = out::<f16>(dev, x_len)?;
        let mut lse = out::<f32>(dev, b * heads * t_len)?;
        for (op, kernels) in [
            (&*format!("attn_fwd_dh{head_dim}").leak(), AttentionKernels::Wmma),
            (&*format!("attn_fwd_mma_dh{head_dim}").leak(), AttentionKernels::Mma),
            (&*format!("attn_fwd_gemm_dh{head_dim}").leak(), f32_scores),
            (&*format!("attn_fwd_gemm1_dh{head_dim}").leak(), one_chunk),
            (&*format!("attn_fwd_gemm_f16scores_dh{head_dim}").leak(), half_scores),
            // Hopper's warpgroup MMA (an H100 or H200; the emulator too).
            (&*format!("attn_fwd_wgmma_dh{head_dim}").leak(), AttentionKernels::Wgmma),
        ] {
            if kernels == AttentionKernels::Wgmma && !ops::has_wgmma(dev) {
                eprintln!("{op}: not timed, no wgmma kernels on {}", dev.name());
                continue;
            }
            let t = time_op(dev, reps, |_| {
                ops::attention_forward_using(
                    kernels, dev, &mut o, &mut lse, &q, &k, &vv, &key_len, shape,
                )
            })?;
            push(op, label.clone(), t, bytes, Some(flops));
        }
        let d_out = random_half(dev, next_seed(), x_len, -1.0, 1.0)?;
        let (mut dq, mut dk, mut dv) =
            (out::<f16>(dev, x_len)?, out::<f16>(dev, x_len)?, out::<f16>(dev, x_len)?);
        let bwd_bytes = H * 8.0 * x_len as f64 + S * (b * heads * t_len) as f64;
        for (op, kernels) in [
            (&*format!("attn_bwd_dh{head_dim}").leak(), AttentionKernels::Wmma),
            (&*format!("attn_bwd_mma_dh{head_dim}").leak(), AttentionKernels::Mma),
            (&*format!("attn_bwd_gemm_dh{head_dim}").leak(), f32_scores),
            (&*format!("attn_bwd_gemm1_dh{head_dim}").leak(), one_chunk),
            (&*format!("attn_bwd_gemm_f16scores_dh{head_dim}").leak(), half_scores),
        ] {
            let t = time_op(dev, reps, |_| {
                ops::attention_backward_using(
                    kernels, dev, &mut dq, &mut dk, &mut dv, &d_out, &q, &k, &vv, &o, &lse,
                    &key_len, shape,
                )
            })?;
            push(op, label.clone(), t, bwd_bytes, Some(2.5 * flops));
        }
    }
    Ok(rows)
}

/// The rows `prod_{qk,pv,ptx}_{per_head,head_major,pointer_arrays}_dh{head_dim}`: S = Q·Kᵀ,
/// O = P·V and dV = Pᵀ·dO (dK = dSᵀ·Q is the same product) for B × H blocks of T × T scores,
/// each product as training runs it (H calls batched over B, operands in place), as one call
/// batched over B·H on head-major operands, and as one pointer-array batch over the in-place
/// operands (where the device has one). 2·B·H·T²·Dh FLOPs each; bytes the operands read and the
/// output written once.
fn product_layout_rows(
    dev: &Gpu,
    s: Shapes,
    reps: usize,
    head_dim: usize,
    next_seed: &mut impl FnMut() -> u64,
    push: &mut impl FnMut(&'static str, String, f64, f64, Option<f64>),
) -> Result<(), GpuError> {
    use chingu_kernels::gpu::{Gemm, GemmBatch, GemmEpilogue};
    let (b, t, heads) = (s.b, s.t, 4);
    let d = heads * head_dim;
    let x_len = b * t * d;
    let (q, k) = (
        random_half(dev, next_seed(), x_len, -2.0, 2.0)?,
        random_half(dev, next_seed(), x_len, -2.0, 2.0)?,
    );
    let p = random_half(dev, next_seed(), b * heads * t * t, 0.0, 1.0 / t as f64)?;
    let scores = out::<f16>(dev, b * heads * t * t)?;
    let o = out::<f16>(dev, x_len)?;
    let flops = 2.0 * (b * heads) as f64 * (t * t * head_dim) as f64;
    // Two `[B·T, D]` operands and one block of scores, whichever is read or written.
    let bytes = H * (2.0 * x_len as f64 + (b * heads * t * t) as f64);
    let label = format!("B{b} H{heads} T{t} Dh{head_dim}");
    /// One product: C[m×n] = op(A)·op(B) summed over k.
    struct Product {
        name: &'static str,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        /// A is P (score blocks), else Q (a `[B·T, D]` operand).
        a_is_p: bool,
        /// C is the score blocks, else a `[B·T, D]` output.
        c_is_scores: bool,
    }
    let products = [
        Product {
            name: "qk",
            m: t,
            n: t,
            k: head_dim,
            trans_a: false,
            trans_b: true,
            a_is_p: false,
            c_is_scores: true,
        },
        Product {
            name: "pv",
            m: t,
            n: head_dim,
            k: t,
            trans_a: false,
            trans_b: false,
            a_is_p: true,
            c_is_scores: false,
        },
        Product {
            name: "ptx",
            m: t,
            n: head_dim,
            k: t,
            trans_a: true,
            trans_b: false,
            a_is_p: true,
            c_is_scores: false,
        },
    ];
    for Product { name, m, n, k: kk, trans_a: ta, trans_b: tb, a_is_p, c_is_scores } in products {
        // The product over `count` blocks of operands given as (address, row stride, elements
        // from one block to the next).
        let product = |a: (u64, usize, usize),
                       b_op: (u64, usize, usize),
                       c: (u64, usize, usize),
                       count| Gemm {
            m,
            n,
            k: kk,
            a: a.0,
            trans_a: ta,
            b: b_op.0,
            trans_b: tb,
            c: c.0,
            c_f32: false,
            beta: 0.0,
            bias: None,
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::strided(count, a.2, b_op.2, c.2),
            ld: [a.1, b_op.1, c.1],
        };
        // Per head: head h's columns (ld D, batch rows T·D apart); P and the scores `[B, H,
        // T, T]` (a head's blocks H·T·T apart).
        let per_head = |h: usize| {
            let head = |buf: &DeviceBuffer<f16>| (buf.ptr() + (h * head_dim * 2) as u64, d, t * d);
            let block =
                |buf: &DeviceBuffer<f16>| (buf.ptr() + (h * t * t * 2) as u64, t, heads * t * t);
            let a = if a_is_p { block(&p) } else { head(&q) };
            let c = if c_is_scores { block(&scores) } else { head(&o) };
            product(a, head(&k), c, b)
        };
        let t_per_head = time_op(dev, reps, |_| {
            for h in 0..heads {
                // SAFETY: every block lies inside its buffer (sized from the shape above).
                unsafe { gemm::run(dev, "bench", &per_head(h)) }?;
            }
            Ok(())
        })?;
        // Head-major: the same buffers read as B·H dense blocks (`[T, Dh]` or `[T, T]`).
        let dense =
            |buf: &DeviceBuffer<f16>, rows: usize, cols: usize| (buf.ptr(), cols, rows * cols);
        let a = if a_is_p { dense(&p, t, t) } else { dense(&q, t, head_dim) };
        let c = if c_is_scores { dense(&scores, t, t) } else { dense(&o, t, head_dim) };
        let head_major = product(a, dense(&k, t, head_dim), c, b * heads);
        // SAFETY: B·H dense blocks of each operand fill exactly the buffers above.
        let t_head_major = time_op(dev, reps, |_| unsafe { gemm::run(dev, "bench", &head_major) })?;
        // The per-head products as one group with pointer arrays (training's default): one
        // launch over the same in-place operands, where the device has a kernel for it.
        let heads_products: Vec<Gemm> = (0..heads).map(per_head).collect();
        let like = Gemm {
            a: 0,
            b: 0,
            c: 0,
            batch: GemmBatch::scattered(b * heads, 16),
            ..heads_products[0]
        };
        let t_arrays = if dev.has_pointer_array_gemm(&like)? {
            // SAFETY: as the per-head products; each writes its own head's blocks or columns.
            Some(time_op(dev, reps, |_| unsafe {
                gemm::run_group_as(dev, "bench", &heads_products, true)
            })?)
        } else {
            None
        };
        let op = |layout: &str| &*format!("prod_{name}_{layout}_dh{head_dim}").leak();
        push(op("per_head"), label.clone(), t_per_head, bytes, Some(flops));
        push(op("head_major"), label.clone(), t_head_major, bytes, Some(flops));
        match t_arrays {
            Some(t) => push(op("pointer_arrays"), label.clone(), t, bytes, Some(flops)),
            None => eprintln!("kernel_bench: no pointer-array batches on {}", dev.name()),
        }
    }
    Ok(())
}

/// The rows `proj_{wgrad,dgrad}_{each,one_batch,fused}_d{width}`: the backward products of
/// attention's three projections (query, key, value: width × width weights reading one
/// `[N, width]` input). Weight gradients dW += dYᵀ·X (fp32, accumulated), each projection's dY
/// its own `[N, width]` buffer as in training: one product a projection (`each`, training's
/// default), the three as one pointer-array batch (`one_batch`, `CHINGU_GEMM_WEIGHT_GRAD_BATCH=1`;
/// left out where cuBLASLt ran its products one by one instead), and one product of a
/// `[3·width, width]` weight over a `[N, 3·width]` dY (`fused`: what storing the three weights
/// as one tensor would give). Input gradients dX (fp16): three products into one output, the
/// first overwriting, the others adding (`each`, training's), against one product over the
/// `[N, 3·width]` dY (`fused`). 2·N·width²·3 FLOPs each; bytes the operands read and the output
/// written (read too when accumulated).
fn projection_rows(
    dev: &Gpu,
    s: Shapes,
    reps: usize,
    width: usize,
    next_seed: &mut impl FnMut() -> u64,
    push: &mut impl FnMut(&'static str, String, f64, f64, Option<f64>),
) -> Result<(), GpuError> {
    use chingu_kernels::gpu::{Gemm, GemmBatch, GemmEpilogue};
    let (n, d) = (s.n, width);
    let x = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
    let dys: Vec<DeviceBuffer<f16>> = (0..3)
        .map(|_| random_half(dev, next_seed(), n * d, -1.0, 1.0))
        .collect::<Result<_, _>>()?;
    let dy_fused = random_half(dev, next_seed(), n * 3 * d, -1.0, 1.0)?;
    let w = random_half(dev, next_seed(), 3 * d * d, -0.1, 0.1)?;
    let dw = random_f32(dev, next_seed(), 3 * d * d, -1.0, 1.0)?;
    let dx = random_half(dev, next_seed(), n * d, -1.0, 1.0)?;
    let flops = 2.0 * 3.0 * (n * d * d) as f64;
    let label = format!("3 x {n}x{d}x{d}");
    /// C[m×n] (+)= op(A)·op(B) over k, dense rows.
    #[allow(clippy::too_many_arguments)]
    fn product(
        (m, n, k): (usize, usize, usize),
        a: u64,
        trans_a: bool,
        b: u64,
        c: u64,
        c_f32: bool,
        beta: f32,
    ) -> Gemm {
        Gemm {
            m,
            n,
            k,
            a,
            trans_a,
            b,
            trans_b: false,
            c,
            c_f32,
            beta,
            bias: None,
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::ONE,
            ld: Gemm::DENSE,
        }
    }
    // dW_p[d×d] += dY_pᵀ · X, into block p of dW.
    let wgrads: Vec<Gemm> = (0..3)
        .map(|p| {
            let c = dw.ptr() + (p * d * d * 4) as u64;
            product((d, d, n), dys[p].ptr(), true, x.ptr(), c, true, 1.0)
        })
        .collect();
    let fused_wgrad = product((3 * d, d, n), dy_fused.ptr(), true, x.ptr(), dw.ptr(), true, 1.0);
    // dX[N×d] (=|+=) dY_p · W_p, W_p block p of W.
    let dgrads: Vec<Gemm> = (0..3)
        .map(|p| {
            let b = w.ptr() + (p * d * d * 2) as u64;
            product(
                (n, d, d),
                dys[p].ptr(),
                false,
                b,
                dx.ptr(),
                false,
                if p == 0 { 0.0 } else { 1.0 },
            )
        })
        .collect();
    let fused_dgrad = product((n, d, 3 * d), dy_fused.ptr(), false, w.ptr(), dx.ptr(), false, 0.0);
    let (nd, dd) = ((n * d) as f64, (d * d) as f64);
    // The op's minimum traffic, the same for each way of running it (so GB/s compares as
    // time does): dY and X read once, dW read and written; dY and W read, dX written once.
    let wgrad_bytes = H * 4.0 * nd + S * 2.0 * 3.0 * dd;
    let dgrad_bytes = H * (3.0 * nd + 3.0 * dd + nd);
    let op = |what: &str| &*format!("proj_{what}_d{d}").leak();
    // SAFETY (every product below): each block lies inside its buffer, sized above for three
    // projections; the outputs are written by one product at a time, or by a batch whose
    // products write disjoint blocks.
    let t = time_op(dev, reps, |_| {
        wgrads.iter().try_for_each(|g| unsafe { gemm::run(dev, "bench", g) })
    })?;
    push(op("wgrad_each"), label.clone(), t, wgrad_bytes, Some(flops));
    let batches = dev.pointer_array_batches();
    let t = time_op(dev, reps, |_| unsafe { gemm::run_group_as(dev, "bench", &wgrads, true) })?;
    match dev.pointer_array_batches().zip(batches) {
        Some((after, before)) if after > before => {
            push(op("wgrad_one_batch"), label.clone(), t, wgrad_bytes, Some(flops))
        }
        _ => eprintln!("kernel_bench: {} ran no pointer-array batch for {label}", dev.name()),
    }
    let t = time_op(dev, reps, |_| unsafe { gemm::run(dev, "bench", &fused_wgrad) })?;
    push(op("wgrad_fused"), label.clone(), t, wgrad_bytes, Some(flops));
    let t = time_op(dev, reps, |_| {
        dgrads.iter().try_for_each(|g| unsafe { gemm::run(dev, "bench", g) })
    })?;
    push(op("dgrad_each"), label.clone(), t, dgrad_bytes, Some(flops));
    let t = time_op(dev, reps, |_| unsafe { gemm::run(dev, "bench", &fused_dgrad) })?;
    push(op("dgrad_fused"), label, t, dgrad_bytes, Some(flops));
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let mut s =
        String::from("| op | shape | time (µs) | GB/s | TFLOP/s |\n|---|---|---:|---:|---:|\n");
    for r in rows {
        let tflops = r.tflops().map_or("".to_string(), |t| format!("{t:.2}"));
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {} |",
            r.op,
            r.shape,
            r.seconds * 1e6,
            r.gbps(),
            tflops
        );
    }
    s
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json(device: &str, reps: usize, s: Shapes, rows: &[Row]) -> String {
    let mut out = String::from("{\n");
    let _ = writeln!(out, "  \"impl\": \"chingu\",");
    let _ = writeln!(out, "  \"device\": {},", json_str(device));
    let _ = writeln!(out, "  \"reps\": {reps},");
    let _ = writeln!(out, "  \"timing\": \"mean of reps (host clock around the loop)\",");
    let _ = writeln!(out, "  \"shapes\": {},", json_str(&format!("{s:?}")));
    out.push_str("  \"results\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let tflops = r.tflops().map_or("null".to_string(), |t| format!("{t}"));
        let _ = writeln!(
            out,
            "    {{\"op\": {}, \"shape\": {}, \"time_us\": {}, \"bytes\": {}, \"gbps\": {}, \
             \"tflops\": {}}}{}",
            json_str(r.op),
            json_str(&r.shape),
            r.seconds * 1e6,
            r.bytes,
            r.gbps(),
            tflops,
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    out.push_str("  ]\n}\n");
    out
}

fn main() {
    if let Err(e) = bench_main() {
        eprintln!("kernel_bench: {e}");
        std::process::exit(1);
    }
}

fn bench_main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let (dev, shapes): (Gpu, Shapes) = if args.device == "cuda" {
        (Arc::new(chingu_kernels::gpu::cuda::CudaDevice::new(0)?), Shapes::seed_256())
    } else {
        (Arc::new(chingu_kernels::gpu::emu::EmuDevice::new()), Shapes::tiny())
    };
    eprintln!("kernel_bench on {}, {} reps, {shapes:?}", dev.name(), args.reps);
    let rows = run(&dev, shapes, args.reps, args.attention_families)?;
    if let Some(path) = &args.json {
        std::fs::write(path, json(&dev.name(), args.reps, shapes, &rows))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    println!(
        "\nchingu kernels on {} (mean of {} reps after {WARMUP} warm-up launches)\n",
        dev.name(),
        args.reps
    );
    print!("{}", table(&rows));
    Ok(())
}
