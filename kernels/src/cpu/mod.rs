//! The CPU backend: the reference implementation of every op, and a usable trainer.
//!
//! Parallel with rayon, yet bitwise deterministic whatever the thread count: work is split
//! into chunks whose boundaries depend only on the shapes, every output element is computed
//! by exactly one task in a fixed order, and reductions across chunks are summed
//! sequentially in chunk order. GEMMs go through `matrixmultiply` (single-threaded calls, split
//! by rows across rayon), whose per-element accumulation order does not depend on how the rows
//! are partitioned.

mod gemm;
mod rows;
mod scalar;
mod simd;

pub use scalar::Scalar;

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::backend::{AdamW, AttentionShape, Backend, DropoutKey};
use crate::rng::{mix, GAMMA};
use gemm::{gemm, gemm_strided, Product};
use rows::{lane_sum_squares, AdamWStep, LayerNormRows};
use simd::vectorized;

/// Rows per parallel task: fixed, so results never depend on the number of threads.
const ROW_CHUNK: usize = 128;
const LN_EPS: f64 = 1e-5;
/// Elements from which [`Cpu::zeros`] fills a buffer in parallel chunks of this size.
const PARALLEL_ZERO_MIN: usize = 1 << 16;

/// The CPU backend computing in `T` (f32 to train, f64 for gradient checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<T: Scalar> {
    _elem: PhantomData<T>,
}

impl<T: Scalar> Cpu<T> {
    /// A CPU backend.
    pub fn new() -> Self {
        Self { _elem: PhantomData }
    }
}

/// GELU, tanh approximation: 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³) —
/// one exp instead of a (much slower) tanh. The emulated device's GEMM epilogue uses it too.
#[inline(always)]
pub(crate) fn gelu<T: Scalar>(x: T) -> T {
    let (s2, c) = (T::of(2.0 * (2.0 / std::f64::consts::PI).sqrt()), T::of(0.044715));
    x / (T::one() + (-(s2 * (x + c * x * x * x))).exp_vectorizable())
}

/// d/dx [x·σ(2u)] = σ + x·σ·(1 − σ)·2u', with 2u' = s2·(1 + 3c·x²).
#[inline(always)]
pub(crate) fn gelu_slope<T: Scalar>(x: T) -> T {
    let (s2, c, three) =
        (T::of(2.0 * (2.0 / std::f64::consts::PI).sqrt()), T::of(0.044715), T::of(3.0));
    let sig = T::one() / (T::one() + (-(s2 * (x + c * x * x * x))).exp_vectorizable());
    sig + x * sig * (T::one() - sig) * s2 * (T::one() + three * c * x * x)
}

/// Elements per parallel task of a whole-buffer reduction (fixed: sums never depend on the
/// thread count).
const REDUCE_CHUNK: usize = 1 << 16;

/// Sums per-chunk partial vectors in chunk order (deterministic reduction).
fn reduce_rows<T: Scalar>(acc: &mut [T], partials: Vec<Vec<T>>) {
    for part in partials {
        for (a, p) in acc.iter_mut().zip(part) {
            *a = *a + p;
        }
    }
}

/// The dropout decision for element `index`: kept when its 16-bit value clears the threshold.
///
/// The key is mixed once into a stream base; element `index` takes 16 bits of the
/// `index / 4`-th value of the SplitMix64 stream from there (bits 16·(index mod 4) up): one
/// mix for four elements — the 64-bit multiplies of a mix were what a GPU's fused LayerNorm
/// and dropout kernels spent most of their integer work on — and any element computable
/// alone (as a CUDA thread will).
pub fn dropout_keeps(key: DropoutKey, index: u64, p: f32) -> bool {
    dropout_value(dropout_hash(dropout_base(key), index / 4), index) >= dropout_threshold(p)
}

