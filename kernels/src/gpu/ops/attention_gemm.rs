//! Attention with the scores materialised, through cuBLASLt's batched products
//! ([`AttentionKernels::Gemm`](super::AttentionKernels), opt-in with `CHINGU_ATTN_GEMM=1` until
//! measured on a GPU). Forward: S = Q·Kᵀ (fp32), the softmax kernel (P in fp16, lse), O = P·V.
//! Backward: S and dP = dO·Vᵀ again, P and dS (`attention_scores_backward_f16`), then
//! dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q. Every product reads and writes one head's columns of
//! the `[B·T, H·Dh]` tensors in place (row stride H·Dh), batched over batch rows, one product
//! per head — no copy of any tensor into a head-major layout. Kernels and conventions:
//! `kernels/cuda/attention_gemm.cu`. Score rows go in chunks of whole (batch row, head) blocks,
//! consecutive in that order, of at most `scores_per_chunk` scores (one block at least), so the
//! scratch stays bounded (12 bytes a score in backward) whatever the sequence length; a chunk's
//! blocks of one head are batch rows in a row, one batched product. The chunking changes no
//! result.

use half::f16;

use std::ffi::c_void;

use super::{int, launch, THREADS};
use crate::backend::AttentionShape;
use crate::gpu::{gemm, DeviceBuffer, DevicePtr, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError};

/// The shape's numbers as the kernels take them.
struct Dims {
    q_len: i32,
    k_len: i32,
    heads: i32,
    causal: i32,
    q_offset: i32,
    scale: f32,
}

impl Dims {
    fn new(s: AttentionShape, op: &'static str) -> Result<Self, GpuError> {
        Ok(Self {
            q_len: int(op, "q_len", s.q_len)?,
            k_len: int(op, "k_len", s.k_len)?,
            heads: int(op, "heads", s.heads)?,
            causal: i32::from(s.causal),
            q_offset: int(op, "q_offset", s.q_offset)?,
            scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
        })
    }
}

/// One operand of a batched product: the first matrix's address, matrices `stride` elements
/// apart, whether each is stored transposed, and its row stride.
struct Operand {
    ptr: DevicePtr,
    stride: usize,
    transposed: bool,
    ld: usize,
}

impl Operand {
    /// Head `h`'s columns of `x` `[B·len, H·Dh]` for batch rows `b0` onwards: `[len×Dh]`
    /// matrices with rows H·Dh apart, one batch row to the next.
    fn head(x: &DeviceBuffer<f16>, s: AttentionShape, len: usize, b0: usize, h: usize) -> Self {
        let d = s.heads * s.head_dim;
        let offset = b0 * len * d + h * s.head_dim;
        Self { ptr: x.ptr() + (offset * 2) as DevicePtr, stride: len * d, transposed: false, ld: d }
    }

    /// The same, read transposed.
    fn head_t(x: &DeviceBuffer<f16>, s: AttentionShape, len: usize, b0: usize, h: usize) -> Self {
        Self { transposed: true, ..Self::head(x, s, len, b0, h) }
    }

    /// One head's score blocks in the chunk's `buf`, from the chunk's block `first`: `[Tq×Tk]`
    /// with rows [`score_ld`] apart, a head's blocks H apart ((batch row, head) order).
    fn scores<T: crate::gpu::Element>(
        buf: &DeviceBuffer<T>,
        s: AttentionShape,
        first: usize,
        transposed: bool,
    ) -> Self {
        let (ld, block) = (score_ld(s), s.q_len * score_ld(s));
        let ptr = buf.ptr() + (first * block * std::mem::size_of::<T>()) as DevicePtr;
        Self { ptr, stride: s.heads * block, transposed, ld }
    }
}

/// The row stride of the score blocks: key count rounded up to 8 elements, so every row and
/// block starts 16-byte aligned whatever the sequence lengths, and cuBLASLt keeps its
/// vectorised kernels for the batched products that read or write scores.
fn score_ld(s: AttentionShape) -> usize {
    s.k_len.next_multiple_of(8)
}

/// `C = op(A)·op(B)` (overwritten) for `count` blocks at once; `C` fp32 when `c_f32`.
///
/// # Safety
/// Every block of A, B and C lies inside its buffer (the callers size them from the shape).
unsafe fn batched(
    dev: &Gpu,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
    c_f32: bool,
    count: usize,
) -> Result<(), GpuError> {
    let g = Gemm {
        m,
        n,
        k,
        a: a.ptr,
        trans_a: a.transposed,
        b: b.ptr,
        trans_b: b.transposed,
        c: c.ptr,
        c_f32,
        beta: 0.0,
        bias: None,
        epilogue: GemmEpilogue::None,
        batch: GemmBatch { count, stride_a: a.stride, stride_b: b.stride, stride_c: c.stride },
        ld: [a.ld, b.ld, c.ld],
    };
    // SAFETY: the caller's contract.
    unsafe { gemm::run(dev, "attention", &g) }
}

