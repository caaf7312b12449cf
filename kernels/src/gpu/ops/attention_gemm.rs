//! Attention with the scores materialised, through cuBLASLt's batched products
//! ([`AttentionKernels::Gemm`](super::AttentionKernels), opt-in with `CHINGU_ATTN_GEMM=1` until
//! measured on a GPU). Forward: heads split to `[B, H, T, Dh]`, S = Q·Kᵀ (fp32), the softmax
//! kernel (P in fp16, lse), O = P·V, heads merged. Backward: S and dP = dO·Vᵀ again, P and dS
//! (`attention_scores_backward_f16`), then dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q. Kernels and
//! conventions: `kernels/cuda/attention_gemm.cu`. Score rows go in chunks of whole (batch row,
//! head) blocks of at most `scores_per_chunk` scores (one block at least), so the scratch stays
//! bounded (12 bytes a score in backward) whatever the sequence length; the chunking changes
//! no result.

use half::f16;

use std::ffi::c_void;

use super::{blocks_for, int, launch, THREADS};
use crate::backend::AttentionShape;
use crate::gpu::{gemm, DeviceBuffer, DevicePtr, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError};

/// The shape's numbers as the kernels take them.
struct Dims {
    batch: i32,
    q_len: i32,
    k_len: i32,
    heads: i32,
    head_dim: i32,
    causal: i32,
    q_offset: i32,
    scale: f32,
}

impl Dims {
    fn new(s: AttentionShape, op: &'static str) -> Result<Self, GpuError> {
        Ok(Self {
            batch: int(op, "batch", s.batch)?,
            q_len: int(op, "q_len", s.q_len)?,
            k_len: int(op, "k_len", s.k_len)?,
            heads: int(op, "heads", s.heads)?,
            head_dim: int(op, "head_dim", s.head_dim)?,
            causal: i32::from(s.causal),
            q_offset: int(op, "q_offset", s.q_offset)?,
            scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
        })
    }
}

/// `x` `[B·len, H·Dh]` with each head's rows made contiguous: `[B, H, len, Dh]`. (The kernels
/// move 8 halves at a time: buffers are whole allocations, 256-byte aligned, and Dh a multiple
/// of 16, so every vector is 16-byte aligned.)
fn split(
    dev: &Gpu,
    x: &DeviceBuffer<f16>,
    len: i32,
    d: &Dims,
) -> Result<DeviceBuffer<f16>, GpuError> {
    let out = DeviceBuffer::<f16>::uninit(dev, x.len())?;
    if !x.is_empty() {
        let grid = (blocks_for(x.len() / 8), 1, 1);
        let args = args![out.ptr(), x.ptr(), d.batch, len, d.heads, d.head_dim];
        launch(dev, "heads_split_f16", grid, (THREADS, 1, 1), 0, args)?;
    }
    Ok(out)
}

/// `x` `[B·len, H·Dh]` from `y` `[B, H, len, Dh]` (the inverse of [`split`]).
fn merge(
    dev: &Gpu,
    x: &mut DeviceBuffer<f16>,
    y: &DeviceBuffer<f16>,
    len: i32,
    d: &Dims,
) -> Result<(), GpuError> {
    if !x.is_empty() {
        let grid = (blocks_for(x.len() / 8), 1, 1);
        let args = args![x.ptr(), y.ptr(), d.batch, len, d.heads, d.head_dim];
        launch(dev, "heads_merge_f16", grid, (THREADS, 1, 1), 0, args)?;
    }
    Ok(())
}

/// One operand of a batched product: the first block's address, blocks `stride` elements
/// apart, whether each is stored transposed, and its row stride (0: dense).
struct Operand {
    ptr: DevicePtr,
    stride: usize,
    transposed: bool,
    ld: usize,
}

impl Operand {
    /// Block `first` onwards of `buf`, dense blocks.
    fn of<T: crate::gpu::Element>(
        buf: &DeviceBuffer<T>,
        first: usize,
        stride: usize,
        transposed: bool,
    ) -> Self {
        let ptr = buf.ptr() + (first * stride * std::mem::size_of::<T>()) as DevicePtr;
        Self { ptr, stride, transposed, ld: 0 }
    }

