//! The `Backend` trait: every numeric operation the model performs, with explicit forward and
//! backward passes and explicit shapes. The model is written once against it; the CPU backend
//! is the reference, the CUDA backend (feature "cuda") must agree with it.
//!
//! Dimension legend, used in every shape comment: N rows (batch × time), B batch, Tq / Tk query
//! and key time, H heads, Dh head size, D model width (H × Dh), F feed-forward width,
//! V vocabulary. Matrices are row-major; a linear layer's weight is `[out, in]`.
//!
//! Gradient convention (as llm.c): parameter gradients are **accumulated** (`+=`), so tied
//! weights and repeated use just work; an input gradient is overwritten unless the op says
//! otherwise.

/// Key for the counter-based dropout RNG: the mask of element `i` is a pure function of
/// `(seed, step, site, i)`, so it is identical in forward and backward and independent of
/// threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step.
    pub step: u64,
    /// Which dropout site in the network (layer and position within it).
    pub site: u64,
}

/// The layout of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch rows.
    pub batch: usize,
    /// Query rows per batch row in `q`/`out`.
    pub q_len: usize,
    /// Key rows per batch row in `k`/`v` (their stride; valid keys are given per batch row).
    pub k_len: usize,
    /// Heads.
    pub heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Mask key j for query i when j > q_offset + i (decoder self-attention).
    pub causal: bool,
    /// Position of query row 0 (non-zero when decoding incrementally with a KV cache).
    pub q_offset: usize,
}

impl AttentionShape {
    /// Model width D = heads × head_dim.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Settings of one AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (0 for norms and biases).
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u64,
    /// Multiplies each gradient before use (loss-scale removal and clipping folded into the
    /// update, sparing a pass over every gradient): 1 for none.
    pub grad_scale: f32,
}

/// What a buffer holds, for backends that store kinds differently (the GPU backend keeps
/// activations in fp16, gradients, statistics and optimizer state in fp32, and parameters as
/// fp32 masters with an fp16 copy). The CPU backend stores every kind alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufRole {
    /// Activations and their gradients.
    Activation,
    /// Trainable weights.
    Parameter,
    /// Parameter gradients (accumulated).
    Gradient,
    /// Optimizer moments.
    OptimizerState,
    /// Saved per-row statistics: LayerNorm mean and rstd, attention's saved softmax data.
    Statistics,
}

/// One linear layer's part in [`Backend::linear_backward_shared_input`]: its output gradient,
/// weight, and the gradients it adds to.
pub struct LinearGrads<'a, Buf> {
    /// `dw += dyᵀ · x`, `[out, in]`.
    pub dw: &'a mut Buf,
    /// `db += Σ_rows dy`, `[out]`, where the layer has a bias.
    pub db: Option<&'a mut Buf>,
    /// The layer's output gradient `[rows, out]`.
    pub dy: &'a Buf,
    /// The layer's weight `[out, in]`.
    pub w: &'a Buf,
}

/// A device that can run the model.
pub trait Backend: Send + Sync {
    /// A buffer of numbers on the device.
    type Buf: Send + Sync;

    /// A short name for messages (`cpu-f32`, `cuda:0`, …).
    fn name(&self) -> String;