/// (Batch row, head) blocks per chunk of at most `scores` scores, row padding included (one
/// at least).
fn blocks_per_chunk(s: AttentionShape, scores: usize) -> usize {
    (scores / (s.q_len * score_ld(s)).max(1)).clamp(1, (s.batch * s.heads).max(1))
}

/// A chunk's blocks of one head: batch rows `b0..b0 + count`, the first of them the chunk's
/// block `first_in_chunk`.
struct HeadRun {
    b0: usize,
    count: usize,
    first_in_chunk: usize,
}

impl HeadRun {
    /// Head `h`'s blocks among the chunk's blocks `first..first + count` (none: `None`).
    fn of(s: AttentionShape, first: usize, count: usize, h: usize) -> Option<Self> {
        let heads = s.heads;
        let bh0 = first + (h + heads - first % heads) % heads;
        (bh0 < first + count).then(|| Self {
            b0: bh0 / heads,
            count: (first + count - 1 - bh0) / heads + 1,
            first_in_chunk: bh0 - first,
        })
    }
}

/// The grid of the pointwise score kernels: one warp per score row, `THREADS / 32` rows a
/// block (the kernels index scores in 64 bits; `rows` itself is checked to fit an int).
fn warp_per_row(rows: usize) -> (u32, u32, u32) {
    (rows.div_ceil((THREADS / 32) as usize) as u32, 1, 1)
}

/// Sets `bufs` to zero (the outputs of a shape without queries or keys).
fn zero(dev: &Gpu, bufs: &mut [&mut DeviceBuffer<f16>]) -> Result<(), GpuError> {
    for buf in bufs.iter_mut().filter(|b| !b.is_empty()) {
        // SAFETY: the buffer holds `len` halves.
        unsafe { dev.memset_zero(buf.ptr(), buf.len() * 2) }?;
    }
    Ok(())
}

/// The forward (see the module comment); arguments as `ops::attention_forward_using`'s, checked.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    lse: &mut DeviceBuffer<f32>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    lens: &DeviceBuffer<i32>,
    s: AttentionShape,
    scores_per_chunk: usize,
) -> Result<(), GpuError> {
    const OP: &str = "attention_forward";
    let d = Dims::new(s, OP)?;
    let (tq, tk, dh) = (s.q_len, s.k_len, s.head_dim);
    if tk == 0 {
        zero(dev, &mut [out])?;
    }
    let (blocks, chunk) = (s.batch * s.heads, blocks_per_chunk(s, scores_per_chunk));
    let scratch = chunk * tq * score_ld(s);
    let scores = DeviceBuffer::<f32>::uninit(dev, scratch)?;
    let p = DeviceBuffer::<f16>::uninit(dev, scratch)?;
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        let rows = count * tq;
        let runs = || (0..s.heads).filter_map(|h| Some((h, HeadRun::of(s, first, count, h)?)));
        // SAFETY (every product): `run.count` batch rows from `run.b0` of head `h`'s columns of
        // Q, K, V and the output (inside the `[B·T, H·Dh]` buffers), and the same blocks of the
        // chunk's scores (inside the scratch, which holds `chunk` blocks).
        for (h, run) in runs().filter(|_| tk > 0) {
            unsafe {
                batched(
                    dev,
                    (tq, tk, dh),
                    Operand::head(q, s, tq, run.b0, h),
                    Operand::head_t(k, s, tk, run.b0, h),
                    Operand::scores(&scores, s, run.first_in_chunk, false),
                    true,
                    run.count,
                )?;
            }
        }
        let args = args![
            p.ptr(),
            lse.ptr(),
            scores.ptr(),
            lens.ptr(),
            int(OP, "rows", rows)?,
            d.q_len,
            d.k_len,
            int(OP, "score row stride", score_ld(s))?,
            d.heads,
            d.causal,
            d.q_offset,
            d.scale,
            int(OP, "first block", first)?
        ];
        launch(dev, "attention_softmax_f16", warp_per_row(rows), (THREADS, 1, 1), 0, args)?;
        for (h, run) in runs().filter(|_| tk > 0) {
            // SAFETY: as above, [Tq×Tk]·[Tk×Dh] → [Tq×Dh].
            unsafe {
                batched(
                    dev,
                    (tq, dh, tk),
                    Operand::scores(&p, s, run.first_in_chunk, false),
                    Operand::head(v, s, tk, run.b0, h),
                    Operand::head(out, s, tq, run.b0, h),
                    false,
                    run.count,
                )?;
            }
        }
    }
    Ok(())
}

