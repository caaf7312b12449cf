//! Attention with the scores materialised, through cuBLASLt's batched products
//! ([`AttentionKernels::Gemm`](super::AttentionKernels): the default for heads wider than 64
//! over more than 256 × 256 scores a block, `CHINGU_ATTN=gemm` for every shape).
//! Forward: S = Q·Kᵀ (fp32, or fp16 with [`SCORES_VAR`](super::SCORES_VAR): [`Score`]), the
//! softmax kernel (P in fp16, lse), O = P·V.
//! Backward: dP = dO·Vᵀ, dS (`attention_scores_backward_saved_f16`) from the P the forward
//! saved where the statistics buffer holds it ([`saved_probs_len`]); else S again and P and dS
//! from it (`attention_scores_backward_f16`). Then dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q. Every
//! product reads and writes one head's columns of the `[B·T, H·Dh]` tensors in place (row
//! stride H·Dh), batched over batch rows, one product per head — no copy of any tensor into a
//! head-major layout. The heads' products of one step go as a group (`gemm::run_group`):
//! unless `CHINGU_GEMM_ARRAYS=0`, one pointer-array batch a shape (all heads' blocks in one
//! launch). Kernels and conventions: `kernels/cuda/attention_gemm.cu`. Score rows go
//! in chunks of whole (batch row, head) blocks, consecutive in that order, of at most
//! `scores_per_chunk` scores (one block at least), so the scratch stays bounded (12 bytes a
//! score in backward, 6 with P saved; 8 and 4 with fp16 scores) whatever the sequence length; a chunk's blocks of one
//! head are batch rows in a row, one batched product. The chunking changes no result.
//! Causal self-attention (Tq = Tk, no query offset) goes in bands of `causal_band` query rows
//! ([`band_rows`]): band k's products cover only the keys its rows can see, j < (k + 1)·band,
//! and the transposed products (dV, dK) of key band k only the query rows from k·band on, so
//! the scores above the bands' diagonal are never computed or stored (at 1024 rows in bands of
//! 512, a quarter of every product and pass over the scores).

use half::f16;

use std::ffi::c_void;

use super::{int, launch, THREADS};
use crate::backend::AttentionShape;
use crate::gpu::{gemm, DeviceBuffer, DevicePtr, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError};

/// The element type S and dP are stored in (fp32 by default, fp16 with
/// [`SCORES_VAR`](super::SCORES_VAR)), and the kernels that read them.
pub(super) trait Score: crate::gpu::Element {
    /// Whether the products write fp32.
    const F32: bool;
    /// P and lse from S.
    const SOFTMAX: &'static str;
    /// P and dS from S and dP (P recomputed).
    const BACKWARD: &'static str;
    /// dS from dP and the saved P.
    const BACKWARD_SAVED: &'static str;
}

impl Score for f32 {
    const F32: bool = true;
    const SOFTMAX: &'static str = "attention_softmax_f16";
    const BACKWARD: &'static str = "attention_scores_backward_f16";
    const BACKWARD_SAVED: &'static str = "attention_scores_backward_saved_f16";
}

impl Score for f16 {
    const F32: bool = false;
    const SOFTMAX: &'static str = "attention_softmax_half_scores_f16";
    const BACKWARD: &'static str = "attention_scores_backward_half_scores_f16";
    const BACKWARD_SAVED: &'static str = "attention_scores_backward_saved_half_scores_f16";
}

/// The shape's numbers as the kernels take them.
struct Dims {
    q_len: i32,
    k_len: i32,
    heads: i32,
    causal: i32,
    q_offset: i32,
    scale: f32,
    /// Query rows a causal band ([`band_rows`]; 0: no bands).
    band: i32,
}

impl Dims {
    fn new(s: AttentionShape, band: usize, op: &'static str) -> Result<Self, GpuError> {
        Ok(Self {
            q_len: int(op, "q_len", s.q_len)?,
            k_len: int(op, "k_len", s.k_len)?,
            heads: int(op, "heads", s.heads)?,
            causal: i32::from(s.causal),
            q_offset: int(op, "q_offset", s.q_offset)?,
            scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
            band: int(op, "band", band)?,
        })
    }
}