    // --- memory -------------------------------------------------------------------------

    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// A buffer of `len` elements for an op that writes every one of them before anything
    /// reads it (an output, never an accumulator). Default: [`Backend::zeros`]; a GPU skips
    /// the fill (its emulated device poisons fresh memory with NaN, so a read before the
    /// write fails the tests).
    fn for_overwrite(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    /// A copy of `x` in a new buffer (default: [`Backend::for_overwrite`], then
    /// [`Backend::copy`]).
    fn duplicate(&self, x: &Self::Buf) -> Self::Buf {
        let mut y = self.for_overwrite(self.len(x));
        self.copy(&mut y, x);
        y
    }
    /// Uploads host values.
    fn upload_f32(&self, data: &[f32]) -> Self::Buf;
    /// Uploads host values at full precision (for gradient checks).
    fn upload_f64(&self, data: &[f64]) -> Self::Buf;
    /// A zero-filled buffer of `len` elements holding `role` (default: [`Backend::zeros`]).
    fn zeros_as(&self, len: usize, _role: BufRole) -> Self::Buf {
        self.zeros(len)
    }
    /// Uploads values holding `role` (default: [`Backend::upload_f32`]).
    fn upload_f32_as(&self, data: &[f32], _role: BufRole) -> Self::Buf {
        self.upload_f32(data)
    }
    /// Uploads values holding `role` at full precision (default: [`Backend::upload_f64`]).
    fn upload_f64_as(&self, data: &[f64], _role: BufRole) -> Self::Buf {
        self.upload_f64(data)
    }
    /// Downloads to the host.
    fn to_f32(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Downloads to the host at full precision.
    fn to_f64(&self, buf: &Self::Buf) -> Vec<f64>;
    /// Elements in a buffer.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Where an fp32 buffer lives on a device — (address, elements) — so a device collective
    /// (NCCL) can sum it in place; None for host backends and for other kinds of buffer.
    fn device_f32(&self, _buf: &Self::Buf) -> Option<(u64, usize)> {
        None
    }
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// `dst[..] = src[..]` (same length).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// Copies `rows` rows of width `width` from `src` (starting at row `src_row`) into `dst`
    /// (starting at row `dst_row`).
    fn copy_rows(
        &self,
        dst: &mut Self::Buf,
        dst_row: usize,
        src: &Self::Buf,
        src_row: usize,
        rows: usize,
        width: usize,
    );

    // --- elementwise ----------------------------------------------------------------------

    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf);
    /// `buf *= factor`.
    fn scale(&self, buf: &mut Self::Buf, factor: f32);
    /// Sum of squares, accumulated in f64 in a fixed order.
    fn sum_squares(&self, buf: &Self::Buf) -> f64;
    /// Σ over every buffer of its sum of squares, in buffer order (default: one
    /// [`Backend::sum_squares`] each; a GPU reads back one number instead of one per buffer).
    fn sum_squares_all(&self, bufs: &[&Self::Buf]) -> f64 {
        bufs.iter().map(|b| self.sum_squares(b)).sum()
    }
    /// True when every element is finite.
    fn all_finite(&self, buf: &Self::Buf) -> bool;

    // --- layers ---------------------------------------------------------------------------

    /// `out[n] = table[ids[n]] · scale + positions[pos[n]]` — out `[N, D]`, table `[V, D]`,
    /// positions `[max_len, D]`.
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        positions: &Self::Buf,
        ids: &[u32],
        pos: &[usize],
        width: usize,
        scale: f32,
    );
    /// `d_table[ids[n]] += d_out[n] · scale` — the position table is fixed (sinusoidal).
    fn embedding_backward(
        &self,
        d_table: &mut Self::Buf,
        d_out: &Self::Buf,
        ids: &[u32],
        width: usize,
        scale: f32,
    );

