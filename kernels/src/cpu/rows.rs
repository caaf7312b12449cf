//! The CPU backend's elementwise and per-row loops, each `#[inline(always)]` so that it is
//! compiled inside [`super::simd::vectorized`]'s AVX-512/AVX2 function (a closure that calls
//! one of these stays small enough to be inlined there; a large closure body is not, and
//! then runs as baseline SSE2 code).
//!
//! Reductions sum over a fixed number of lanes ([`LANES`]) in f64: the loops vectorise and
//! the order of additions depends on neither the vector width nor the thread count.

use super::{gelu, gelu_slope, Scalar};

/// Lanes of the vectorisable row reductions: a fixed count, so sums never depend on the
/// machine's vector width.
pub(super) const LANES: usize = 16;

/// Σ f(xᵢ) over `row` in f64: `LANES` running sums over the element index mod `LANES`, then
/// the lanes and the tail in order.
#[inline(always)]
fn lane_sum_of<T: Scalar>(row: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x);
        }
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f64>()
}

/// The sum of `row` in f64.
#[inline(always)]
pub(super) fn lane_sum<T: Scalar>(row: &[T]) -> f64 {
    lane_sum_of(row, |x| x.f64())
}

/// The sum of squares of `row` in f64.
#[inline(always)]
pub(super) fn lane_sum_squares<T: Scalar>(row: &[T]) -> f64 {
    lane_sum_of(row, |x| x.f64() * x.f64())
}

/// The dot product of `a` and `b` in f64, over lanes as [`lane_sum`].
#[inline(always)]
pub(super) fn lane_dot<T: Scalar>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f64; LANES];
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x.f64() * y.f64();
        }
    }
    let tail = a_chunks.remainder().iter().zip(b_chunks.remainder());
    lanes.iter().sum::<f64>() + tail.map(|(x, y)| x.f64() * y.f64()).sum::<f64>()
}

/// The largest element of `row` (−∞ when empty).
#[inline(always)]
pub(super) fn lane_max<T: Scalar>(row: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    let tail = chunks.remainder().iter().fold(T::neg_infinity(), |m, &x| m.max(x));
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// `y = gelu(x)` elementwise.
#[inline(always)]
pub(super) fn gelu_forward<T: Scalar>(y: &mut [T], x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu(x);
    }
}

/// `dx = dy · gelu′(x)` elementwise.
#[inline(always)]
pub(super) fn gelu_backward<T: Scalar>(dx: &mut [T], dy: &[T], x: &[T]) {
    for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
        *dx = dy * gelu_slope(x);
    }
}

/// Dropout on `values`, the elements from `first` on of one call's buffer.
#[inline(always)]
pub(super) fn dropout<T: Scalar>(
    values: &mut [T],
    first: usize,
    base: u64,
    threshold: u64,
    keep_scale: T,
) {
    for (i, v) in values.iter_mut().enumerate() {
        let index = (first + i) as u64;
        *v =
            if super::dropout_hash(base, index) >= threshold { *v * keep_scale } else { T::zero() };
    }
}

/// One LayerNorm row: `y = (x − mean)·rstd·γ + β`; returns (mean, rstd).
#[inline(always)]
pub(super) fn layernorm_row<T: Scalar>(
    y: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
) -> (T, T) {
    let width = x.len();
    let m = lane_sum(x) / width as f64;
    let var = lane_sum_of(x, |v| (v.f64() - m) * (v.f64() - m)) / width as f64;
    let r = 1.0 / (var + eps).sqrt();
    let (mean, rstd) = (T::of(m), T::of(r));
    for i in 0..width {
        y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
    }
    (mean, rstd)
}

/// What the LayerNorm backward of one block of rows reads.
pub(super) struct LayerNormRows<'a, T> {
    pub x: &'a [T],
    pub dy: &'a [T],
    pub mean: &'a [T],
    pub rstd: &'a [T],
    pub gamma: &'a [T],
}