/// Query rows of a causal band for shape `s` with bands of `causal_band` rows asked for (0:
/// none), or 0 where the block goes whole: bands only for causal self-attention (Tq = Tk, no
/// query offset) longer than one band, rounded up to 8 rows so every band's scores start
/// 16-byte aligned.
pub(super) fn band_rows(s: AttentionShape, causal_band: usize) -> usize {
    let banded = s.causal && s.q_offset == 0 && s.q_len == s.k_len && causal_band > 0;
    let band = causal_band.next_multiple_of(8);
    if banded && s.q_len > band {
        band
    } else {
        0
    }
}

/// One band of a block's query rows: its first row, its rows, and the keys it sees (from 0).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Band {
    first: usize,
    rows: usize,
    keys: usize,
}

/// The query bands of a block (one band of every row and key where `band` is 0).
fn query_bands(s: AttentionShape, band: usize) -> Vec<Band> {
    if band == 0 {
        return vec![Band { first: 0, rows: s.q_len, keys: s.k_len }];
    }
    (0..s.q_len)
        .step_by(band)
        .map(|first| Band {
            first,
            rows: band.min(s.q_len - first),
            keys: (first + band).min(s.k_len),
        })
        .collect()
}

/// The key bands of a block for the transposed products (dV = Pᵀ·dO, dK = dSᵀ·Q): `first`
/// and `rows` the band's keys, `keys` the query rows that see them (from `first` on: the
/// band's rows and every later band's).
fn key_bands(s: AttentionShape, band: usize) -> Vec<Band> {
    if band == 0 {
        return vec![Band { first: 0, rows: s.k_len, keys: s.q_len }];
    }
    (0..s.k_len)
        .step_by(band)
        .map(|first| Band { first, rows: band.min(s.k_len - first), keys: s.q_len - first })
        .collect()
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

    /// The matrices from their stored row `rows` and column `cols` on (elements of `bytes`).
    fn from(self, rows: usize, cols: usize, bytes: usize) -> Self {
        Self { ptr: self.ptr + ((rows * self.ld + cols) * bytes) as DevicePtr, ..self }
    }

    /// One head's score blocks in the chunk's `buf`, from the chunk's block `first`: `[Tq×Tk]`
    /// with rows [`score_ld`] apart, a head's blocks H apart ((batch row, head) order).
    fn scores<T: crate::gpu::Element>(
        buf: ScoresOf<T>,
        s: AttentionShape,
        first: usize,
        transposed: bool,
    ) -> Self {
        let (ld, block) = (score_ld(s), s.q_len * score_ld(s));
        let ptr = buf.at_block(s, first);
        Self { ptr, stride: s.heads * block, transposed, ld }
    }
}

/// Score blocks of element type `T` from `ptr` on: a chunk's scratch, or the chunk's part of
/// the P the forward saved.
#[derive(Clone, Copy)]
struct ScoresOf<T> {
    ptr: DevicePtr,
    element: std::marker::PhantomData<T>,
}

impl<T> ScoresOf<T> {
    fn at(ptr: DevicePtr) -> Self {
        Self { ptr, element: std::marker::PhantomData }
    }

    fn of(buf: &DeviceBuffer<T>) -> Self
    where
        T: crate::gpu::Element,
    {
        Self::at(buf.ptr())
    }

    /// The address of block `first` (blocks `Tq` rows of [`score_ld`] apart).
    fn at_block(self, s: AttentionShape, first: usize) -> DevicePtr {
        let block = s.q_len * score_ld(s);
        self.ptr + (first * block * std::mem::size_of::<T>()) as DevicePtr
    }
}

/// The row stride of the score blocks: key count rounded up to 8 elements, so every row and
/// block starts 16-byte aligned whatever the sequence lengths, and cuBLASLt keeps its
/// vectorised kernels for the batched products that read or write scores.
fn score_ld(s: AttentionShape) -> usize {
    s.k_len.next_multiple_of(8)
}

/// Halves of P the forward saves for the backward, `None` where it saves none: all of P,
/// `[B·H·Tq, score_ld]`, where it fits one chunk's bound (`scores_per_chunk`: 2^27 scores, 256
/// MiB a call, by default). The backward then skips S = Q·Kᵀ and the softmax again: GPU run
/// 19 timed seed-768 at 53.2 ms a step against 57.1 recomputing (72 of the step's 216 score
/// products, and a third of the scores-backward kernel's traffic). Longer sequences keep
/// memory bounded by recomputing.
pub(super) fn saved_probs_len(s: AttentionShape, scores_per_chunk: usize) -> Option<usize> {
    let scores = s.batch * s.heads * s.q_len * score_ld(s);
    (scores > 0 && scores <= scores_per_chunk).then_some(scores)
}