    /// `y = x · wᵀ + b` — y `[N, O]`, x `[N, I]`, w `[O, I]`, b `[O]`.
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    );
    /// [`Backend::linear_forward`] into a new buffer `[rows, out_dim]` (default: from
    /// [`Backend::for_overwrite`]).
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Self::Buf {
        let mut y = self.for_overwrite(rows * out_dim);
        self.linear_forward(&mut y, x, w, b, rows, in_dim, out_dim);
        y
    }
    /// `dx (= or +=) dy · w`, `dw += dyᵀ · x`, `db += Σ_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: Option<&mut Self::Buf>,
        accumulate_dx: bool,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    );

    /// The backward of linear layers of one shape that read the same input `x` (attention's
    /// query, key and value projections): layer by layer in the order given,
    /// [`Backend::linear_backward`] — `dx` from the first (`=` or `+=` as `accumulate_dx` says),
    /// the later layers adding to it. A backend may queue the layers' weight-gradient
    /// products as one batch; each gradient is the same as the layer's own backward gives,
    /// up to the order of its sum.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_shared_input(
        &self,
        dx: Option<&mut Self::Buf>,
        accumulate_dx: bool,
        layers: &mut [LinearGrads<'_, Self::Buf>],
        x: &Self::Buf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        linear_backward_each(self, dx, accumulate_dx, layers, x, rows, in_dim, out_dim);
    }

    /// LayerNorm over rows of width D (eps 1e-5); saves `mean` and `rstd` `[N]` for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        width: usize,
    );
    /// `dx += …`, `dgamma += …`, `dbeta += …`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        width: usize,
    );

    /// `pre = x · wᵀ + b` and `act = gelu(pre)`: a linear layer and its GELU (the
    /// feed-forward block's first half). A GPU fuses the GELU into the product's store.
    #[allow(clippy::too_many_arguments)]
    fn linear_gelu_forward(
        &self,
        act: &mut Self::Buf,
        pre: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        linear_then_gelu(self, act, pre, x, w, b, rows, in_dim, out_dim);
    }
    /// The backward of `y = gelu(pre) · wᵀ + b` down to `pre`: `d_pre = (dy · w) ·
    /// gelu'(pre)` (overwritten), `dw += dyᵀ · gelu(pre)` (`act` = gelu(pre), as the forward
    /// made it), `db += Σ_rows dy`. A GPU fuses gelu' into the product that makes `d_pre`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_through_gelu(
        &self,
        d_pre: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        act: &Self::Buf,
        pre: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        linear_backward_then_gelu(self, d_pre, dw, db, dy, act, pre, w, rows, in_dim, out_dim);
    }

    /// GELU, tanh approximation: `y = gelu(x)`.
    fn gelu_forward(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// `dx = dy · gelu'(x)`.
    fn gelu_backward(&self, dx: &mut Self::Buf, dy: &Self::Buf, x: &Self::Buf);
    /// `y = max(x, 0)`.
    fn relu_forward(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// `dx = dy · [x > 0]`.
    fn relu_backward(&self, dx: &mut Self::Buf, dy: &Self::Buf, x: &Self::Buf);

    /// Inverted dropout in place: zero with probability `p` (rounded to a multiple of 2^-16),
    /// scale survivors by one over the keep rate (`1 / (1 − p)` for that rounded p). Applying
    /// it to the gradient with the same key is the backward pass.
    fn dropout(&self, buf: &mut Self::Buf, p: f32, key: DropoutKey);
    /// `x = residual + dropout(x)` in place: the residual add after a sublayer, written over
    /// the sublayer's output so the block input stays as it was (backward needs it).
    /// Default: [`Backend::dropout`], then [`Backend::add_assign`]; a GPU does both in one
    /// pass, with the same result.
    fn add_dropped(&self, x: &mut Self::Buf, residual: &Self::Buf, p: f32, key: DropoutKey) {
        self.dropout(x, p, key);
        self.add_assign(x, residual);
    }
    /// `dropout(x)` in a new buffer (a sublayer's output gradient). Default:
    /// [`Backend::duplicate`], then [`Backend::dropout`]; a GPU writes it in one pass.
    fn dropped_copy(&self, x: &Self::Buf, p: f32, key: DropoutKey) -> Self::Buf {
        let mut y = self.duplicate(x);
        self.dropout(&mut y, p, key);
        y
    }

    /// `x = residual + dropout(x)` (`p` 0: `x += residual`), then the LayerNorm of that sum
    /// into `y`, `mean`, `rstd`: the residual stream between pre-norm blocks, the next block's
    /// norm read from the sum just written. Default: [`Backend::add_dropped`] (or
    /// [`Backend::add_assign`]), then [`Backend::layernorm_forward`]; a GPU does both in one
    /// pass, with the same result.
    #[allow(clippy::too_many_arguments)]
    fn add_dropped_layernorm_forward(
        &self,
        x: &mut Self::Buf,
        residual: &Self::Buf,
        p: f32,
        key: DropoutKey,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        width: usize,
    ) {
        if p > 0.0 {
            self.add_dropped(x, residual, p, key);
        } else {
            self.add_assign(x, residual);
        }
        self.layernorm_forward(y, mean, rstd, x, gamma, beta, rows, width);
    }
    /// [`Backend::layernorm_backward`], then `dropout(dx)` in a new buffer (`p` 0: a copy of
    /// dx): the residual stream's gradient and the earlier block's sublayer-output gradient.
    /// Default: the two calls ([`Backend::dropped_copy`] or [`Backend::duplicate`]); a GPU
    /// does both in one pass, with the same result.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_dropped(
        &self,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        width: usize,
        p: f32,
        key: DropoutKey,
    ) -> Self::Buf {
        self.layernorm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma, rows, width);
        if p > 0.0 {
            self.dropped_copy(dx, p, key)
        } else {
            self.duplicate(dx)
        }
    }

    /// Multi-head scaled-dot-product attention with masks from lengths: q `[B·Tq, D]`,
    /// k and v `[B·Tk, D]`, out `[B·Tq, D]`; saves softmax probabilities `probs`
    /// `[B, H, Tq, Tk]` for backward. Key j of batch row b is visible when `j < key_len[b]`
    /// (and, if causal, `j ≤ q_offset + i`).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_len: &[usize],
        shape: AttentionShape,
    );
    /// (bytes in use, bytes in all) of the device's memory, where the backend has a device
    /// that can tell (a GPU: after a step, that step's peak is still held by its allocator).
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// True for a backend whose gradients need dynamic loss scaling (fp16 activations).
    fn uses_loss_scaling(&self) -> bool {
        false
    }
    /// Sets the factor the loss gradient is multiplied by (a no-op where there is none).
    fn set_loss_scale(&self, _scale: f32) {}

    /// The `probs` buffer attention's forward fills for its backward (default: the whole
    /// softmax, `[B, H, Tq, Tk]`, zero-filled; a GPU keeps one log-sum-exp per query row, and
    /// on its cuBLASLt path P too, unfilled: the forward writes every element the backward
    /// reads).
    fn attention_stats(&self, shape: AttentionShape) -> Self::Buf {
        let len = shape.batch * shape.heads * shape.q_len * shape.k_len;
        self.zeros_as(len, BufRole::Statistics)
    }

    /// Writes `dq`, `dk`, `dv` (overwritten). `out` (the forward's output) and `key_len` are
    /// what a backend that recomputes the softmax from saved statistics needs; one that saved
    /// the whole softmax in `probs` (the CPU) ignores them.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        d_out: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        probs: &Self::Buf,
        key_len: &[usize],
        shape: AttentionShape,
    );

    /// Softmax cross-entropy with label smoothing `ε` over logits `[N, V]`, ignoring rows whose
    /// target is `ignore`: returns the mean loss over counted rows (PyTorch's definition:
    /// `(1 − ε)·nll + ε·mean_c(−log p_c)`) and writes its gradient into `d_logits`
    /// (already divided by the count). Returns `(loss, counted rows)`.
    fn cross_entropy(
        &self,
        d_logits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[u32],
        vocab: usize,
        ignore: u32,
        smoothing: f64,
    ) -> (f64, usize);

    /// One AdamW update of `param` with `grad`, moments `m` and `v`.
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        settings: AdamW,
    );
    /// AdamW on every parameter, `settings[i]` for tensor `i` (default: one
    /// [`Backend::adamw`] each; a GPU updates them all in one launch). Same result either way.
    fn adamw_all(
        &self,
        params: &mut [Self::Buf],
        grads: &[Self::Buf],
        m: &mut [Self::Buf],
        v: &mut [Self::Buf],
        settings: &[AdamW],
    ) {
        for (i, param) in params.iter_mut().enumerate() {
            self.adamw(param, &grads[i], &mut m[i], &mut v[i], settings[i]);
        }
    }
}

