//! The encoder-decoder transformer over any [`Backend`]: explicit forward and backward passes,
//! no autograd. One code path for every device; the model never asks which backend it runs on.
//!
//! Shapes (legend in `chingu_kernels::backend`): encoder rows Ns = B·S, decoder rows
//! Nt = B·T; every sequence is padded to its side's batch length and real lengths travel
//! alongside, so masks are computed from lengths, never stored.

use chingu_kernels::{AttentionShape, Backend, BufRole, DropoutKey, LinearGrads};

use crate::config::{Activation, Config, NormPlacement};
use crate::params::{initial_values, AttnIdx, FfnIdx, Layout, LinearIdx, NormIdx};
use crate::{ModelError, Result};

/// A padded batch of (question, answer) pairs, as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// B.
    pub batch: usize,
    /// S: padded source length.
    pub src_len: usize,
    /// T: padded target length.
    pub tgt_len: usize,
    /// Source ids `[B, S]`, padded with the pad id.
    pub src: Vec<u32>,
    /// Real source lengths `[B]`, each ≥ 1.
    pub src_lengths: Vec<usize>,
    /// Decoder input `[B, T]`: `<s>` then the answer.
    pub tgt_in: Vec<u32>,
    /// Decoder targets `[B, T]`: the answer then `</s>`, pad beyond the length.
    pub tgt_out: Vec<u32>,
    /// Real target lengths `[B]`, each ≥ 1.
    pub tgt_lengths: Vec<usize>,
}

impl Batch {
    /// Checks the batch is consistent with itself and with `config`.
    pub fn validate(&self, config: &Config) -> Result<()> {
        let fail = |m: String| Err(ModelError::Batch(m));
        if self.src.len() != self.batch * self.src_len
            || self.tgt_in.len() != self.batch * self.tgt_len
            || self.tgt_out.len() != self.tgt_in.len()
        {
            return fail("token arrays do not match batch × length".into());
        }
        if self.src_lengths.len() != self.batch || self.tgt_lengths.len() != self.batch {
            return fail("one length per batch row is needed".into());
        }
        if self.src_lengths.iter().chain(&self.tgt_lengths).any(|&l| l == 0) {
            return fail("every sequence needs at least one token".into());
        }
        if self.src_lengths.iter().any(|&l| l > self.src_len)
            || self.tgt_lengths.iter().any(|&l| l > self.tgt_len)
        {
            return fail("a length exceeds the padded length".into());
        }
        for (side, len) in [("source", self.src_len), ("target", self.tgt_len)] {
            if len > config.max_len {
                return fail(format!(
                    "{side} length {len} exceeds the model's max_len {}",
                    config.max_len
                ));
            }
        }
        if let Some(&bad) = self
            .src
            .iter()
            .chain(&self.tgt_in)
            .chain(&self.tgt_out)
            .find(|&&t| t as usize >= config.vocab)
        {
            return fail(format!("token id {bad} is outside the model's vocabulary of {} (tokenizer and model disagree)", config.vocab));
        }
        Ok(())
    }
}

/// Loss of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossStats {
    /// Mean loss per counted target token.
    pub loss: f64,
    /// Target tokens counted (not padding).
    pub tokens: usize,
}

/// Called after each backward stage: (stage index, backend, every gradient).
pub type StageHook<'a, B> = dyn FnMut(usize, &B, &mut [<B as Backend>::Buf]) + 'a;

/// Sinusoidal positions `[max_len, D]`: `PE[p, 2i] = sin(p / 10000^(2i/D))`, `PE[p, 2i+1] = cos(…)`.
pub fn sinusoidal_positions(max_len: usize, d: usize) -> Vec<f64> {
    let mut pe = vec![0.0; max_len * d];
    for p in 0..max_len {
        for i in (0..d).step_by(2) {
            let angle = p as f64 / 10000f64.powf(i as f64 / d as f64);
            pe[p * d + i] = angle.sin();
            if i + 1 < d {
                pe[p * d + i + 1] = angle.cos();
            }
        }
    }
    pe
}

/// The model: configuration, parameters and their gradients on a backend.
pub struct Model<B: Backend> {
    /// The backend everything runs on.
    pub backend: B,
    /// The configuration.
    pub config: Config,
    /// Parameter names, shapes and roles.
    pub layout: Layout,
    /// Parameter values, in layout order.
    pub params: Vec<B::Buf>,
    /// Gradients, accumulated by [`Model::forward_backward`]; same order.
    pub grads: Vec<B::Buf>,
    pub(crate) positions: B::Buf,
}

/// What a dropout call needs to know: whether training, and the key parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutCtx {
    pub(crate) p: f32,
    pub(crate) seed: u64,
    pub(crate) step: u64,
}

impl DropoutCtx {
    fn key(&self, site: u64) -> DropoutKey {
        DropoutKey { seed: self.seed, step: self.step, site }
    }

    fn apply<B: Backend>(&self, backend: &B, buf: &mut B::Buf, site: u64) {
        if self.p > 0.0 {
            backend.dropout(buf, self.p, self.key(site));
        }
    }

    /// `x = residual + dropout(x)`.
    fn add_dropped<B: Backend>(&self, backend: &B, x: &mut B::Buf, residual: &B::Buf, site: u64) {
        if self.p > 0.0 {
            backend.add_dropped(x, residual, self.p, self.key(site));
        } else {
            backend.add_assign(x, residual);
        }
    }

