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

/// `d *= gelu′(pre)` elementwise: an input gradient of GELU's output made one of its input.
#[inline(always)]
pub(super) fn times_gelu_slope<T: Scalar>(d: &mut [T], pre: &[T]) {
    for (d, &x) in d.iter_mut().zip(pre) {
        *d = *d * gelu_slope(x);
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
    // Each element computes its group's hash itself: a plain map the compiler vectorizes
    // (AVX-512's 64-bit multiplies), where reusing one hash for four elements made a loop it
    // did not — ~5× slower on an AVX-512 machine (a micro-benchmark, 0.4 against 2–4 ns an
    // element), as fast without AVX-512.
    for (i, v) in values.iter_mut().enumerate() {
        let index = (first + i) as u64;
        let kept = super::dropout_value(super::dropout_hash(base, index / 4), index) >= threshold;
        *v = if kept { *v * keep_scale } else { T::zero() };
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

#[cfg(test)]
mod tests {
    //! Every row kernel gives the same bits through the wide-vector dispatch as compiled for
    //! the baseline target (SSE2 vectors or scalar code): what makes CPU training bitwise
    //! reproducible across machines with and without AVX-512.

    use super::super::simd::vectorized;
    use super::*;

    /// Deterministic values in about [-4, 4), with a length that leaves a tail after the lanes.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = crate::rng::SplitMix64(seed);
        (0..len)
            .map(|_| (state.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn dispatched_row_kernels_match_the_baseline_build_bit_for_bit() {
        let n = 16 * 61 + 7;
        let (x, dy, gamma, beta) = (values(n, 1), values(n, 2), values(n, 3), values(n, 4));

        let (mut plain, mut wide) = (vec![0.0; n], vec![0.0; n]);
        gelu_forward(&mut plain, &x);
        vectorized(
            #[inline(always)]
            || gelu_forward(&mut wide, &x),
        );
        assert_eq!(bits(&plain), bits(&wide), "gelu_forward");

        gelu_backward(&mut plain, &dy, &x);
        vectorized(
            #[inline(always)]
            || gelu_backward(&mut wide, &dy, &x),
        );
        assert_eq!(bits(&plain), bits(&wide), "gelu_backward");

        let (mut plain, mut wide) = (x.clone(), x.clone());
        dropout(&mut plain, 4096, 0x1234_5678, u64::MAX / 10, 1.0 / 0.9);
        vectorized(
            #[inline(always)]
            || dropout(&mut wide, 4096, 0x1234_5678, u64::MAX / 10, 1.0 / 0.9),
        );
        assert_eq!(bits(&plain), bits(&wide), "dropout");

        let (mut plain, mut wide) = (vec![0.0; n], vec![0.0; n]);
        let stats = layernorm_row(&mut plain, &x, &gamma, &beta, 1e-5);
        let wide_stats = vectorized(
            #[inline(always)]
            || layernorm_row(&mut wide, &x, &gamma, &beta, 1e-5),
        );
        assert_eq!(bits(&plain), bits(&wide), "layernorm_row");
        assert_eq!(bits(&[stats.0, stats.1]), bits(&[wide_stats.0, wide_stats.1]));

        let (mean, rstd) = (vec![stats.0; 2], vec![stats.1; 2]);
        let rows_in = LayerNormRows {
            x: &x[..2 * 64],
            dy: &dy[..2 * 64],
            mean: &mean,
            rstd: &rstd,
            gamma: &gamma[..64],
        };
        let (mut plain, mut wide) = (dy[..2 * 64].to_vec(), dy[..2 * 64].to_vec());
        let (mut dg, mut db, mut dg_wide, mut db_wide) =
            (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
        layernorm_backward_rows(&mut plain, 0, &rows_in, &mut dg, &mut db);
        vectorized(
            #[inline(always)]
            || layernorm_backward_rows(&mut wide, 0, &rows_in, &mut dg_wide, &mut db_wide),
        );
        assert_eq!(bits(&plain), bits(&wide), "layernorm_backward_rows");
        assert_eq!((bits(&dg), bits(&db)), (bits(&dg_wide), bits(&db_wide)));

        let (mut plain, mut wide) = (x.clone(), x.clone());
        scaled_softmax_row(&mut plain, n - 40, 0.125);
        vectorized(
            #[inline(always)]
            || scaled_softmax_row(&mut wide, n - 40, 0.125),
        );
        assert_eq!(bits(&plain), bits(&wide), "scaled_softmax_row");

        let probs = plain.clone();
        let k_len = n / 7;
        let (mut plain, mut wide) = (dy.clone(), dy.clone());
        softmax_backward_rows(&mut plain[..7 * k_len], &probs[..7 * k_len], k_len, 0.125);
        vectorized(
            #[inline(always)]
            || softmax_backward_rows(&mut wide[..7 * k_len], &probs[..7 * k_len], k_len, 0.125),
        );
        assert_eq!(bits(&plain), bits(&wide), "softmax_backward_rows");

        let (mut plain, mut wide) = (vec![0.0; n], vec![0.0; n]);
        let loss = cross_entropy_row(&mut plain, &x, 17, 0.1, 1.0 / 3.0);
        let wide_loss = vectorized(
            #[inline(always)]
            || cross_entropy_row(&mut wide, &x, 17, 0.1, 1.0 / 3.0),
        );
        assert_eq!(bits(&plain), bits(&wide), "cross_entropy_row");
        assert_eq!(loss.to_bits(), wide_loss.to_bits());

        let step = AdamWStep {
            beta1: 0.9,
            beta2: 0.98,
            lr: 1e-3,
            eps: 1e-9,
            decay: 1.0 - 1e-5,
            grad_scale: 0.5,
            c1: 0.19,
            c2: 0.0396,
        };
        let (mut p, mut m, mut v) =
            (x.clone(), gamma.clone(), beta.iter().map(|b| b * b).collect::<Vec<_>>());
        let (mut p_wide, mut m_wide, mut v_wide) = (p.clone(), m.clone(), v.clone());
        adamw(&mut p, &dy, &mut m, &mut v, step);
        vectorized(
            #[inline(always)]
            || adamw(&mut p_wide, &dy, &mut m_wide, &mut v_wide, step),
        );
        assert_eq!(
            (bits(&p), bits(&m), bits(&v)),
            (bits(&p_wide), bits(&m_wide), bits(&v_wide)),
            "adamw"
        );

        let plain = lane_sum_squares(&x);
        let wide = vectorized(
            #[inline(always)]
            || lane_sum_squares(&x),
        );
        assert_eq!(plain.to_bits(), wide.to_bits(), "lane_sum_squares");
    }

    #[test]
    fn lane_reductions_agree_with_f64_sums() {
        let x = values(16 * 9 + 5, 9);
        let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
        assert!((lane_sum(&x) - exact).abs() < 1e-9);
        let squares: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((lane_sum_squares(&x) - squares).abs() < 1e-9);
        let dot: f64 =
            x.iter().zip(x.iter().rev()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
        let reversed: Vec<f32> = x.iter().rev().copied().collect();
        assert!((lane_dot(&x, &reversed) - dot).abs() < 1e-9);
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        assert_eq!(lane_max(&x), max);
        assert_eq!(lane_max::<f32>(&[]), f32::NEG_INFINITY);
    }
}