/// [`Backend::linear_gelu_forward`] as two plain ops: its default, and the fallback of a
/// backend that fuses where it can.
#[allow(clippy::too_many_arguments)]
pub fn linear_then_gelu<B: Backend + ?Sized>(
    backend: &B,
    act: &mut B::Buf,
    pre: &mut B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    b: Option<&B::Buf>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    backend.linear_forward(pre, x, w, b, rows, in_dim, out_dim);
    backend.gelu_forward(act, pre);
}

/// [`Backend::linear_backward_through_gelu`] as plain ops (see [`linear_then_gelu`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_then_gelu<B: Backend + ?Sized>(
    backend: &B,
    d_pre: &mut B::Buf,
    dw: &mut B::Buf,
    db: Option<&mut B::Buf>,
    dy: &B::Buf,
    act: &B::Buf,
    pre: &B::Buf,
    w: &B::Buf,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    let mut d_act = backend.zeros(rows * in_dim);
    backend.linear_backward(Some(&mut d_act), false, dw, db, dy, act, w, rows, in_dim, out_dim);
    backend.gelu_backward(d_pre, &d_act, pre);
}

/// [`Backend::linear_backward_shared_input`] as one [`Backend::linear_backward`] a layer: its
/// default, and the fallback of a backend that batches where it can.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_each<B: Backend + ?Sized>(
    backend: &B,
    mut dx: Option<&mut B::Buf>,
    accumulate_dx: bool,
    layers: &mut [LinearGrads<'_, B::Buf>],
    x: &B::Buf,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    for (i, layer) in layers.iter_mut().enumerate() {
        backend.linear_backward(
            dx.as_deref_mut(),
            accumulate_dx || i > 0,
            layer.dw,
            layer.db.as_deref_mut(),
            layer.dy,
            x,
            layer.w,
            rows,
            in_dim,
            out_dim,
        );
    }
}