/// f32 elements of the statistics buffer where it holds lse and then P (fp16, two a slot,
/// from the first 16-byte boundary after lse, so cuBLASLt sees aligned score rows).
pub(super) fn stats_len_with_probs(s: AttentionShape, probs: usize) -> usize {
    lse_len(s).next_multiple_of(4) + probs.div_ceil(2)
}

fn lse_len(s: AttentionShape) -> usize {
    s.batch * s.heads * s.q_len
}

/// Where the statistics buffer `stats` holds P after lse ([`stats_len_with_probs`]), its
/// address; `None` where it holds lse alone.
fn saved_probs(
    stats: &DeviceBuffer<f32>,
    s: AttentionShape,
    scores_per_chunk: usize,
) -> Option<ScoresOf<f16>> {
    let probs = saved_probs_len(s, scores_per_chunk)?;
    (stats.len() == stats_len_with_probs(s, probs))
        .then(|| ScoresOf::at(stats.ptr() + (lse_len(s).next_multiple_of(4) * 4) as DevicePtr))
}

/// `C = op(A)·op(B)` (overwritten) for `count` blocks at once; `C` fp32 when `c_f32`.
fn batched(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
    c_f32: bool,
    count: usize,
) -> Gemm {
    Gemm {
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
        batch: GemmBatch::strided(count, a.stride, b.stride, c.stride),
        ld: [a.ld, b.ld, c.ld],
    }
}

/// (Batch row, head) blocks per chunk of at most `scores` scores, row padding included (one
/// at least): as few chunks as that bound allows, as even as whole batch rows (where they fit)
/// let them be, since a short last chunk runs its products at a fraction of the speed (GPU run 16:
/// seed-768's 72 blocks went as 32 + 32 + 8, and the 8 took as long as 22 of the others).
fn blocks_per_chunk(s: AttentionShape, scores: usize) -> usize {
    let blocks = (s.batch * s.heads).max(1);
    let most = (scores / (s.q_len * score_ld(s)).max(1)).clamp(1, blocks);
    let even = blocks.div_ceil(blocks.div_ceil(most));
    let whole_rows = even.next_multiple_of(s.heads.max(1));
    if whole_rows <= most {
        whole_rows
    } else {
        even
    }
}

/// The blocks per chunk and the chunk's scratch, made by `alloc` for a chunk's scores: as
/// [`blocks_per_chunk`] gives them, or half as many blocks, again and again down to one,
/// while the device has no room for that much scratch (the chunking changes no result, so a
/// full GPU costs speed here, not the step).
fn chunk_scratch<T>(
    s: AttentionShape,
    scores_per_chunk: usize,
    alloc: impl Fn(usize) -> Result<T, GpuError>,
) -> Result<(usize, T), GpuError> {
    let block = s.q_len * score_ld(s);
    let mut bound = scores_per_chunk;
    loop {
        let chunk = blocks_per_chunk(s, bound);
        match alloc(chunk * block) {
            Err(GpuError::OutOfMemory { .. }) if chunk > 1 => bound = chunk / 2 * block,
            result => return result.map(|scratch| (chunk, scratch)),
        }
    }
}

/// A chunk's blocks of head `h`: batch rows `b0..b0 + count`, the first of them the chunk's
/// block `first_in_chunk`.
struct HeadRun {
    h: usize,
    b0: usize,
    count: usize,
    first_in_chunk: usize,
}

/// Each head's blocks among the chunk's blocks `first..first + count` (heads with none left
/// out).
fn head_runs(s: AttentionShape, first: usize, count: usize) -> impl Iterator<Item = HeadRun> {
    let heads = s.heads;
    (0..heads).filter_map(move |h| {
        let bh0 = first + (h + heads - first % heads) % heads;
        (bh0 < first + count).then(|| HeadRun {
            h,
            b0: bh0 / heads,
            count: (first + count - 1 - bh0) / heads + 1,
            first_in_chunk: bh0 - first,
        })
    })
}