/// LayerNorm backward over the rows of `dx_block` (rows `first..` of the call): adds to `dx`,
/// and sums this block's γ and β gradients into `dg` and `db`.
#[inline(always)]
pub(super) fn layernorm_backward_rows<T: Scalar>(
    dx_block: &mut [T],
    first: usize,
    input: &LayerNormRows<'_, T>,
    dg: &mut [T],
    db: &mut [T],
) {
    let width = input.gamma.len();
    let inv = 1.0 / width as f64;
    // x̂ and dx̂ = dy·γ of the current row, kept for its two passes.
    let (mut xhat, mut dxhat) = (vec![T::zero(); width], vec![T::zero(); width]);
    for (r, dx) in dx_block.chunks_mut(width).enumerate() {
        let n = first + r;
        let (x, dy) = (&input.x[n * width..][..width], &input.dy[n * width..][..width]);
        let (m, rs) = (input.mean[n], input.rstd[n]);
        for i in 0..width {
            xhat[i] = (x[i] - m) * rs;
            dxhat[i] = dy[i] * input.gamma[i];
            dg[i] = dg[i] + dy[i] * xhat[i];
            db[i] = db[i] + dy[i];
        }
        let mean_dxhat = T::of(lane_sum(&dxhat) * inv);
        let mean_dxhat_xhat = T::of(lane_dot(&dxhat, &xhat) * inv);
        for i in 0..width {
            dx[i] = dx[i] + rs * (dxhat[i] - mean_dxhat - xhat[i] * mean_dxhat_xhat);
        }
    }
}

/// Softmax of `scale · row[..limit]` in place; the masked rest of the row becomes 0.
#[inline(always)]
pub(super) fn scaled_softmax_row<T: Scalar>(row: &mut [T], limit: usize, scale: T) {
    let (visible, masked) = row.split_at_mut(limit);
    let max = lane_max(visible) * scale;
    for s in visible.iter_mut() {
        *s = (*s * scale - max).exp_vectorizable();
    }
    let inv = T::of(1.0 / lane_sum(visible));
    visible.iter_mut().for_each(|s| *s = *s * inv);
    masked.iter_mut().for_each(|s| *s = T::zero());
}

/// dS = P ⊙ (dP − Σⱼ P·dP) · scale, row by row, in place over dP (`k_len` per row).
#[inline(always)]
pub(super) fn softmax_backward_rows<T: Scalar>(ds: &mut [T], probs: &[T], k_len: usize, scale: T) {
    for (dr, pr) in ds.chunks_mut(k_len).zip(probs.chunks(k_len)) {
        let dot = T::of(lane_dot(pr, dr));
        for (g, &p) in dr.iter_mut().zip(pr) {
            *g = p * (*g - dot) * scale;
        }
    }
}

/// One row of the label-smoothed cross-entropy: writes the row's share of the mean loss's
/// gradient into `grad` and returns the row's loss.
///
/// One exp per logit, in T (each term is in (0, 1], so its relative error stays at T's
/// epsilon); sums in f64. Keeps exp(x − max) in the gradient row and normalises after.
#[inline(always)]
pub(super) fn cross_entropy_row<T: Scalar>(
    grad: &mut [T],
    row: &[T],
    target: usize,
    smoothing: f64,
    inv_count: f64,
) -> f64 {
    let vocab = row.len();
    let max_t = lane_max(row);
    for (g, &x) in grad.iter_mut().zip(row) {
        *g = (x - max_t).exp_vectorizable();
    }
    let sum_exp = lane_sum(grad);
    let mean_logit = lane_sum(row) / vocab as f64;
    let lse = max_t.f64() + sum_exp.ln();
    let loss = lse - (1.0 - smoothing) * row[target].f64() - smoothing * mean_logit;
    let (inv_sum, off) = (1.0 / sum_exp, smoothing / vocab as f64);
    for g in grad.iter_mut() {
        *g = T::of((g.f64() * inv_sum - off) * inv_count);
    }
    grad[target] = T::of(grad[target].f64() - (1.0 - smoothing) * inv_count);
    loss
}

/// AdamW's per-element constants, in T.
#[derive(Clone, Copy)]
pub(super) struct AdamWStep<T> {
    pub beta1: T,
    pub beta2: T,
    pub lr: T,
    pub eps: T,
    /// 1 − lr·weight_decay.
    pub decay: T,
    pub grad_scale: T,
    /// Bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub c1: T,
    pub c2: T,
}

/// AdamW on one chunk of a tensor.
#[inline(always)]
pub(super) fn adamw<T: Scalar>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], s: AdamWStep<T>) {
    for i in 0..p.len() {
        let g = g[i] * s.grad_scale;
        m[i] = s.beta1 * m[i] + (T::one() - s.beta1) * g;
        v[i] = s.beta2 * v[i] + (T::one() - s.beta2) * g * g;
        let m_hat = m[i] / s.c1;
        let v_hat = v[i] / s.c2;
        // Decoupled decay first, then the Adam step (PyTorch's order).
        p[i] = p[i] * s.decay - s.lr * m_hat / (v_hat.sqrt() + s.eps);
    }
}