    /// The chunk's score blocks in `buf`: `[Tq×Tk]` with rows `ld` apart (see [`score_ld`]).
    fn scores<T: crate::gpu::Element>(
        buf: &DeviceBuffer<T>,
        s: AttentionShape,
        transposed: bool,
    ) -> Self {
        let ld = score_ld(s);
        Self { ptr: buf.ptr(), stride: s.q_len * ld, transposed, ld }
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
/// block at least).
fn blocks_per_chunk(s: AttentionShape, scores: usize) -> usize {
    (scores / (s.q_len * score_ld(s)).max(1)).clamp(1, (s.batch * s.heads).max(1))
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
    let (tq, tk, dh, blocks) = (s.q_len, s.k_len, s.head_dim, s.batch * s.heads);
    let (qh, kh, vh) =
        (split(dev, q, d.q_len, &d)?, split(dev, k, d.k_len, &d)?, split(dev, v, d.k_len, &d)?);
    if tk == 0 {
        zero(dev, &mut [out])?;
    }
    let chunk = blocks_per_chunk(s, scores_per_chunk);
    let scores = DeviceBuffer::<f32>::uninit(dev, chunk * tq * score_ld(s))?;
    let p = DeviceBuffer::<f16>::uninit(dev, chunk * tq * score_ld(s))?;
    let oh = DeviceBuffer::<f16>::uninit(dev, out.len())?;
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        let rows = count * tq;
        if tk > 0 {
            // SAFETY: `count` blocks from `first` of [Tq×Dh], [Tk×Dh] and [Tq×Tk] (rows
            // `score_ld` apart) in buffers of `blocks` (or `chunk`) such blocks.
            unsafe {
                batched(
                    dev,
                    (tq, tk, dh),
                    Operand::of(&qh, first, tq * dh, false),
                    Operand::of(&kh, first, tk * dh, true),
                    Operand::scores(&scores, s, false),
                    true,
                    count,
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
        if tk > 0 {
            // SAFETY: as above, [Tq×Tk]·[Tk×Dh] → [Tq×Dh].
            unsafe {
                batched(
                    dev,
                    (tq, dh, tk),
                    Operand::scores(&p, s, false),
                    Operand::of(&vh, first, tk * dh, false),
                    Operand::of(&oh, first, tq * dh, false),
                    false,
                    count,
                )?;
            }
        }
    }
    if tk > 0 {
        merge(dev, out, &oh, d.q_len, &d)?;
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
    let (tq, tk, dh, blocks) = (s.q_len, s.k_len, s.head_dim, s.batch * s.heads);
    if tq == 0 || tk == 0 {
        // No query or no key: every gradient is zero.
        return zero(dev, &mut [dq, dk, dv]);
    }
    let (qh, kh) = (split(dev, q, d.q_len, &d)?, split(dev, k, d.k_len, &d)?);
    let (vh, doh) = (split(dev, v, d.k_len, &d)?, split(dev, d_out, d.q_len, &d)?);
    let chunk = blocks_per_chunk(s, scores_per_chunk);
    let scratch = chunk * tq * score_ld(s);
    let (scores, dp) =
        (DeviceBuffer::<f32>::uninit(dev, scratch)?, DeviceBuffer::<f32>::uninit(dev, scratch)?);
    let (p, ds) =
        (DeviceBuffer::<f16>::uninit(dev, scratch)?, DeviceBuffer::<f16>::uninit(dev, scratch)?);
    let (dqh, dkh, dvh) = (
        DeviceBuffer::<f16>::uninit(dev, dq.len())?,
        DeviceBuffer::<f16>::uninit(dev, dk.len())?,
        DeviceBuffer::<f16>::uninit(dev, dv.len())?,
    );
    let (q_block, k_block) = (tq * dh, tk * dh);
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        // SAFETY (every product below): `count` blocks from `first` of the split tensors
        // ([Tq×Dh] or [Tk×Dh]) and from 0 of the chunk's scores ([Tq×Tk], rows `score_ld`
        // apart), all inside their buffers, which hold `blocks` or `chunk` blocks.
        unsafe {
            // S = Q·Kᵀ and dP = dO·Vᵀ, fp32.
            batched(
                dev,
                (tq, tk, dh),
                Operand::of(&qh, first, q_block, false),
                Operand::of(&kh, first, k_block, true),
                Operand::scores(&scores, s, false),
                true,
                count,
            )?;
            batched(
                dev,
                (tq, tk, dh),
                Operand::of(&doh, first, q_block, false),
                Operand::of(&vh, first, k_block, true),
                Operand::scores(&dp, s, false),
                true,
                count,
            )?;
        }
        let args = args![
            p.ptr(),
            ds.ptr(),
            scores.ptr(),
            dp.ptr(),
            lse.ptr(),
            delta.ptr(),
            lens.ptr(),
            int(OP, "rows", count * tq)?,
            d.q_len,
            d.k_len,
            int(OP, "score row stride", score_ld(s))?,
            d.heads,
            d.causal,
            d.q_offset,
            d.scale,
            int(OP, "first block", first)?
        ];
        let grid = warp_per_row(count * tq);
        launch(dev, "attention_scores_backward_f16", grid, (THREADS, 1, 1), 0, args)?;
        unsafe {
            // dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q.
            batched(
                dev,
                (tk, dh, tq),
                Operand::scores(&p, s, true),
                Operand::of(&doh, first, q_block, false),
                Operand::of(&dvh, first, k_block, false),
                false,
                count,
            )?;
            batched(
                dev,
                (tq, dh, tk),
                Operand::scores(&ds, s, false),
                Operand::of(&kh, first, k_block, false),
                Operand::of(&dqh, first, q_block, false),
                false,
                count,
            )?;
            batched(
                dev,
                (tk, dh, tq),
                Operand::scores(&ds, s, true),
                Operand::of(&qh, first, q_block, false),
                Operand::of(&dkh, first, k_block, false),
                false,
                count,
            )?;
        }
    }
    merge(dev, dq, &dqh, d.q_len, &d)?;
    merge(dev, dk, &dkh, d.k_len, &d)?;
    merge(dev, dv, &dvh, d.k_len, &d)?;
    // Scratch buffers go back to the allocator, reused only by later work on this stream.
    Ok(())
}