/// Adds to `group` the products that make `run`'s score blocks in the chunk's `out` = x·yᵀ
/// (of type T), x and y head `run.h`'s columns of `[B·Tq, H·Dh]` and `[B·Tk, H·Dh]` tensors
/// (S = Q·Kᵀ, dP = dO·Vᵀ), band by band (the keys each band sees; [`query_bands`]). Each
/// writes only its own blocks' bands.
fn scores_from<T: Score>(
    group: &mut Vec<Gemm>,
    s: AttentionShape,
    band: usize,
    run: &HeadRun,
    (x, y): (&DeviceBuffer<f16>, &DeviceBuffer<f16>),
    out: &DeviceBuffer<T>,
) {
    for b in query_bands(s, band) {
        let (x, y) = (
            Operand::head(x, s, s.q_len, run.b0, run.h).from(b.first, 0, 2),
            Operand::head_t(y, s, s.k_len, run.b0, run.h),
        );
        let out = Operand::scores(ScoresOf::of(out), s, run.first_in_chunk, false);
        let out = out.from(b.first, 0, std::mem::size_of::<T>());
        group.push(batched((b.rows, b.keys, s.head_dim), x, y, out, T::F32, run.count));
    }
}

/// Adds to `group` the products that make head `run.h`'s columns of `out` = op(P)·x for
/// `run`'s blocks, P the chunk's score blocks from `p`: as stored for query rows out
/// (O = P·V, dQ = dS·K), transposed for key rows out (dV = Pᵀ·dO, dK = dSᵀ·Q); x and `out`
/// `[B·T, H·Dh]` with the matching lengths. Each writes only its own rows of those columns.
fn times_scores(
    group: &mut Vec<Gemm>,
    s: AttentionShape,
    band: usize,
    run: &HeadRun,
    (p, transposed): (ScoresOf<f16>, bool),
    x: &DeviceBuffer<f16>,
    out: &DeviceBuffer<f16>,
) {
    let (out_len, x_len) = if transposed { (s.k_len, s.q_len) } else { (s.q_len, s.k_len) };
    // Out rows in bands, each summing over the score rows or columns it meets: a query band
    // over the keys it sees (P rows `b.first..`, columns from 0), a key band over the query
    // rows from its first on (P rows and columns from `b.first`, read transposed).
    let bands = if transposed { key_bands(s, band) } else { query_bands(s, band) };
    for b in bands {
        let p = Operand::scores(p, s, run.first_in_chunk, transposed);
        let (p, x_from) = if transposed {
            (p.from(b.first, b.first, 2), b.first)
        } else {
            (p.from(b.first, 0, 2), 0)
        };
        let x = Operand::head(x, s, x_len, run.b0, run.h).from(x_from, 0, 2);
        let out = Operand::head(out, s, out_len, run.b0, run.h).from(b.first, 0, 2);
        group.push(batched((b.rows, s.head_dim, b.keys), p, x, out, false, run.count));
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

/// The forward (see the module comment), S stored as T; arguments as
/// `ops::attention_forward_using`'s, checked (`lse` the statistics buffer: P saved after lse
/// where it is long enough).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Score>(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    lse: &mut DeviceBuffer<f32>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    lens: &DeviceBuffer<i32>,
    s: AttentionShape,
    (scores_per_chunk, causal_band): (usize, usize),
) -> Result<(), GpuError> {
    const OP: &str = "attention_forward";
    let band = band_rows(s, causal_band);
    let d = Dims::new(s, band, OP)?;
    let (tq, tk) = (s.q_len, s.k_len);
    if tk == 0 {
        zero(dev, &mut [out])?;
    }
    let blocks = s.batch * s.heads;
    let saved = saved_probs(lse, s, scores_per_chunk);
    let (chunk, (scores, p_scratch)) = chunk_scratch(s, scores_per_chunk, |n| {
        let p = match saved {
            Some(_) => None,
            None => Some(DeviceBuffer::<f16>::uninit(dev, n)?),
        };
        Ok((DeviceBuffer::<T>::uninit(dev, n)?, p))
    })?;
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        let rows = count * tq;
        let p = match (saved, &p_scratch) {
            (Some(saved), _) => ScoresOf::at(saved.at_block(s, first)),
            (None, Some(scratch)) => ScoresOf::of(scratch),
            (None, None) => unreachable!("P has scratch where the forward saves none"),
        };
        // SAFETY (both groups): each run's blocks of Q, K, V, the output and the chunk's
        // scores lie inside their buffers (the scratch holds `chunk` blocks, saved P all);
        // the products of a group write disjoint blocks or columns, none of them an input.
        let mut group = Vec::new();
        for run in head_runs(s, first, count).filter(|_| tk > 0) {
            scores_from(&mut group, s, band, &run, (q, k), &scores);
        }
        unsafe { gemm::run_group(dev, "attention", &group) }?;
        let args = args![
            p.ptr,
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
            int(OP, "first block", first)?,
            d.band
        ];
        launch(dev, T::SOFTMAX, warp_per_row(rows), (THREADS, 1, 1), 0, args)?;
        group.clear();
        for run in head_runs(s, first, count).filter(|_| tk > 0) {
            times_scores(&mut group, s, band, &run, (p, false), v, out);
        }
        unsafe { gemm::run_group(dev, "attention", &group) }?;
    }
    Ok(())
}