/// The per-call stream base of dropout's hash (shared with the GPU launcher).
pub(crate) fn dropout_base(key: DropoutKey) -> u64 {
    mix(mix(key.seed ^ GAMMA) ^ key.step) ^ key.site.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The hash that decides elements 4·group .. 4·group + 3.
#[inline(always)]
pub(super) fn dropout_hash(base: u64, group: u64) -> u64 {
    mix(base.wrapping_add(group.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// Element `index`'s 16-bit value, from its group's hash.
#[inline(always)]
pub(super) fn dropout_value(hash: u64, index: u64) -> u64 {
    (hash >> (16 * (index % 4))) & 0xffff
}

/// round(p·2^16): elements whose 16-bit value is below it are dropped, so the drop rate is
/// p to within 2^-17 (shared with the GPU launcher; 0 drops nothing).
pub(crate) fn dropout_threshold(p: f32) -> u64 {
    (f64::from(p) * 65_536.0).round() as u64
}

/// The survivors' scale for `threshold`: one over the keep rate the threshold gives,
/// 2^16 / (2^16 − threshold), so the expectation is kept exactly (1/(1 − p) would be off by
/// up to 2× for a p near 1, where the rounding of p·2^16 matters); 1 where nothing is
/// dropped or nothing kept (shared with the GPU launcher).
pub(crate) fn dropout_scale(threshold: u64) -> f64 {
    if threshold == 0 || threshold >= 65_536 {
        1.0
    } else {
        65_536.0 / (65_536 - threshold) as f64
    }
}

impl<T: Scalar> Backend for Cpu<T> {
    type Buf = Vec<T>;

    fn name(&self) -> String {
        format!("cpu-{}", T::NAME)
    }

    fn zeros(&self, len: usize) -> Vec<T> {
        let _timed = crate::profile::scope(|| "zeros".into());
        if len < PARALLEL_ZERO_MIN {
            return vec![T::zero(); len];
        }
        // The allocator hands back reused memory, so zeroing is a memset of the whole buffer:
        // split across the pool instead of on the calling thread alone.
        let mut buf = Vec::with_capacity(len);
        buf.spare_capacity_mut()[..len]
            .par_chunks_mut(PARALLEL_ZERO_MIN)
            .for_each(|chunk| chunk.iter_mut().for_each(|x| *x = MaybeUninit::new(T::zero())));
        // SAFETY: the first `len` elements were all initialised just above.
        unsafe { buf.set_len(len) };
        buf
    }
    fn upload_f32(&self, data: &[f32]) -> Vec<T> {
        data.iter().map(|&x| T::of(f64::from(x))).collect()
    }
    fn upload_f64(&self, data: &[f64]) -> Vec<T> {
        data.iter().map(|&x| T::of(x)).collect()
    }
    fn to_f32(&self, buf: &Vec<T>) -> Vec<f32> {
        buf.iter().map(|x| x.f64() as f32).collect()
    }
    fn to_f64(&self, buf: &Vec<T>) -> Vec<f64> {
        buf.iter().map(|x| x.f64()).collect()
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn fill_zero(&self, buf: &mut Vec<T>) {
        let _timed = crate::profile::scope(|| "fill_zero".into());
        buf.par_chunks_mut(PARALLEL_ZERO_MIN)
            .for_each(|c| c.iter_mut().for_each(|x| *x = T::zero()));
    }
    fn copy(&self, dst: &mut Vec<T>, src: &Vec<T>) {
        let _timed = crate::profile::scope(|| "copy".into());
        assert_eq!(dst.len(), src.len(), "copy: lengths differ");
        dst.par_chunks_mut(PARALLEL_ZERO_MIN)
            .zip(src.par_chunks(PARALLEL_ZERO_MIN))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
    fn copy_rows(
        &self,
        dst: &mut Vec<T>,
        dst_row: usize,
        src: &Vec<T>,
        src_row: usize,
        rows: usize,
        width: usize,
    ) {
        dst[dst_row * width..(dst_row + rows) * width]
            .copy_from_slice(&src[src_row * width..(src_row + rows) * width]);
    }

    fn add_assign(&self, acc: &mut Vec<T>, x: &Vec<T>) {
        let _timed = crate::profile::scope(|| "add_assign".into());
        assert_eq!(acc.len(), x.len());
        acc.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(a, x)| {
            a.iter_mut().zip(x).for_each(|(a, &x)| *a = *a + x);
        });
    }
    fn scale(&self, buf: &mut Vec<T>, factor: f32) {
        let _timed = crate::profile::scope(|| "scale".into());
        let f = T::of(f64::from(factor));
        buf.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|x| *x = *x * f));
    }
    fn sum_squares(&self, buf: &Vec<T>) -> f64 {
        let _timed = crate::profile::scope(|| "sum_squares".into());
        if buf.len() <= REDUCE_CHUNK {
            return vectorized(
                #[inline(always)]
                || lane_sum_squares(buf),
            );
        }
        let partials: Vec<f64> = buf
            .par_chunks(REDUCE_CHUNK)
            .map(|c| {
                vectorized(
                    #[inline(always)]
                    || lane_sum_squares(c),
                )
            })
            .collect();
        partials.into_iter().sum()
    }
    fn all_finite(&self, buf: &Vec<T>) -> bool {
        let _timed = crate::profile::scope(|| "all_finite".into());
        buf.par_iter().all(|x| x.is_finite())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<T>,
        table: &Vec<T>,
        positions: &Vec<T>,
        ids: &[u32],
        pos: &[usize],
        width: usize,
        scale: f32,
    ) {
        let _timed = crate::profile::scope(|| "embedding_forward".into());
        assert_eq!(ids.len(), pos.len());
        assert_eq!(out.len(), ids.len() * width);
        let scale = T::of(f64::from(scale));
        out.par_chunks_mut(width).enumerate().for_each(|(n, row)| {
            let t = &table[ids[n] as usize * width..][..width];
            let p = &positions[pos[n] * width..][..width];
            for ((o, &t), &p) in row.iter_mut().zip(t).zip(p) {
                *o = t * scale + p;
            }
        });
    }

    fn embedding_backward(
        &self,
        d_table: &mut Vec<T>,
        d_out: &Vec<T>,
        ids: &[u32],
        width: usize,
        scale: f32,
    ) {
        let _timed = crate::profile::scope(|| "embedding_backward".into());
        // Sequential over rows: several rows may share an id, and the order of their sums
        // must not depend on scheduling. It is O(N·D), negligible next to the GEMMs.
        let scale = T::of(f64::from(scale));
        for (n, &id) in ids.iter().enumerate() {
            let dst = &mut d_table[id as usize * width..][..width];
            for (d, &g) in dst.iter_mut().zip(&d_out[n * width..][..width]) {
                *d = *d + g * scale;
            }
        }
    }

    fn linear_forward(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        b: Option<&Vec<T>>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let _timed = crate::profile::scope(|| format!("linear_forward {rows}x{in_dim}->{out_dim}"));
        let y = &mut y[..rows * out_dim];
        if let Some(b) = b {
            y.par_chunks_mut(ROW_CHUNK * out_dim).for_each(|block| {
                block.chunks_mut(out_dim).for_each(|row| row.copy_from_slice(b));
            });
        }
        // y[N,O] (+)= x[N,I] · wᵀ: B(p, j) = w[j, p] → row stride 1, column stride I. Onto the
        // bias rows (one pass fewer than adding the bias after).
        gemm(y, x, in_dim, 1, w, 1, in_dim, rows, in_dim, out_dim, b.is_some());
    }

    fn linear(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        b: Option<&Vec<T>>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<T> {
        let _timed = crate::profile::scope(|| format!("linear_forward {rows}x{in_dim}->{out_dim}"));
        let len = rows * out_dim;
        let mut y = Vec::with_capacity(len);
        let spare = &mut y.spare_capacity_mut()[..len];
        match b {
            // Every row starts as the bias; the product is added onto it.
            Some(b) => {
                spare.par_chunks_mut(ROW_CHUNK * out_dim).for_each(|block| {
                    for row in block.chunks_mut(out_dim) {
                        row.iter_mut().zip(b).for_each(|(y, &b)| *y = MaybeUninit::new(b));
                    }
                });
                // SAFETY: all `len` elements were written just above.
                unsafe { y.set_len(len) };
                gemm(&mut y, x, in_dim, 1, w, 1, in_dim, rows, in_dim, out_dim, true);
            }
            None => {
                gemm::gemm_into_uninit(spare, x, in_dim, 1, w, 1, in_dim, rows, in_dim, out_dim);
                // SAFETY: the product wrote every element of its `rows × out_dim` output.
                unsafe { y.set_len(len) };
            }
        }
        y
    }

    fn duplicate(&self, x: &Vec<T>) -> Vec<T> {
        let _timed = crate::profile::scope(|| "duplicate".into());
        let mut y = Vec::with_capacity(x.len());
        y.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(PARALLEL_ZERO_MIN)
            .zip(x.par_chunks(PARALLEL_ZERO_MIN))
            .for_each(|(dst, src)| {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = MaybeUninit::new(s))
            });
        // SAFETY: every element was written just above.
        unsafe { y.set_len(x.len()) };
        y
    }

    fn linear_backward(
        &self,
        dx: Option<&mut Vec<T>>,
        accumulate_dx: bool,
        dw: &mut Vec<T>,
        db: Option<&mut Vec<T>>,
        dy: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let _timed =
            crate::profile::scope(|| format!("linear_backward {rows}x{in_dim}->{out_dim}"));
        let shape = LinearShape { rows, in_dim, out_dim };
        linear_backward_then(dx, accumulate_dx, dw, db, dy, x, w, shape, None);
    }

    fn linear_backward_through_gelu(
        &self,
        d_pre: &mut Vec<T>,
        dw: &mut Vec<T>,
        db: Option<&mut Vec<T>>,
        dy: &Vec<T>,
        act: &Vec<T>,
        pre: &Vec<T>,
        w: &Vec<T>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let _timed = crate::profile::scope(|| {
            format!("linear_backward_through_gelu {rows}x{in_dim}->{out_dim}")
        });
        // d_pre = (dy · w) ⊙ gelu′(pre): the slope is applied to each block of rows right
        // after its product, while the block is still in cache, and no d(act) buffer exists.
        let slope = |first_row: usize, block: &mut [T]| {
            let pre = &pre[first_row * in_dim..][..block.len()];
            vectorized(
                #[inline(always)]
                || rows::times_gelu_slope(block, pre),
            )
        };
        let shape = LinearShape { rows, in_dim, out_dim };
        linear_backward_then(Some(d_pre), false, dw, db, dy, act, w, shape, Some(&slope));
    }

    fn layernorm_forward(
        &self,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        rows: usize,
        width: usize,
    ) {
        let _timed = crate::profile::scope(|| "layernorm_forward".into());
        y[..rows * width]
            .par_chunks_mut(width)
            .zip(mean[..rows].par_iter_mut())
            .zip(rstd[..rows].par_iter_mut())
            .enumerate()
            .for_each(|(n, ((y, mean), rstd))| {
                let x = &x[n * width..][..width];
                (*mean, *rstd) = vectorized(
                    #[inline(always)]
                    || rows::layernorm_row(y, x, gamma, beta, LN_EPS),
                );
            });
    }

    fn layernorm_backward(
        &self,
        dx: &mut Vec<T>,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        gamma: &Vec<T>,
        rows: usize,
        width: usize,
    ) {
        let _timed = crate::profile::scope(|| "layernorm_backward".into());
        let input = LayerNormRows { x, dy, mean, rstd, gamma };
        let partials: Vec<(Vec<T>, Vec<T>)> = dx[..rows * width]
            .par_chunks_mut(ROW_CHUNK * width)
            .enumerate()
            .map(|(block, dx_block)| {
                let mut dg = vec![T::zero(); width];
                let mut db = vec![T::zero(); width];
                let first = block * ROW_CHUNK;
                vectorized(
                    #[inline(always)]
                    || rows::layernorm_backward_rows(dx_block, first, &input, &mut dg, &mut db),
                );
                (dg, db)
            })
            .collect();
        let (dgs, dbs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        reduce_rows(dgamma, dgs);
        reduce_rows(dbeta, dbs);
    }

    fn gelu_forward(&self, y: &mut Vec<T>, x: &Vec<T>) {
        let _timed = crate::profile::scope(|| "gelu_forward".into());
        y.par_chunks_mut(1 << 12).zip(x.par_chunks(1 << 12)).for_each(|(y, x)| {
            vectorized(
                #[inline(always)]
                || rows::gelu_forward(y, x),
            )
        });
    }

    fn gelu_backward(&self, dx: &mut Vec<T>, dy: &Vec<T>, x: &Vec<T>) {
        let _timed = crate::profile::scope(|| "gelu_backward".into());
        dx.par_chunks_mut(1 << 12).zip(dy.par_chunks(1 << 12)).zip(x.par_chunks(1 << 12)).for_each(
            |((dx, dy), x)| {
                vectorized(
                    #[inline(always)]
                    || rows::gelu_backward(dx, dy, x),
                )
            },
        );
    }

    fn relu_forward(&self, y: &mut Vec<T>, x: &Vec<T>) {
        let _timed = crate::profile::scope(|| "relu_forward".into());
        y.par_iter_mut()
            .zip(x.par_iter())
            .for_each(|(y, &x)| *y = if x > T::zero() { x } else { T::zero() });
    }

    fn relu_backward(&self, dx: &mut Vec<T>, dy: &Vec<T>, x: &Vec<T>) {
        let _timed = crate::profile::scope(|| "relu_backward".into());
        dx.par_iter_mut()
            .zip(dy.par_iter())
            .zip(x.par_iter())
            .for_each(|((dx, &dy), &x)| *dx = if x > T::zero() { dy } else { T::zero() });
    }

    fn dropout(&self, buf: &mut Vec<T>, p: f32, key: DropoutKey) {
        let _timed = crate::profile::scope(|| "dropout".into());
        let threshold = dropout_threshold(p);
        if threshold == 0 {
            // p below 2^-17 (or none) drops nothing, so nothing is scaled either.
            return;
        }
        let keep_scale = T::of(dropout_scale(threshold));
        let base = dropout_base(key);
        buf.par_chunks_mut(1 << 12).enumerate().for_each(|(chunk, values)| {
            vectorized(
                #[inline(always)]
                || rows::dropout(values, chunk << 12, base, threshold, keep_scale),
            )
        });
    }

    fn attention_forward(
        &self,
        out: &mut Vec<T>,
        probs: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        key_len: &[usize],
        shape: AttentionShape,
    ) {
        let _timed = crate::profile::scope(|| "attention_forward".into());
        let AttentionShape { batch, q_len, k_len, heads, head_dim, causal, q_offset } = shape;
        let d = shape.width();
        assert_eq!(key_len.len(), batch);
        assert!(out.len() >= batch * q_len * d && probs.len() >= batch * heads * q_len * k_len);
        let scale = T::of(1.0 / (head_dim as f64).sqrt());
        out[..batch * q_len * d]
            .par_chunks_mut(q_len * d)
            .zip(probs[..batch * heads * q_len * k_len].par_chunks_mut(heads * q_len * k_len))
            .enumerate()
            .for_each(|(b, (out_b, probs_b))| {
                let visible_keys = key_len[b].min(k_len);
                for h in 0..heads {
                    let p = &mut probs_b[h * q_len * k_len..][..q_len * k_len];
                    let q_bh = &q[b * q_len * d + h * head_dim..];
                    let k_bh = &k[b * k_len * d + h * head_dim..];
                    let v_bh = &v[b * k_len * d + h * head_dim..];
                    // scores[Tq, Tk] = q_bh · k_bhᵀ
                    gemm_strided(p, k_len, q_bh, d, 1, k_bh, 1, d, q_len, head_dim, k_len, false);
                    for i in 0..q_len {
                        let row = &mut p[i * k_len..][..k_len];
                        let limit =
                            if causal { visible_keys.min(q_offset + i + 1) } else { visible_keys };
                        vectorized(
                            #[inline(always)]
                            || rows::scaled_softmax_row(row, limit, scale),
                        );
                    }
                    // out_bh[Tq, Dh] = P · v_bh
                    gemm_strided(
                        &mut out_b[h * head_dim..],
                        d,
                        p,
                        k_len,
                        1,
                        v_bh,
                        d,
                        1,
                        q_len,
                        k_len,
                        head_dim,
                        false,
                    );
                }
            });
    }

    fn attention_backward(
        &self,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        d_out: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        _out: &Vec<T>,
        probs: &Vec<T>,
        _key_len: &[usize],
        shape: AttentionShape,
    ) {
        let _timed = crate::profile::scope(|| "attention_backward".into());
        let AttentionShape { batch, q_len, k_len, heads, head_dim, .. } = shape;
        let d = shape.width();
        let scale = T::of(1.0 / (head_dim as f64).sqrt());
        dq[..batch * q_len * d]
            .par_chunks_mut(q_len * d)
            .zip(dk[..batch * k_len * d].par_chunks_mut(k_len * d))
            .zip(dv[..batch * k_len * d].par_chunks_mut(k_len * d))
            .enumerate()
            .for_each(|(b, ((dq_b, dk_b), dv_b))| {
                let mut ds = vec![T::zero(); q_len * k_len];
                for h in 0..heads {
                    let p = &probs[(b * heads + h) * q_len * k_len..][..q_len * k_len];
                    let off = h * head_dim;
                    let do_bh = &d_out[b * q_len * d + off..];
                    let q_bh = &q[b * q_len * d + off..];
                    let k_bh = &k[b * k_len * d + off..];
                    let v_bh = &v[b * k_len * d + off..];
                    // dv_bh[Tk, Dh] = Pᵀ · dO_bh
                    gemm_strided(
                        &mut dv_b[off..],
                        d,
                        p,
                        1,
                        k_len,
                        do_bh,
                        d,
                        1,
                        k_len,
                        q_len,
                        head_dim,
                        false,
                    );
                    // dP[Tq, Tk] = dO_bh · v_bhᵀ
                    gemm_strided(
                        &mut ds, k_len, do_bh, d, 1, v_bh, 1, d, q_len, head_dim, k_len, false,
                    );
                    // dS = P ⊙ (dP − Σ_j P·dP) · scale  (masked entries have P = 0)
                    vectorized(
                        #[inline(always)]
                        || rows::softmax_backward_rows(&mut ds, p, k_len, scale),
                    );
                    // dq_bh[Tq, Dh] = dS · k_bh ; dk_bh[Tk, Dh] = dSᵀ · q_bh
                    gemm_strided(
                        &mut dq_b[off..],
                        d,
                        &ds,
                        k_len,
                        1,
                        k_bh,
                        d,
                        1,
                        q_len,
                        k_len,
                        head_dim,
                        false,
                    );
                    gemm_strided(
                        &mut dk_b[off..],
                        d,
                        &ds,
                        1,
                        k_len,
                        q_bh,
                        d,
                        1,
                        k_len,
                        q_len,
                        head_dim,
                        false,
                    );
                }
            });
    }

    fn cross_entropy(
        &self,
        d_logits: &mut Vec<T>,
        logits: &Vec<T>,
        targets: &[u32],
        vocab: usize,
        ignore: u32,
        smoothing: f64,
    ) -> (f64, usize) {
        let _timed = crate::profile::scope(|| "cross_entropy".into());
        let counted = targets.iter().filter(|&&t| t != ignore).count();
        let inv_count = if counted == 0 { 0.0 } else { 1.0 / counted as f64 };
        let eps = smoothing;
        let losses: Vec<f64> = d_logits[..targets.len() * vocab]
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(n, grad)| {
                let target = targets[n];
                if target == ignore {
                    grad.iter_mut().for_each(|g| *g = T::zero());
                    return 0.0;
                }
                let row = &logits[n * vocab..][..vocab];
                vectorized(
                    #[inline(always)]
                    || rows::cross_entropy_row(grad, row, target as usize, eps, inv_count),
                )
            })
            .collect();
        (losses.into_iter().sum::<f64>() * inv_count, counted)
    }

    fn adamw(&self, param: &mut Vec<T>, grad: &Vec<T>, m: &mut Vec<T>, v: &mut Vec<T>, s: AdamW) {
        let _timed = crate::profile::scope(|| "adamw".into());
        let (b1, b2) = (f64::from(s.beta1), f64::from(s.beta2));
        let lr = T::of(f64::from(s.lr));
        let step = AdamWStep {
            beta1: T::of(b1),
            beta2: T::of(b2),
            lr,
            eps: T::of(f64::from(s.eps)),
            decay: T::one() - lr * T::of(f64::from(s.weight_decay)),
            grad_scale: T::of(f64::from(s.grad_scale)),
            c1: T::of(1.0 - b1.powi(s.step as i32)),
            c2: T::of(1.0 - b2.powi(s.step as i32)),
        };
        param
            .par_chunks_mut(1 << 12)
            .zip(grad.par_chunks(1 << 12))
            .zip(m.par_chunks_mut(1 << 12))
            .zip(v.par_chunks_mut(1 << 12))
            .for_each(|(((p, g), m), v)| {
                vectorized(
                    #[inline(always)]
                    || rows::adamw(p, g, m, v, step),
                )
            });
    }
}

/// A linear layer's sizes: `y[rows, out_dim] = x[rows, in_dim] · wᵀ`.
#[derive(Clone, Copy)]
struct LinearShape {
    rows: usize,
    in_dim: usize,
    out_dim: usize,
}

/// [`Backend::linear_backward`], with `then` applied to the input gradient's rows once each
/// holds its final value.
#[allow(clippy::too_many_arguments)]
fn linear_backward_then<T: Scalar>(
    dx: Option<&mut Vec<T>>,
    accumulate_dx: bool,
    dw: &mut Vec<T>,
    db: Option<&mut Vec<T>>,
    dy: &Vec<T>,
    x: &Vec<T>,
    w: &Vec<T>,
    shape: LinearShape,
    then: Option<gemm::Epilogue<'_, T>>,
) {
    let LinearShape { rows, in_dim, out_dim } = shape;
    // dw[O,I] += dyᵀ[O,N] · x[N,I]: A(o, n) = dy[n, o] → row stride 1, column stride O.
    let weight_grad = Product {
        c: dw,
        a: dy,
        rsa: 1,
        csa: out_dim,
        b: x,
        rsb: in_dim,
        csb: 1,
        m: out_dim,
        k: rows,
        n: in_dim,
        accumulate: true,
        then: None,
    };
    match dx {
        // dx[N,I] (+)= dy[N,O] · w[O,I]
        Some(dx) => gemm::side_by_side(
            Product {
                c: dx,
                a: dy,
                rsa: out_dim,
                csa: 1,
                b: w,
                rsb: in_dim,
                csb: 1,
                m: rows,
                k: out_dim,
                n: in_dim,
                accumulate: accumulate_dx,
                then,
            },
            weight_grad,
        ),
        None => gemm(dw, dy, 1, out_dim, x, in_dim, 1, out_dim, rows, in_dim, true),
    }
    if let Some(db) = db {
        let partials: Vec<Vec<T>> = dy[..rows * out_dim]
            .par_chunks(ROW_CHUNK * out_dim)
            .map(|chunk| {
                let mut acc = vec![T::zero(); out_dim];
                for row in chunk.chunks(out_dim) {
                    acc.iter_mut().zip(row).for_each(|(a, &g)| *a = *a + g);
                }
                acc
            })
            .collect();
        reduce_rows(db, partials);
    }
}
