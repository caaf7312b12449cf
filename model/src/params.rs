//! The parameter layout: every tensor's name (PyTorch-style, shared with `bench/torch_ref.py`
//! and the safetensors checkpoints), shape and initialisation, and index structs the forward
//! pass uses to find them.

use chingu_kernels::rng::{SplitMix64, GAMMA};

use crate::config::{Config, NormPlacement, Positions};

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std).
    Normal(f64),
    /// All ones (LayerNorm gains).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// One named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Name, e.g. `encoder.layers.0.self_attn.q.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initialisation.
    pub init: Init,
    /// Whether AdamW's weight decay applies (matrices yes; biases and norms no).
    pub decay: bool,
}

impl TensorSpec {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Indices of a linear layer's tensors.
#[derive(Debug, Clone, Copy)]
pub struct LinearIdx {
    /// `[out, in]`
    pub w: usize,
    /// `[out]`
    pub b: usize,
}

/// Indices of a LayerNorm's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormIdx {
    /// gain `[D]`
    pub gamma: usize,
    /// bias `[D]`
    pub beta: usize,
}

/// Indices of an attention block's projections.
#[derive(Debug, Clone, Copy)]
pub struct AttnIdx {
    /// Query projection.
    pub q: LinearIdx,
    /// Key projection.
    pub k: LinearIdx,
    /// Value projection.
    pub v: LinearIdx,
    /// Output projection.
    pub o: LinearIdx,
}

/// Indices of a feed-forward block.
#[derive(Debug, Clone, Copy)]
pub struct FfnIdx {
    /// `[F, D]`
    pub fc1: LinearIdx,
    /// `[D, F]`
    pub fc2: LinearIdx,
}

/// One encoder layer.
#[derive(Debug, Clone, Copy)]
pub struct EncoderLayerIdx {
    /// Norm of the attention block.
    pub ln1: NormIdx,
    /// Self-attention.
    pub self_attn: AttnIdx,
    /// Norm of the feed-forward block.
    pub ln2: NormIdx,
    /// Feed-forward.
    pub ffn: FfnIdx,
}

/// One decoder layer.
#[derive(Debug, Clone, Copy)]
pub struct DecoderLayerIdx {
    /// Norm of the self-attention block.
    pub ln1: NormIdx,
    /// Causal self-attention.
    pub self_attn: AttnIdx,
    /// Norm of the cross-attention block.
    pub ln2: NormIdx,
    /// Attention over the encoder output.
    pub cross_attn: AttnIdx,
    /// Norm of the feed-forward block.
    pub ln3: NormIdx,
    /// Feed-forward.
    pub ffn: FfnIdx,
}

/// The whole layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Every tensor, in a fixed order.
    pub specs: Vec<TensorSpec>,
    /// `embed.weight` `[V, D]`.
    pub embed: usize,
    /// Encoder layers.
    pub encoder: Vec<EncoderLayerIdx>,
    /// Final encoder norm (pre-norm only).
    pub encoder_ln_f: Option<NormIdx>,
    /// Decoder layers.
    pub decoder: Vec<DecoderLayerIdx>,
    /// Final decoder norm (pre-norm only).
    pub decoder_ln_f: Option<NormIdx>,
    /// `lm_head.weight` `[V, D]` when embeddings are not tied.
    pub lm_head: Option<usize>,
    /// `positions.weight` `[max_len, D]` when positions are learned.
    pub positions: Option<usize>,
}

struct Builder {
    specs: Vec<TensorSpec>,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init, decay: bool) -> usize {
        self.specs.push(TensorSpec { name, shape, init, decay });
        self.specs.len() - 1
    }

    fn linear(&mut self, prefix: &str, out_dim: usize, in_dim: usize, std: f64) -> LinearIdx {
        LinearIdx {
            w: self.add(format!("{prefix}.weight"), vec![out_dim, in_dim], Init::Normal(std), true),
            b: self.add(format!("{prefix}.bias"), vec![out_dim], Init::Zeros, false),
        }
    }

    fn norm(&mut self, prefix: &str, d: usize) -> NormIdx {
        NormIdx {
            gamma: self.add(format!("{prefix}.weight"), vec![d], Init::Ones, false),
            beta: self.add(format!("{prefix}.bias"), vec![d], Init::Zeros, false),
        }
    }

    fn attention(&mut self, prefix: &str, d: usize, out_std: f64) -> AttnIdx {
        AttnIdx {
            q: self.linear(&format!("{prefix}.q"), d, d, 0.02),
            k: self.linear(&format!("{prefix}.k"), d, d, 0.02),
            v: self.linear(&format!("{prefix}.v"), d, d, 0.02),
            o: self.linear(&format!("{prefix}.o"), d, d, out_std),
        }
    }

    fn ffn(&mut self, prefix: &str, d: usize, f: usize, out_std: f64) -> FfnIdx {
        FfnIdx {
            fc1: self.linear(&format!("{prefix}.fc1"), f, d, 0.02),
            fc2: self.linear(&format!("{prefix}.fc2"), d, f, out_std),
        }
    }
}