    /// `dropout(x)` in a new buffer.
    fn dropped_copy<B: Backend>(&self, backend: &B, x: &B::Buf, site: u64) -> B::Buf {
        if self.p > 0.0 {
            backend.dropped_copy(x, self.p, self.key(site))
        } else {
            backend.duplicate(x)
        }
    }
}

pub(crate) struct NormActs<B: Backend> {
    /// The LayerNorm input (x for pre-norm, x + s for post-norm).
    input: B::Buf,
    pub(crate) y: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    /// Which LayerNorm's parameters made `y`.
    idx: NormIdx,
}

/// A pre-norm block's output on its way into the next LayerNorm. The block normalises it as
/// it writes it (`Backend::add_dropped_layernorm_forward`: one pass on a GPU) where it knows
/// that norm, so the next block, or the stack's final norm, takes it normalised.
enum Residual<B: Backend> {
    Raw(B::Buf),
    Normed(NormActs<B>),
}

/// The residual stream's gradient and, pre-norm, the dropout of it that the block it goes to
/// next needs for its sublayer (that block's site, the values): made in the same pass as the
/// LayerNorm backward that wrote the stream (`Backend::layernorm_backward_dropped`).
struct ResidualGrad<B: Backend> {
    d: B::Buf,
    dropped: Option<(u64, B::Buf)>,
}

impl<B: Backend> ResidualGrad<B> {
    fn plain(d: B::Buf) -> Self {
        Self { d, dropped: None }
    }
}

impl<B: Backend> Residual<B> {
    /// The stream itself (what a post-norm block, or a stack without a final norm, reads).
    fn into_raw(self) -> B::Buf {
        match self {
            Residual::Raw(x) => x,
            Residual::Normed(acts) => acts.input,
        }
    }
}

/// A sublayer's saved activations; its input is the block's (see [`BlockActs::sub_input`]).
struct AttnActs<B: Backend> {
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    probs: B::Buf,
    ctx: B::Buf,
    shape: AttentionShape,
    /// Visible keys per batch row (a backend that recomputes the softmax needs them).
    key_len: Vec<usize>,
}

struct FfnActs<B: Backend> {
    pre_act: B::Buf,
    act: B::Buf,
}

enum SubActs<B: Backend> {
    Attn(AttnActs<B>),
    Ffn(FfnActs<B>),
}

pub(crate) struct BlockActs<B: Backend> {
    norm: NormActs<B>,
    sub: SubActs<B>,
    site: u64,
    /// Post-norm: the block input, which the sublayer read (pre-norm's read `norm.y`).
    post_norm_input: Option<B::Buf>,
}

impl<B: Backend> BlockActs<B> {
    /// What the sublayer read: saved once, not copied into the sublayer's activations.
    fn sub_input(&self) -> &B::Buf {
        self.post_norm_input.as_ref().unwrap_or(&self.norm.y)
    }
}

/// What a residual block computes.
#[derive(Clone, Copy)]
enum Sublayer {
    SelfAttn { idx: AttnIdx, causal: bool },
    CrossAttn { idx: AttnIdx },
    Ffn { idx: FfnIdx },
}

/// A sequence side's rows and lengths, for attention.
#[derive(Clone, Copy)]
pub(crate) struct Side<'a> {
    pub(crate) batch: usize,
    pub(crate) len: usize,
    pub(crate) lengths: &'a [usize],
}

/// Everything the backward pass needs from the forward pass.
struct Activations<B: Backend> {
    enc_blocks: Vec<BlockActs<B>>,
    enc_final: Option<NormActs<B>>,
    memory: B::Buf,
    dec_blocks: Vec<BlockActs<B>>,
    dec_final: Option<NormActs<B>>,
    y: B::Buf,
    /// Kept for evaluation; released before backward.
    logits: B::Buf,
    d_logits: B::Buf,
}

/// Two distinct mutable elements of a slice.
fn pair_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

