//! chingu-model: the encoder-decoder transformer, written once over `Backend` with explicit
//! forward and backward passes, plus AdamW, the learning-rate schedule, generation and
//! safetensors import/export.
//!
//! Status: empty until the model issue fills it.