impl Layout {
    /// The layout for `config`. Initialisation: embeddings Normal(0, D^-½) (so the √D-scaled
    /// input has unit variance); projections Normal(0, 0.02), with the projections that feed
    /// the residual stream (attention `o`, `fc2`) scaled by 1/√(2·layers) as in GPT-2.
    pub fn new(config: &Config) -> Self {
        let (d, f) = (config.d_model, config.d_ff);
        let mut b = Builder { specs: Vec::new() };
        let embed = b.add(
            "embed.weight".into(),
            vec![config.vocab, d],
            Init::Normal(1.0 / (d as f64).sqrt()),
            true,
        );
        let residual_std =
            0.02 / ((2 * (config.encoder_layers + config.decoder_layers)) as f64).sqrt();
        let pre = config.norm == NormPlacement::Pre;
        let encoder = (0..config.encoder_layers)
            .map(|i| {
                let p = format!("encoder.layers.{i}");
                EncoderLayerIdx {
                    ln1: b.norm(&format!("{p}.ln1"), d),
                    self_attn: b.attention(&format!("{p}.self_attn"), d, residual_std),
                    ln2: b.norm(&format!("{p}.ln2"), d),
                    ffn: b.ffn(&format!("{p}.ffn"), d, f, residual_std),
                }
            })
            .collect();
        let encoder_ln_f = pre.then(|| b.norm("encoder.ln_f", d));
        let decoder = (0..config.decoder_layers)
            .map(|i| {
                let p = format!("decoder.layers.{i}");
                DecoderLayerIdx {
                    ln1: b.norm(&format!("{p}.ln1"), d),
                    self_attn: b.attention(&format!("{p}.self_attn"), d, residual_std),
                    ln2: b.norm(&format!("{p}.ln2"), d),
                    cross_attn: b.attention(&format!("{p}.cross_attn"), d, residual_std),
                    ln3: b.norm(&format!("{p}.ln3"), d),
                    ffn: b.ffn(&format!("{p}.ffn"), d, f, residual_std),
                }
            })
            .collect();
        let decoder_ln_f = pre.then(|| b.norm("decoder.ln_f", d));
        let positions = (config.positions == Positions::Learned).then(|| {
            b.add("positions.weight".into(), vec![config.max_len, d], Init::Normal(0.02), false)
        });
        let lm_head = (!config.tied_embeddings).then(|| {
            b.add("lm_head.weight".into(), vec![config.vocab, d], Init::Normal(0.02), true)
        });
        Layout {
            specs: b.specs,
            embed,
            encoder,
            encoder_ln_f,
            decoder,
            decoder_ln_f,
            lm_head,
            positions,
        }
    }

    /// Total parameters.
    pub fn parameter_count(&self) -> usize {
        self.specs.iter().map(TensorSpec::numel).sum()
    }

    /// The index of a tensor by name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }
}

/// Deterministic initial values for tensor `index` of a run seeded with `seed`: a function of
/// both alone, so adding a tensor never changes the others.
pub fn initial_values(spec: &TensorSpec, seed: u64, index: usize) -> Vec<f32> {
    let n = spec.numel();
    match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Normal(std) => {
            let mut rng = SplitMix64(seed ^ (index as u64 + 1).wrapping_mul(GAMMA));
            let mut uniform = move || rng.next_f64();
            (0..n)
                .map(|_| {
                    // Box-Muller; 1 - u keeps the logarithm finite.
                    let (u1, u2) = (1.0 - uniform(), uniform());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect()
        }
    }
}