/// Mutable references to `v[i]` for each of `indices`, in their order (each distinct).
fn disjoint_mut<'a, T>(v: &'a mut [T], indices: &[usize]) -> Vec<&'a mut T> {
    let mut slots: Vec<Option<&'a mut T>> = indices.iter().map(|_| None).collect();
    for (i, item) in v.iter_mut().enumerate() {
        let mut wanted = indices.iter().enumerate().filter(|&(_, &j)| j == i).map(|(k, _)| k);
        if let Some(k) = wanted.next() {
            assert!(wanted.next().is_none(), "index {i} asked for twice");
            slots[k] = Some(item);
        }
    }
    let found = slots.into_iter().zip(indices);
    found.map(|(slot, i)| slot.unwrap_or_else(|| panic!("index {i} out of range"))).collect()
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (deterministic in `seed`).
    pub fn new(backend: B, config: Config, seed: u64) -> Result<Self> {
        config.validate()?;
        let layout = Layout::new(&config);
        let params = layout
            .specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let values: Vec<f64> =
                    initial_values(spec, seed, i).into_iter().map(f64::from).collect();
                backend.upload_f64_as(&values, BufRole::Parameter)
            })
            .collect();
        Ok(Self::assemble(backend, config, layout, params))
    }

    /// A model from given parameter values (checkpoints, golden tests), checked against the
    /// layout's shapes.
    pub fn from_values(backend: B, config: Config, values: Vec<Vec<f64>>) -> Result<Self> {
        config.validate()?;
        let layout = Layout::new(&config);
        if values.len() != layout.specs.len() {
            return Err(ModelError::Config(format!(
                "{} tensors given, the layout has {}",
                values.len(),
                layout.specs.len()
            )));
        }
        for (spec, v) in layout.specs.iter().zip(&values) {
            if v.len() != spec.numel() {
                return Err(ModelError::Config(format!(
                    "{}: {} values, shape {:?} needs {}",
                    spec.name,
                    v.len(),
                    spec.shape,
                    spec.numel()
                )));
            }
        }
        let params = values.iter().map(|v| backend.upload_f64_as(v, BufRole::Parameter)).collect();
        Ok(Self::assemble(backend, config, layout, params))
    }

    fn assemble(backend: B, config: Config, layout: Layout, params: Vec<B::Buf>) -> Self {
        let grads =
            layout.specs.iter().map(|s| backend.zeros_as(s.numel(), BufRole::Gradient)).collect();
        let positions = backend.upload_f64(&sinusoidal_positions(config.max_len, config.d_model));
        Model { backend, config, layout, params, grads, positions }
    }

    /// Total parameters.
    pub fn parameter_count(&self) -> usize {
        self.layout.parameter_count()
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) {
        for g in &mut self.grads {
            self.backend.fill_zero(g);
        }
    }

    pub(crate) fn output_weight(&self) -> usize {
        self.layout.lm_head.unwrap_or(self.layout.embed)
    }

    // --- forward pieces ------------------------------------------------------------------

    /// The position table in use: learned parameters or the fixed sinusoidal table.
    pub(crate) fn position_table(&self) -> &B::Buf {
        match self.layout.positions {
            Some(index) => &self.params[index],
            None => &self.positions,
        }
    }

    pub(crate) fn embed(&self, ids: &[u32], seq_len: usize, drop: DropoutCtx, site: u64) -> B::Buf {
        let d = self.config.d_model;
        let pos: Vec<usize> = (0..ids.len()).map(|n| n % seq_len).collect();
        let mut x = self.backend.for_overwrite(ids.len() * d);
        self.backend.embedding_forward(
            &mut x,
            &self.params[self.layout.embed],
            self.position_table(),
            ids,
            &pos,
            d,
            (d as f32).sqrt(),
        );
        drop.apply(&self.backend, &mut x, site);
        x
    }

    pub(crate) fn linear(
        &self,
        x: &B::Buf,
        idx: LinearIdx,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> B::Buf {
        let (w, b) = (&self.params[idx.w], &self.params[idx.b]);
        self.backend.linear(x, w, Some(b), rows, in_dim, out_dim)
    }

    pub(crate) fn norm(&self, x: B::Buf, idx: NormIdx, rows: usize) -> NormActs<B> {
        let d = self.config.d_model;
        let stats = || self.backend.zeros_as(rows, BufRole::Statistics);
        let (mut y, mut mean, mut rstd) = (self.backend.for_overwrite(rows * d), stats(), stats());
        self.backend.layernorm_forward(
            &mut y,
            &mut mean,
            &mut rstd,
            &x,
            &self.params[idx.gamma],
            &self.params[idx.beta],
            rows,
            d,
        );
        NormActs { input: x, y, mean, rstd, idx }
    }

    /// `idx` where blocks are pre-norm (their output goes into that LayerNorm next), else none.
    fn pre_norm(&self, idx: NormIdx) -> Option<NormIdx> {
        (self.config.norm == NormPlacement::Pre).then_some(idx)
    }

    /// LayerNorm `idx` of the residual stream `x`: computed here, or already by the block that
    /// wrote it.
    fn normed(&self, x: Residual<B>, idx: NormIdx, rows: usize) -> NormActs<B> {
        match x {
            Residual::Raw(x) => self.norm(x, idx, rows),
            Residual::Normed(acts) => {
                assert_eq!(acts.idx, idx, "the residual stream was normalised for another block");
                acts
            }
        }
    }

    /// `out = residual + dropout(out)`, then LayerNorm `idx` of it (the next block's).
    fn add_dropped_norm(
        &self,
        mut out: B::Buf,
        residual: &B::Buf,
        idx: NormIdx,
        drop: DropoutCtx,
        site: u64,
        rows: usize,
    ) -> NormActs<B> {
        let d = self.config.d_model;
        let stats = || self.backend.zeros_as(rows, BufRole::Statistics);
        let (mut y, mut mean, mut rstd) = (self.backend.for_overwrite(rows * d), stats(), stats());
        self.backend.add_dropped_layernorm_forward(
            &mut out,
            residual,
            drop.p,
            drop.key(site),
            &mut y,
            &mut mean,
            &mut rstd,
            &self.params[idx.gamma],
            &self.params[idx.beta],
            rows,
            d,
        );
        NormActs { input: out, y, mean, rstd, idx }
    }

    fn attention(
        &self,
        input: &B::Buf,
        kv_source: Option<&B::Buf>,
        idx: AttnIdx,
        query: Side<'_>,
        keys: Side<'_>,
        causal: bool,
    ) -> (B::Buf, AttnActs<B>) {
        let d = self.config.d_model;
        let (nq, nk) = (query.batch * query.len, keys.batch * keys.len);
        let kv = kv_source.unwrap_or(input);
        let q = self.linear(input, idx.q, nq, d, d);
        let k = self.linear(kv, idx.k, nk, d, d);
        let v = self.linear(kv, idx.v, nk, d, d);
        let shape = AttentionShape {
            batch: query.batch,
            q_len: query.len,
            k_len: keys.len,
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
            causal,
            q_offset: 0,
        };
        let mut ctx = self.backend.for_overwrite(nq * d);
        let mut probs = self.backend.attention_stats(shape);
        self.backend.attention_forward(&mut ctx, &mut probs, &q, &k, &v, keys.lengths, shape);
        let s = self.linear(&ctx, idx.o, nq, d, d);
        let key_len = keys.lengths.to_vec();
        (s, AttnActs { q, k, v, probs, ctx, shape, key_len })
    }

    fn ffn(&self, input: &B::Buf, idx: FfnIdx, rows: usize) -> (B::Buf, FfnActs<B>) {
        let (d, f) = (self.config.d_model, self.config.d_ff);
        let (pre_act, act) = self.ffn_activation(input, idx, rows);
        let s = self.linear(&act, idx.fc2, rows, f, d);
        (s, FfnActs { pre_act, act })
    }

    /// The feed-forward block's first linear and its activation: (pre-activation,
    /// activation), `[rows, d_ff]` each. Training and cached decoding both go through here,
    /// so they compute the same (a GPU fuses GELU into the product).
    pub(crate) fn ffn_activation(
        &self,
        input: &B::Buf,
        idx: FfnIdx,
        rows: usize,
    ) -> (B::Buf, B::Buf) {
        let (d, f) = (self.config.d_model, self.config.d_ff);
        let mut act = self.backend.for_overwrite(rows * f);
        let pre_act = match self.config.activation {
            Activation::Gelu => {
                let mut pre_act = self.backend.for_overwrite(rows * f);
                let (w, b) = (&self.params[idx.fc1.w], &self.params[idx.fc1.b]);
                self.backend.linear_gelu_forward(
                    &mut act,
                    &mut pre_act,
                    input,
                    w,
                    Some(b),
                    rows,
                    d,
                    f,
                );
                pre_act
            }
            Activation::Relu => {
                let pre_act = self.linear(input, idx.fc1, rows, d, f);
                self.backend.relu_forward(&mut act, &pre_act);
                pre_act
            }
        };
        (pre_act, act)
    }

    pub(crate) fn backend_clone(&self, x: &B::Buf) -> B::Buf {
        self.backend.duplicate(x)
    }

    /// One residual block on the stream `x`: pre-norm `x + F(LN(x))` or post-norm
    /// `LN(x + F(x))`. Pre-norm, `next_norm` is the LayerNorm that reads the block's output (the
    /// next block's, or the stack's final one), applied as the output is written.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        x: Residual<B>,
        norm: NormIdx,
        sub: Sublayer,
        side: Side<'_>,
        memory: Option<(&B::Buf, Side<'_>)>,
        drop: DropoutCtx,
        site: u64,
        next_norm: Option<NormIdx>,
    ) -> (Residual<B>, BlockActs<B>) {
        let rows = side.batch * side.len;
        let run = |input: &B::Buf| -> (B::Buf, SubActs<B>) {
            match sub {
                Sublayer::SelfAttn { idx, causal } => {
                    let (s, a) = self.attention(input, None, idx, side, side, causal);
                    (s, SubActs::Attn(a))
                }
                Sublayer::CrossAttn { idx } => {
                    let (mem, mem_side) = memory.expect("cross-attention needs the encoder output");
                    let (s, a) = self.attention(input, Some(mem), idx, side, mem_side, false);
                    (s, SubActs::Attn(a))
                }
                Sublayer::Ffn { idx } => {
                    let (s, a) = self.ffn(input, idx, rows);
                    (s, SubActs::Ffn(a))
                }
            }
        };
        match self.config.norm {
            // The residual sum is written over the sublayer's output `s`, so the block input
            // is saved as it is (the LayerNorm's input, or post-norm's sublayer input), never
            // copied.
            NormPlacement::Pre => {
                let norm_acts = self.normed(x, norm, rows);
                let (mut out, sub_acts) = run(&norm_acts.y);
                let out = match next_norm {
                    Some(next) => Residual::Normed(self.add_dropped_norm(
                        out,
                        &norm_acts.input,
                        next,
                        drop,
                        site,
                        rows,
                    )),
                    None => {
                        drop.add_dropped(&self.backend, &mut out, &norm_acts.input, site);
                        Residual::Raw(out)
                    }
                };
                let acts =
                    BlockActs { norm: norm_acts, sub: sub_acts, site, post_norm_input: None };
                (out, acts)
            }
            NormPlacement::Post => {
                let x = x.into_raw();
                let (mut z, sub_acts) = run(&x);
                drop.add_dropped(&self.backend, &mut z, &x, site);
                let norm_acts = self.norm(z, norm, rows);
                let out = self.backend_clone(&norm_acts.y);
                let acts =
                    BlockActs { norm: norm_acts, sub: sub_acts, site, post_norm_input: Some(x) };
                (Residual::Raw(out), acts)
            }
        }
    }

    /// The encoder: embeddings, layers and (pre-norm) the final norm. Returns the memory the
    /// decoder attends to, and what backward needs.
    #[allow(clippy::type_complexity)]
    pub(crate) fn encoder_stack(
        &self,
        src: &[u32],
        src_side: Side<'_>,
        drop: DropoutCtx,
    ) -> (B::Buf, Vec<BlockActs<B>>, Option<NormActs<B>>) {
        let ns = src_side.batch * src_side.len;
        let mut x = Residual::Raw(self.embed(src, src_side.len, drop, 1));
        let mut enc_blocks = Vec::new();
        let layers = &self.layout.encoder;
        for (l, layer) in layers.iter().enumerate() {
            let site = 100 + 10 * l as u64;
            let next = layers.get(l + 1).map(|n| n.ln1).or(self.layout.encoder_ln_f);
            let (h, a) = self.block(
                x,
                layer.ln1,
                Sublayer::SelfAttn { idx: layer.self_attn, causal: false },
                src_side,
                None,
                drop,
                site,
                self.pre_norm(layer.ln2),
            );
            enc_blocks.push(a);
            let (out, a) = self.block(
                h,
                layer.ln2,
                Sublayer::Ffn { idx: layer.ffn },
                src_side,
                None,
                drop,
                site + 1,
                next.and_then(|n| self.pre_norm(n)),
            );
            enc_blocks.push(a);
            x = out;
        }
        match self.layout.encoder_ln_f {
            Some(idx) => {
                let acts = self.normed(x, idx, ns);
                (self.backend_clone(&acts.y), enc_blocks, Some(acts))
            }
            None => (x.into_raw(), enc_blocks, None),
        }
    }

    fn run_forward(&self, batch: &Batch, drop: DropoutCtx) -> Result<(LossStats, Activations<B>)> {
        batch.validate(&self.config)?;
        let c = &self.config;
        let src_side = Side { batch: batch.batch, len: batch.src_len, lengths: &batch.src_lengths };
        let tgt_side = Side { batch: batch.batch, len: batch.tgt_len, lengths: &batch.tgt_lengths };
        let nt = batch.batch * batch.tgt_len;

        let (memory, enc_blocks, enc_final) = self.encoder_stack(&batch.src, src_side, drop);

        let mut x = Residual::Raw(self.embed(&batch.tgt_in, batch.tgt_len, drop, 2));
        let mut dec_blocks = Vec::new();
        let layers = &self.layout.decoder;
        for (l, layer) in layers.iter().enumerate() {
            let site = 10_000 + 10 * l as u64;
            let next = layers.get(l + 1).map(|n| n.ln1).or(self.layout.decoder_ln_f);
            let (h1, a) = self.block(
                x,
                layer.ln1,
                Sublayer::SelfAttn { idx: layer.self_attn, causal: true },
                tgt_side,
                None,
                drop,
                site,
                self.pre_norm(layer.ln2),
            );
            dec_blocks.push(a);
            let (h2, a) = self.block(
                h1,
                layer.ln2,
                Sublayer::CrossAttn { idx: layer.cross_attn },
                tgt_side,
                Some((&memory, src_side)),
                drop,
                site + 1,
                self.pre_norm(layer.ln3),
            );
            dec_blocks.push(a);
            let (out, a) = self.block(
                h2,
                layer.ln3,
                Sublayer::Ffn { idx: layer.ffn },
                tgt_side,
                None,
                drop,
                site + 2,
                next.and_then(|n| self.pre_norm(n)),
            );
            dec_blocks.push(a);
            x = out;
        }
        let (y, dec_final) = match self.layout.decoder_ln_f {
            Some(idx) => {
                let acts = self.normed(x, idx, nt);
                (self.backend_clone(&acts.y), Some(acts))
            }
            None => (x.into_raw(), None),
        };
        let logits = self.backend.linear(
            &y,
            &self.params[self.output_weight()],
            None,
            nt,
            c.d_model,
            c.vocab,
        );
        let mut d_logits = self.backend.for_overwrite(nt * c.vocab);
        let (loss, tokens) = self.backend.cross_entropy(
            &mut d_logits,
            &logits,
            &batch.tgt_out,
            c.vocab,
            c.pad_id,
            c.label_smoothing,
        );
        if !loss.is_finite() {
            return Err(ModelError::NonFinite(format!("loss is {loss}")));
        }
        Ok((
            LossStats { loss, tokens },
            Activations {
                enc_blocks,
                enc_final,
                memory,
                dec_blocks,
                dec_final,
                y,
                logits,
                d_logits,
            },
        ))
    }

    /// The loss without gradients and without dropout (evaluation).
    pub fn loss(&self, batch: &Batch) -> Result<LossStats> {
        Ok(self.run_forward(batch, DropoutCtx { p: 0.0, seed: 0, step: 0 })?.0)
    }

    /// The logits `[B·T, V]` of a teacher-forced pass (evaluation, tests).
    pub fn logits(&self, batch: &Batch) -> Result<Vec<f64>> {
        Ok(self.loss_and_logits(batch)?.1)
    }

    /// Loss and logits `[B·T, V]` from one teacher-forced pass without dropout.
    pub fn loss_and_logits(&self, batch: &Batch) -> Result<(LossStats, Vec<f64>)> {
        let (stats, acts) = self.run_forward(batch, DropoutCtx { p: 0.0, seed: 0, step: 0 })?;
        Ok((stats, self.backend.to_f64(&acts.logits)))
    }

    /// Forward and backward: returns the loss and **adds** the gradients into `self.grads`.
    /// Dropout (when the config has it) is keyed by `seed` and `step`.
    pub fn forward_backward(&mut self, batch: &Batch, seed: u64, step: u64) -> Result<LossStats> {
        self.forward_backward_staged(batch, seed, step, &mut |_, _, _| {})
    }

    /// [`Model::forward_backward`], calling `on_stage(s, backend, grads)` as soon as stage `s`
    /// of [`Model::backward_stages`] is done — its gradients final — so a data-parallel
    /// trainer can start all-reducing them while the rest of the backward pass runs.
    pub fn forward_backward_staged(
        &mut self,
        batch: &Batch,
        seed: u64,
        step: u64,
        on_stage: &mut StageHook<'_, B>,
    ) -> Result<LossStats> {
        let drop = DropoutCtx { p: self.config.dropout, seed, step };
        let (stats, acts) = self.run_forward(batch, drop)?;
        self.backward(batch, acts, drop, on_stage);
        Ok(stats)
    }

    /// The stages of the backward pass in the order they finish, each listing the parameters
    /// whose gradients are final once it is done: the output side (untied output projection,
    /// decoder's final norm), each decoder layer from the top, the encoder's final norm, each
    /// encoder layer from the top, then the rest (embeddings, learned positions).
    pub fn backward_stages(&self) -> Vec<Vec<usize>> {
        let named = |prefix: &str| -> Vec<usize> {
            (0..self.layout.specs.len())
                .filter(|&i| self.layout.specs[i].name.starts_with(prefix))
                .collect()
        };
        let mut stages =
            vec![self.layout.lm_head.into_iter().chain(named("decoder.ln_f.")).collect::<Vec<_>>()];
        for l in (0..self.layout.decoder.len()).rev() {
            stages.push(named(&format!("decoder.layers.{l}.")));
        }
        stages.push(named("encoder.ln_f."));
        for l in (0..self.layout.encoder.len()).rev() {
            stages.push(named(&format!("encoder.layers.{l}.")));
        }
        let listed: std::collections::BTreeSet<usize> = stages.iter().flatten().copied().collect();
        stages.push((0..self.layout.specs.len()).filter(|i| !listed.contains(i)).collect());
        stages
    }

    // --- backward ------------------------------------------------------------------------

    fn linear_back(
        &mut self,
        dx: Option<&mut B::Buf>,
        accumulate: bool,
        idx: LinearIdx,
        dy: &B::Buf,
        x: &B::Buf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let (dw, db) = pair_mut(&mut self.grads, idx.w, idx.b);
        self.backend.linear_backward(
            dx,
            accumulate,
            dw,
            Some(db),
            dy,
            x,
            &self.params[idx.w],
            rows,
            in_dim,
            out_dim,
        );
    }

    /// The backward of linear layers of one shape that all read `x`, each with its output
    /// gradient: `dx` from the first (`=` or `+=` as `accumulate` says), the later ones adding
    /// ([`Backend::linear_backward_shared_input`]: a GPU may queue their weight gradients as
    /// one batch, with `CHINGU_GEMM_WEIGHT_GRAD_BATCH=1`).
    #[allow(clippy::too_many_arguments)]
    fn linears_back_shared_input(
        &mut self,
        dx: &mut B::Buf,
        accumulate: bool,
        layers: &[(LinearIdx, &B::Buf)],
        x: &B::Buf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let wanted: Vec<usize> = layers.iter().flat_map(|(idx, _)| [idx.w, idx.b]).collect();
        let mut grads = disjoint_mut(&mut self.grads, &wanted).into_iter();
        let mut parts: Vec<LinearGrads<'_, B::Buf>> = layers
            .iter()
            .map(|&(idx, dy)| {
                let (dw, db) = grads.next().zip(grads.next()).expect("two gradients a layer");
                LinearGrads { dw, db: Some(db), dy, w: &self.params[idx.w] }
            })
            .collect();
        self.backend.linear_backward_shared_input(
            Some(dx),
            accumulate,
            &mut parts,
            x,
            rows,
            in_dim,
            out_dim,
        );
    }

    /// LayerNorm `idx`'s backward: `dx += …` and its parameters' gradients.
    fn norm_back(
        &mut self,
        dx: &mut B::Buf,
        idx: NormIdx,
        dy: &B::Buf,
        acts: &NormActs<B>,
        rows: usize,
    ) {
        self.norm_back_then(dx, idx, dy, acts, rows, None);
    }

    /// [`Self::norm_back`], returning dropout(dx) with `site`'s key as well (one pass on a GPU).
    #[allow(clippy::too_many_arguments)]
    fn norm_back_dropped(
        &mut self,
        dx: &mut B::Buf,
        idx: NormIdx,
        dy: &B::Buf,
        acts: &NormActs<B>,
        rows: usize,
        dropout: DropoutCtx,
        site: u64,
    ) -> B::Buf {
        let dropped = self.norm_back_then(dx, idx, dy, acts, rows, Some((dropout, site)));
        dropped.expect("a dropout was asked for")
    }

    /// [`Self::norm_back`], and where `then` gives a dropout and its site, dropout(dx).
    fn norm_back_then(
        &mut self,
        dx: &mut B::Buf,
        idx: NormIdx,
        dy: &B::Buf,
        acts: &NormActs<B>,
        rows: usize,
        then: Option<(DropoutCtx, u64)>,
    ) -> Option<B::Buf> {
        let d = self.config.d_model;
        let (dg, db) = pair_mut(&mut self.grads, idx.gamma, idx.beta);
        let (x, mean, rstd, gamma) = (&acts.input, &acts.mean, &acts.rstd, &self.params[idx.gamma]);
        let backend = &self.backend;
        match then {
            Some((dropout, site)) => Some(backend.layernorm_backward_dropped(
                dx,
                dg,
                db,
                dy,
                x,
                mean,
                rstd,
                gamma,
                rows,
                d,
                dropout.p,
                dropout.key(site),
            )),
            None => {
                backend.layernorm_backward(dx, dg, db, dy, x, mean, rstd, gamma, rows, d);
                None
            }
        }
    }

    /// Backward through a sublayer that read `input`: returns d(input); cross-attention adds
    /// its key/value gradient into `d_memory`.
    fn sub_back(
        &mut self,
        sub: Sublayer,
        acts: &SubActs<B>,
        input: &B::Buf,
        d_s: &B::Buf,
        cross: Option<(&mut B::Buf, &B::Buf)>,
    ) -> B::Buf {
        let d = self.config.d_model;
        match (sub, acts) {
            (Sublayer::SelfAttn { idx, .. } | Sublayer::CrossAttn { idx }, SubActs::Attn(a)) => {
                let shape = a.shape;
                let (nq, nk) = (shape.batch * shape.q_len, shape.batch * shape.k_len);
                let mut d_ctx = self.backend.for_overwrite(nq * d);
                self.linear_back(Some(&mut d_ctx), false, idx.o, d_s, &a.ctx, nq, d, d);
                let (mut dq, mut dk, mut dv) = (
                    self.backend.for_overwrite(nq * d),
                    self.backend.for_overwrite(nk * d),
                    self.backend.for_overwrite(nk * d),
                );
                self.backend.attention_backward(
                    &mut dq, &mut dk, &mut dv, &d_ctx, &a.q, &a.k, &a.v, &a.ctx, &a.probs,
                    &a.key_len, shape,
                );
                let mut d_input = self.backend.for_overwrite(nq * d);
                match (sub, cross) {
                    // Keys and values came from the encoder output: their gradient goes there.
                    (Sublayer::CrossAttn { .. }, Some((d_mem, memory))) => {
                        self.linear_back(Some(&mut d_input), false, idx.q, &dq, input, nq, d, d);
                        let kv = [(idx.k, &dk), (idx.v, &dv)];
                        self.linears_back_shared_input(d_mem, true, &kv, memory, nk, d, d);
                    }
                    _ => {
                        // Self-attention: queries, keys and values are the same rows.
                        debug_assert_eq!(nq, nk);
                        let qkv = [(idx.q, &dq), (idx.k, &dk), (idx.v, &dv)];
                        self.linears_back_shared_input(&mut d_input, false, &qkv, input, nq, d, d);
                    }
                }
                d_input
            }
            (Sublayer::Ffn { idx }, SubActs::Ffn(a)) => {
                let f = self.config.d_ff;
                let rows = self.backend.len(&a.pre_act) / f;
                let mut d_pre = self.backend.for_overwrite(rows * f);
                match self.config.activation {
                    Activation::Gelu => {
                        let (dw, db) = pair_mut(&mut self.grads, idx.fc2.w, idx.fc2.b);
                        self.backend.linear_backward_through_gelu(
                            &mut d_pre,
                            dw,
                            Some(db),
                            d_s,
                            &a.act,
                            &a.pre_act,
                            &self.params[idx.fc2.w],
                            rows,
                            f,
                            d,
                        );
                    }
                    Activation::Relu => {
                        let mut d_act = self.backend.for_overwrite(rows * f);
                        self.linear_back(Some(&mut d_act), false, idx.fc2, d_s, &a.act, rows, f, d);
                        self.backend.relu_backward(&mut d_pre, &d_act, &a.pre_act);
                    }
                }
                let mut d_input = self.backend.for_overwrite(rows * d);
                self.linear_back(Some(&mut d_input), false, idx.fc1, &d_pre, input, rows, d, f);
                d_input
            }
            _ => unreachable!("sublayer and activations always match"),
        }
    }

    /// Backward through one residual block: the stream's gradient in, the block input's out.
    /// Pre-norm, `prev_site` is the dropout site of the block (or embedding) the gradient goes
    /// to next, whose dropout of it is made with this block's LayerNorm backward.
    #[allow(clippy::too_many_arguments)]
    fn block_back(
        &mut self,
        d_out: ResidualGrad<B>,
        norm: NormIdx,
        sub: Sublayer,
        acts: &BlockActs<B>,
        dropout: DropoutCtx,
        cross: Option<(&mut B::Buf, &B::Buf)>,
        prev_site: u64,
    ) -> ResidualGrad<B> {
        let ResidualGrad { d: d_out, dropped } = d_out;
        let rows = self.backend.len(&d_out) / self.config.d_model;
        match self.config.norm {
            NormPlacement::Pre => {
                let d_s = match dropped {
                    Some((site, d_s)) => {
                        assert_eq!(site, acts.site, "the gradient was dropped for another block");
                        d_s
                    }
                    None => dropout.dropped_copy(&self.backend, &d_out, acts.site),
                };
                let d_y = self.sub_back(sub, &acts.sub, acts.sub_input(), &d_s, cross);
                drop(d_s);
                let mut d_x = d_out;
                let d_prev = self
                    .norm_back_dropped(&mut d_x, norm, &d_y, &acts.norm, rows, dropout, prev_site);
                ResidualGrad { d: d_x, dropped: Some((prev_site, d_prev)) }
            }
            NormPlacement::Post => {
                assert!(dropped.is_none(), "post-norm blocks drop their own gradient");
                let mut d_z = self.backend.zeros(self.backend.len(&d_out));
                self.norm_back(&mut d_z, norm, &d_out, &acts.norm, rows);
                let d_s = dropout.dropped_copy(&self.backend, &d_z, acts.site);
                let d_in = self.sub_back(sub, &acts.sub, acts.sub_input(), &d_s, cross);
                self.backend.add_assign(&mut d_z, &d_in);
                ResidualGrad::plain(d_z)
            }
        }
    }

    fn backward(
        &mut self,
        batch: &Batch,
        acts: Activations<B>,
        dropout: DropoutCtx,
        on_stage: &mut StageHook<'_, B>,
    ) {
        let mut stage = 0;
        let mut done = |model: &mut Self| {
            on_stage(stage, &model.backend, &mut model.grads);
            stage += 1;
        };
        let c = self.config.clone();
        let d = c.d_model;
        let (ns, nt) = (batch.batch * batch.src_len, batch.batch * batch.tgt_len);
        let Activations {
            enc_blocks,
            enc_final,
            memory,
            dec_blocks,
            dec_final,
            y,
            logits,
            d_logits,
        } = acts;
        drop(logits);

        // Output projection: logits = y · Wᵀ.
        let mut d_y = self.backend.for_overwrite(nt * d);
        let w = self.output_weight();
        self.backend.linear_backward(
            Some(&mut d_y),
            false,
            &mut self.grads[w],
            None,
            &d_logits,
            &y,
            &self.params[w],
            nt,
            d,
            c.vocab,
        );
        drop(d_logits);

        // The dropout site each block's input came through: the previous block's, or the
        // embedding's (1 source, 2 target) for the first.
        let prev_site = |blocks: &[BlockActs<B>], i: usize, embedding: u64| {
            i.checked_sub(1).map_or(embedding, |p| blocks[p].site)
        };
        let mut d_x = match (&dec_final, self.layout.decoder_ln_f) {
            (Some(a), Some(idx)) => {
                let mut d_x = self.backend.zeros(nt * d);
                let prev = prev_site(&dec_blocks, dec_blocks.len(), 2);
                let d_prev = self.norm_back_dropped(&mut d_x, idx, &d_y, a, nt, dropout, prev);
                ResidualGrad { d: d_x, dropped: Some((prev, d_prev)) }
            }
            _ => ResidualGrad::plain(d_y),
        };
        done(self);
        let mut d_memory = self.backend.zeros(ns * d);
        let layers = self.layout.decoder.clone();
        for (l, layer) in layers.iter().enumerate().rev() {
            let i = 3 * l;
            d_x = self.block_back(
                d_x,
                layer.ln3,
                Sublayer::Ffn { idx: layer.ffn },
                &dec_blocks[i + 2],
                dropout,
                None,
                prev_site(&dec_blocks, i + 2, 2),
            );
            d_x = self.block_back(
                d_x,
                layer.ln2,
                Sublayer::CrossAttn { idx: layer.cross_attn },
                &dec_blocks[i + 1],
                dropout,
                Some((&mut d_memory, &memory)),
                prev_site(&dec_blocks, i + 1, 2),
            );
            d_x = self.block_back(
                d_x,
                layer.ln1,
                Sublayer::SelfAttn { idx: layer.self_attn, causal: true },
                &dec_blocks[i],
                dropout,
                None,
                prev_site(&dec_blocks, i, 2),
            );
            done(self);
        }
        let d_x = self.embedding_input_grad(d_x, dropout, 2);
        let emb = self.layout.embed;
        self.backend.embedding_backward(
            &mut self.grads[emb],
            &d_x,
            &batch.tgt_in,
            d,
            (d as f32).sqrt(),
        );
        self.position_backward(&d_x, batch.tgt_len);

        let mut d_x = match (&enc_final, self.layout.encoder_ln_f) {
            (Some(a), Some(idx)) => {
                let mut d_x = self.backend.zeros(ns * d);
                let prev = prev_site(&enc_blocks, enc_blocks.len(), 1);
                let d_prev = self.norm_back_dropped(&mut d_x, idx, &d_memory, a, ns, dropout, prev);
                ResidualGrad { d: d_x, dropped: Some((prev, d_prev)) }
            }
            _ => ResidualGrad::plain(d_memory),
        };
        done(self);
        let layers = self.layout.encoder.clone();
        for (l, layer) in layers.iter().enumerate().rev() {
            let i = 2 * l;
            d_x = self.block_back(
                d_x,
                layer.ln2,
                Sublayer::Ffn { idx: layer.ffn },
                &enc_blocks[i + 1],
                dropout,
                None,
                prev_site(&enc_blocks, i + 1, 1),
            );
            d_x = self.block_back(
                d_x,
                layer.ln1,
                Sublayer::SelfAttn { idx: layer.self_attn, causal: false },
                &enc_blocks[i],
                dropout,
                None,
                prev_site(&enc_blocks, i, 1),
            );
            done(self);
        }
        let d_x = self.embedding_input_grad(d_x, dropout, 1);
        self.backend.embedding_backward(
            &mut self.grads[emb],
            &d_x,
            &batch.src,
            d,
            (d as f32).sqrt(),
        );
        self.position_backward(&d_x, batch.src_len);
        done(self);
    }

    /// The gradient of the embedding output before its dropout (`site`): the dropped copy the
    /// first block's LayerNorm backward made (pre-norm), or the stream's gradient dropped here.
    fn embedding_input_grad(
        &self,
        grad: ResidualGrad<B>,
        dropout: DropoutCtx,
        site: u64,
    ) -> B::Buf {
        match grad.dropped {
            Some((dropped_for, d)) => {
                assert_eq!(dropped_for, site, "the gradient was dropped for another site");
                d
            }
            None => {
                let mut d = grad.d;
                dropout.apply(&self.backend, &mut d, site);
                d
            }
        }
    }

    /// Learned positions: row n of the embedding output used position n mod `seq_len`.
    fn position_backward(&mut self, d_x: &B::Buf, seq_len: usize) {
        if let Some(index) = self.layout.positions {
            let d = self.config.d_model;
            let rows = self.backend.len(d_x) / d;
            let positions: Vec<u32> = (0..rows).map(|n| (n % seq_len) as u32).collect();
            self.backend.embedding_backward(&mut self.grads[index], d_x, &positions, d, 1.0);
        }
    }
}
