//! Model configuration, presets and validation.

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// Where LayerNorm sits relative to the residual connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// `x + F(LN(x))`, with a final LayerNorm after each stack (the original's choice: skip
    /// connection and normalisation kept apart; trains without warm-up).
    Pre,
    /// `LN(x + F(x))`, the 2017 transformer.
    Post,
}

/// The feed-forward nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// GELU, tanh approximation.
    Gelu,
    /// ReLU.
    Relu,
}

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Fixed sine/cosine table (the 2017 transformer's).
    #[default]
    Sinusoidal,
    /// A trained table `positions.weight` `[max_len, D]`.
    Learned,
}

/// Everything that fixes the model's shape and training-time behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Vocabulary size V (must equal the tokenizer's).
    pub vocab: usize,
    /// Model width D.
    pub d_model: usize,
    /// Attention heads H (D must be divisible by H).
    pub heads: usize,
    /// Feed-forward width F.
    pub d_ff: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Longest sequence (positions) either side may have.
    pub max_len: usize,
    /// Dropout probability after embeddings and every sublayer.
    pub dropout: f32,
    /// Norm placement.
    pub norm: NormPlacement,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Share the embedding matrix with the output projection.
    pub tied_embeddings: bool,
    /// Label smoothing of the loss.
    pub label_smoothing: f64,
    /// Padding token id (ignored by the loss).
    pub pad_id: u32,
    /// Position encoding.
    #[serde(default)]
    pub positions: Positions,
}

impl Config {
    /// The named presets: `micro` (tests), `tiny` (quick CPU runs), `seed-256` and `seed-768`
    /// (the original's shapes: 6 + 6 layers, 4 heads, max length 1024).
    pub fn preset(name: &str, vocab: usize) -> Result<Self> {
        let base = Config {
            vocab,
            d_model: 256,
            heads: 4,
            d_ff: 1024,
            encoder_layers: 6,
            decoder_layers: 6,
            max_len: 1024,
            dropout: 0.1,
            norm: NormPlacement::Pre,
            activation: Activation::Gelu,
            tied_embeddings: true,
            label_smoothing: 0.1,
            pad_id: 0,
            positions: Positions::Sinusoidal,
        };
        let config = match name {
            "tiny" => Config {
                d_model: 128,
                heads: 4,
                d_ff: 512,
                encoder_layers: 3,
                decoder_layers: 3,
                max_len: 128,
                dropout: 0.0,
                ..base
            },
            // For tests and smoke runs: a model every backend (the emulated GPU included)
            // steps through in milliseconds.
            "micro" => Config {
                d_model: 32,
                heads: 2,
                d_ff: 64,
                encoder_layers: 1,
                decoder_layers: 1,
                max_len: 64,
                ..base
            },
            "seed-256" => base,
            "seed-768" => Config { d_model: 768, d_ff: 3072, ..base },
            other => {
                return Err(ModelError::Config(format!(
                "unknown preset {other:?}: choose tiny, seed-256 or seed-768 (or micro, for tests)"
            )))
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Head width Dh.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }

    /// Checks the shape makes sense, with a message saying what to change.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.d_model == 0
            || self.heads == 0
            || self.d_ff == 0
            || self.vocab == 0
            || self.max_len == 0
        {
            return fail("d_model, heads, d_ff, vocab and max_len must all be positive".into());
        }
        if self.d_model % self.heads != 0 {
            return fail(format!(
                "d_model {} is not divisible by heads {}",
                self.d_model, self.heads
            ));
        }
        if self.encoder_layers == 0 || self.decoder_layers == 0 {
            return fail("the model needs at least one encoder and one decoder layer".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return fail(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail(format!("label_smoothing {} must be in [0, 1)", self.label_smoothing));
        }
        if self.pad_id as usize >= self.vocab {
            return fail(format!(
                "pad id {} is outside the vocabulary of {}",
                self.pad_id, self.vocab
            ));
        }
        Ok(())
    }
}