/// The backward (see the module comment), from the forward's `lse` and `delta` = Σ dO·O per
/// row and head; arguments as `ops::attention_backward_using`'s, checked.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dev: &Gpu,
    dq: &mut DeviceBuffer<f16>,
    dk: &mut DeviceBuffer<f16>,
    dv: &mut DeviceBuffer<f16>,
    d_out: &DeviceBuffer<f16>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    lse: &DeviceBuffer<f32>,
    delta: &DeviceBuffer<f32>,
    lens: &DeviceBuffer<i32>,
    s: AttentionShape,
    scores_per_chunk: usize,
) -> Result<(), GpuError> {
    const OP: &str = "attention_backward";
    let d = Dims::new(s, OP)?;
    let (tq, tk, dh) = (s.q_len, s.k_len, s.head_dim);
    if tq == 0 || tk == 0 {
        // No query or no key: every gradient is zero.
        return zero(dev, &mut [dq, dk, dv]);
    }
    let (blocks, chunk) = (s.batch * s.heads, blocks_per_chunk(s, scores_per_chunk));
    let scratch = chunk * tq * score_ld(s);
    let (scores, dp) =
        (DeviceBuffer::<f32>::uninit(dev, scratch)?, DeviceBuffer::<f32>::uninit(dev, scratch)?);
    let (p, ds) =
        (DeviceBuffer::<f16>::uninit(dev, scratch)?, DeviceBuffer::<f16>::uninit(dev, scratch)?);
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        let runs = || (0..s.heads).filter_map(|h| Some((h, HeadRun::of(s, first, count, h)?)));
        // SAFETY (every product below): `run.count` batch rows from `run.b0` of head `h`'s
        // columns of the `[B·T, H·Dh]` tensors and the same blocks of the chunk's scores, all
        // inside their buffers.
        for (h, run) in runs() {
            let (b0, n, at) = (run.b0, run.count, run.first_in_chunk);
            unsafe {
                // S = Q·Kᵀ and dP = dO·Vᵀ, fp32.
                batched(
                    dev,
                    (tq, tk, dh),
                    Operand::head(q, s, tq, b0, h),
                    Operand::head_t(k, s, tk, b0, h),
                    Operand::scores(&scores, s, at, false),
                    true,
                    n,
                )?;
                batched(
                    dev,
                    (tq, tk, dh),
                    Operand::head(d_out, s, tq, b0, h),
                    Operand::head_t(v, s, tk, b0, h),
                    Operand::scores(&dp, s, at, false),
                    true,
                    n,
                )?;
            }
        }
        let rows = count * tq;
        let args = args![
            p.ptr(),
            ds.ptr(),
            scores.ptr(),
            dp.ptr(),
            lse.ptr(),
            delta.ptr(),
            lens.ptr(),
            int(OP, "rows", rows)?,
            d.q_len,
            d.k_len,
            int(OP, "score row stride", score_ld(s))?,
            d.heads,
            d.causal,
            d.q_offset,
            d.scale,
            int(OP, "first block", first)?
        ];
        launch(dev, "attention_scores_backward_f16", warp_per_row(rows), (THREADS, 1, 1), 0, args)?;
        for (h, run) in runs() {
            let (b0, n, at) = (run.b0, run.count, run.first_in_chunk);
            unsafe {
                // dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q, each head's columns overwritten.
                batched(
                    dev,
                    (tk, dh, tq),
                    Operand::scores(&p, s, at, true),
                    Operand::head(d_out, s, tq, b0, h),
                    Operand::head(dv, s, tk, b0, h),
                    false,
                    n,
                )?;
                batched(
                    dev,
                    (tq, dh, tk),
                    Operand::scores(&ds, s, at, false),
                    Operand::head(k, s, tk, b0, h),
                    Operand::head(dq, s, tq, b0, h),
                    false,
                    n,
                )?;
                batched(
                    dev,
                    (tk, dh, tq),
                    Operand::scores(&ds, s, at, true),
                    Operand::head(q, s, tq, b0, h),
                    Operand::head(dk, s, tk, b0, h),
                    false,
                    n,
                )?;
            }
        }
    }
    // Scratch buffers go back to the allocator, reused only by later work on this stream.
    Ok(())
}