/// The backward (see the module comment), from the forward's `lse` (and P, where saved after
/// it) and `delta` = Σ dO·O per row and head, S and dP stored as T; arguments as
/// `ops::attention_backward_using`'s, checked.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Score>(
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
    (scores_per_chunk, causal_band): (usize, usize),
) -> Result<(), GpuError> {
    const OP: &str = "attention_backward";
    let band = band_rows(s, causal_band);
    let d = Dims::new(s, band, OP)?;
    let (tq, tk) = (s.q_len, s.k_len);
    if tq == 0 || tk == 0 {
        // No query or no key: every gradient is zero.
        return zero(dev, &mut [dq, dk, dv]);
    }
    let blocks = s.batch * s.heads;
    let saved = saved_probs(lse, s, scores_per_chunk);
    // Scratch: dP and dS; S and P as well where P was not saved.
    let (chunk, (recompute, dp, ds)) = chunk_scratch(s, scores_per_chunk, |n| {
        let recompute = match saved {
            Some(_) => None,
            None => {
                Some((DeviceBuffer::<T>::uninit(dev, n)?, DeviceBuffer::<f16>::uninit(dev, n)?))
            }
        };
        Ok((recompute, DeviceBuffer::<T>::uninit(dev, n)?, DeviceBuffer::<f16>::uninit(dev, n)?))
    })?;
    for first in (0..blocks).step_by(chunk) {
        let count = chunk.min(blocks - first);
        // SAFETY (both groups): each run's blocks of the `[B·T, H·Dh]` tensors and of the
        // chunk's scores lie inside their buffers; the products of a group write disjoint
        // blocks or columns, none of them an input.
        let mut group = Vec::new();
        for run in head_runs(s, first, count) {
            // S = Q·Kᵀ (unless P was saved) and dP = dO·Vᵀ, stored as T.
            if let Some((scores, _)) = &recompute {
                scores_from(&mut group, s, band, &run, (q, k), scores);
            }
            scores_from(&mut group, s, band, &run, (d_out, v), &dp);
        }
        unsafe { gemm::run_group(dev, "attention", &group) }?;
        let rows = int(OP, "rows", count * tq)?;
        let (ld, first_bh) =
            (int(OP, "score row stride", score_ld(s))?, int(OP, "first block", first)?);
        let grid = warp_per_row(count * tq);
        let p = match (saved, &recompute) {
            (Some(saved), _) => {
                let p = ScoresOf::at(saved.at_block(s, first));
                let args = args![
                    ds.ptr(),
                    p.ptr,
                    dp.ptr(),
                    delta.ptr(),
                    rows,
                    d.q_len,
                    d.k_len,
                    ld,
                    d.scale,
                    first_bh,
                    d.band
                ];
                launch(dev, T::BACKWARD_SAVED, grid, (THREADS, 1, 1), 0, args)?;
                p
            }
            (None, Some((scores, p))) => {
                let args = args![
                    p.ptr(),
                    ds.ptr(),
                    scores.ptr(),
                    dp.ptr(),
                    lse.ptr(),
                    delta.ptr(),
                    lens.ptr(),
                    rows,
                    d.q_len,
                    d.k_len,
                    ld,
                    d.heads,
                    d.causal,
                    d.q_offset,
                    d.scale,
                    first_bh,
                    d.band
                ];
                launch(dev, T::BACKWARD, grid, (THREADS, 1, 1), 0, args)?;
                ScoresOf::of(p)
            }
            (None, None) => unreachable!("S and P have scratch where the forward saved no P"),
        };
        let ds = ScoresOf::of(&ds);
        group.clear();
        for run in head_runs(s, first, count) {
            // dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q, each head's columns overwritten.
            times_scores(&mut group, s, band, &run, (p, true), d_out, dv);
            times_scores(&mut group, s, band, &run, (ds, false), k, dq);
            times_scores(&mut group, s, band, &run, (ds, true), q, dk);
        }
        unsafe { gemm::run_group(dev, "attention", &group) }?;
    }
    // Scratch buffers go back to the allocator, reused only by later work on this stream.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, heads: usize, len: usize) -> AttentionShape {
        AttentionShape {
            batch,
            q_len: len,
            k_len: len,
            heads,
            head_dim: 64,
            causal: false,
            q_offset: 0,
        }
    }

    #[test]
    fn p_is_kept_where_all_of_it_fits_one_chunk() {
        // seed-768 at 18 × 1024, 4 heads: 72 blocks of 1024 × 1024 scores, under 2^27.
        let s = shape(18, 4, 1024);
        assert_eq!(saved_probs_len(s, 1 << 27), Some(72 << 20));
        // lse (73,728 f32), then 72 Mi halves two a slot.
        assert_eq!(stats_len_with_probs(s, 72 << 20), 73_728 + (36 << 20));
        // Twice the tokens: 4× the scores, over the bound — recomputed in backward.
        assert_eq!(saved_probs_len(shape(18, 4, 2048), 1 << 27), None);
        // Rows padded to 8 keys count: 1001 keys take 1008 slots a row.
        let odd = AttentionShape { k_len: 1001, ..shape(2, 1, 1000) };
        assert_eq!(saved_probs_len(odd, 1 << 27), Some(2 * 1000 * 1008));
        // lse rounded up to 16 bytes before P: 2 × 3 = 6 f32 take 8, then 15 halves 8 slots.
        let three = AttentionShape { q_len: 3, ..odd };
        assert_eq!(stats_len_with_probs(three, 15), 8 + 8);
        // Nothing to keep for a shape without scores.
        assert_eq!(saved_probs_len(AttentionShape { k_len: 0, ..odd }, 1 << 27), None);
    }

    #[test]
    fn chunks_are_few_even_and_whole_batch_rows_where_they_fit() {
        // seed-768 at 18 × 1024, 4 heads, 2^25 scores: 72 blocks in 3 chunks of 24 (6 batch
        // rows), not 32 + 32 + 8.
        assert_eq!(blocks_per_chunk(shape(18, 4, 1024), 1 << 25), 24);
        assert_eq!(blocks_per_chunk(shape(18, 4, 1024), 1 << 26), 36);
        // Everything in one chunk when the bound allows it.
        assert_eq!(blocks_per_chunk(shape(3, 2, 16), 1 << 25), 6);
        // Whole batch rows do not fit 3 blocks at 2 heads: chunks of 3 end inside rows.
        assert_eq!(blocks_per_chunk(shape(3, 2, 16), 3 * 16 * 16), 3);
        assert_eq!(blocks_per_chunk(shape(2, 2, 16), 3 * 16 * 16), 2);
        // One block when even one does not fit (the bound's floor).
        assert_eq!(blocks_per_chunk(shape(2, 2, 16), 1), 1);
        for batch in 1..12 {
            for heads in 1..6 {
                for most in 1..20 {
                    let s = shape(batch, heads, 8);
                    let chunk = blocks_per_chunk(s, most * 8 * 8);
                    let blocks = batch * heads;
                    assert!(chunk <= most.max(1) && chunk >= 1, "{batch}×{heads}, {most}: {chunk}");
                    assert_eq!(
                        blocks.div_ceil(chunk),
                        blocks.div_ceil(most.min(blocks)),
                        "{batch}×{heads}, at most {most}: as few chunks as the bound allows"
                    );
                }
            }
        }
    }
}
