//! AdamW over the whole model, global-norm gradient clipping and the learning-rate schedule.

use chingu_kernels::{AdamW, Backend, BufRole};
use serde::{Deserialize, Serialize};

use crate::transformer::Model;
use crate::{ModelError, Result};

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate every step (the original's choice).
    Constant,
    /// Linear warm-up over `warmup` steps, then cosine decay to `min_ratio`·lr at `total`.
    WarmupCosine {
        /// Warm-up steps.
        warmup: u64,
        /// Step at which the decay ends.
        total: u64,
        /// Final rate as a share of the peak.
        min_ratio: f32,
    },
}

impl Schedule {
    /// The rate at 1-based `step` for peak rate `lr`.
    pub fn rate(&self, lr: f32, step: u64) -> f32 {
        match *self {
            Schedule::Constant => lr,
            Schedule::WarmupCosine { warmup, total, min_ratio } => {
                if step <= warmup {
                    return lr * step as f32 / warmup.max(1) as f32;
                }
                let span = total.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / span as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                lr * (min_ratio + (1.0 - min_ratio) * cosine as f32)
            }
        }
    }
}

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSettings {
    /// Peak learning rate.
    pub lr: f32,
    /// AdamW β₁.
    pub beta1: f32,
    /// AdamW β₂.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Decoupled weight decay for matrices (never for biases and norms).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None: no clipping).
    pub clip_norm: Option<f32>,
    /// Learning-rate schedule.
    pub schedule: Schedule,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: Some(1.0),
            schedule: Schedule::Constant,
        }
    }
}

/// Dynamic loss scaling for backends with fp16 gradients: the loss gradient is multiplied by
/// `scale` so small activation gradients stay representable; gradients are divided by it
/// before the update. An overflow (inf/NaN in any gradient) skips the update and halves the
/// scale; `growth_interval` clean updates in a row double it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current factor.
    pub scale: f32,
    /// Clean updates since the scale last changed.
    pub clean_steps: u64,
    /// Clean updates after which the scale doubles.
    pub growth_interval: u64,
}

/// The largest loss scale (2^24).
pub const MAX_LOSS_SCALE: f32 = 16_777_216.0;

impl Default for LossScaler {
    fn default() -> Self {
        Self { scale: 65_536.0, clean_steps: 0, growth_interval: 2_000 }
    }
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f32,
    /// With loss scaling: the scale the step's gradients carried.
    pub loss_scale: Option<f32>,
    /// True when an overflow skipped the update (the scale was halved).
    pub skipped: bool,
}

/// AdamW state: first and second moments per parameter tensor, and the step count.
pub struct Optimizer<B: Backend> {
    /// Settings.
    pub settings: OptimizerSettings,
    /// First moments, in layout order.
    pub exp_avg: Vec<B::Buf>,
    /// Second moments, in layout order.
    pub exp_avg_sq: Vec<B::Buf>,
    /// Updates applied so far.
    pub step: u64,
    /// Dynamic loss scaling, on backends that need it.
    pub scaler: Option<LossScaler>,
}

impl<B: Backend> Optimizer<B> {
    /// Zeroed moments for `model`.
    pub fn new(model: &Model<B>, settings: OptimizerSettings) -> Self {
        let zeros = || {
            let specs = model.layout.specs.iter();
            specs.map(|s| model.backend.zeros_as(s.numel(), BufRole::OptimizerState)).collect()
        };
        let scaler = model.backend.uses_loss_scaling().then(LossScaler::default);
        if let Some(s) = scaler {
            model.backend.set_loss_scale(s.scale);
        }
        Self { settings, exp_avg: zeros(), exp_avg_sq: zeros(), step: 0, scaler }
    }

    /// Restores loss-scaling state (from a checkpoint) and hands the scale to the backend.
    pub fn set_scaler(&mut self, model: &Model<B>, scaler: LossScaler) {
        if self.scaler.is_some() {
            self.scaler = Some(scaler);
            model.backend.set_loss_scale(scaler.scale);
        }
    }

    /// With loss scaling: `(scale, true)` — the scale halved, nothing else changed — when a
    /// gradient overflowed; otherwise `(scale, false)` with the unscaled gradients' sum of
    /// squares (one device read-back for the overflow check and the norm together). The
    /// gradients themselves are divided by the scale inside the update.
    fn unscale(&mut self, model: &mut Model<B>) -> Result<Option<(f32, bool, f64)>> {
        let Some(scaler) = self.scaler.as_mut() else { return Ok(None) };
        let used = scaler.scale;
        let grads: Vec<&B::Buf> = model.grads.iter().collect();
        let scaled_sum = model.backend.sum_squares_all(&grads);
        if !scaled_sum.is_finite() {
            if used <= 1.0 {
                return Err(ModelError::NonFinite(format!(
                    "gradients at step {} even with loss scale {used}",
                    self.step + 1
                )));
            }
            scaler.scale = used / 2.0;
            scaler.clean_steps = 0;
            model.backend.set_loss_scale(scaler.scale);
            return Ok(Some((used, true, f64::NAN)));
        }
        // The gradients are divided by the scale inside the update (`AdamW::grad_scale`).
        scaler.clean_steps += 1;
        if scaler.clean_steps >= scaler.growth_interval {
            // Capped: fp16 gradients need no more, and an infinite scale could never recover.
            scaler.scale = (used * 2.0).min(MAX_LOSS_SCALE);
            scaler.clean_steps = 0;
            model.backend.set_loss_scale(scaler.scale);
        }
        let inv = f64::from(used).recip();
        Ok(Some((used, false, scaled_sum * inv * inv)))
    }

    /// Clips and applies the accumulated gradients, then leaves them as they are (the caller
    /// zeroes them). Fails, changing nothing, if any gradient is NaN or infinite — except
    /// with loss scaling, where an overflow skips the update and halves the scale instead.
    pub fn update(&mut self, model: &mut Model<B>) -> Result<UpdateInfo> {
        let scaled = self.unscale(model)?;
        let loss_scale = scaled.map(|(scale, _, _)| scale);
        if let Some((_, true, _)) = scaled {
            let lr = self.settings.schedule.rate(self.settings.lr, self.step + 1);
            return Ok(UpdateInfo { grad_norm: f64::NAN, lr, loss_scale, skipped: true });
        }
        let grad_norm = match scaled {
            Some((_, _, sum)) => sum.sqrt(),
            None => self.checked_norm(model)?,
        };
        // Loss-scale removal and clipping are one multiplier applied inside AdamW (no extra
        // pass over the gradients). The inverse scale is a power of two, so the product is
        // exactly what multiplying twice would give.
        let mut grad_scale = loss_scale.map_or(1.0, |s| 1.0 / s);
        if let Some(clip) = self.settings.clip_norm {
            if grad_norm > f64::from(clip) {
                grad_scale *= (f64::from(clip) / grad_norm) as f32;
            }
        }
        self.step += 1;
        let lr = self.settings.schedule.rate(self.settings.lr, self.step);
        let settings: Vec<AdamW> = model
            .layout
            .specs
            .iter()
            .map(|spec| AdamW {
                lr,
                beta1: self.settings.beta1,
                beta2: self.settings.beta2,
                eps: self.settings.eps,
                weight_decay: if spec.decay { self.settings.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            })
            .collect();
        model.backend.adamw_all(
            &mut model.params,
            &model.grads,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            &settings,
        );
        Ok(UpdateInfo { grad_norm, lr, loss_scale, skipped: false })
    }

    /// The global gradient norm, tensor by tensor in layout order, naming the first tensor
    /// that is not finite.
    fn checked_norm(&self, model: &Model<B>) -> Result<f64> {
        let mut sum = 0.0f64;
        for (spec, grad) in model.layout.specs.iter().zip(&model.grads) {
            let s = model.backend.sum_squares(grad);
            if !s.is_finite() {
                return Err(ModelError::NonFinite(format!(
                    "gradient of {} at step {}",
                    spec.name,
                    self.step + 1
                )));
            }
            sum += s;
        }
        Ok(sum.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Activation, Config, NormPlacement};
    use chingu_kernels::Cpu;

    #[test]
    fn non_finite_gradients_stop_the_update_and_name_the_tensor() {
        let config = Config {
            vocab: 7,
            d_model: 4,
            heads: 1,
            d_ff: 4,
            encoder_layers: 1,
            decoder_layers: 1,
            max_len: 4,
            dropout: 0.0,
            norm: NormPlacement::Pre,
            activation: Activation::Gelu,
            tied_embeddings: true,
            label_smoothing: 0.0,
            pad_id: 0,
            positions: crate::Positions::Sinusoidal,
        };
        let mut model = Model::new(Cpu::<f32>::new(), config, 1).unwrap();
        let mut optimizer = Optimizer::new(&model, OptimizerSettings::default());
        let index = model.layout.find("decoder.layers.0.ffn.fc1.weight").unwrap();
        model.grads[index][2] = f32::NAN;
        let before = model.params.clone();
        let err = optimizer.update(&mut model).unwrap_err().to_string();
        assert!(err.contains("decoder.layers.0.ffn.fc1.weight") && err.contains("step 1"), "{err}");
        assert_eq!(model.params, before, "nothing may change");
        assert_eq!(optimizer.step, 0);
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine { warmup: 10, total: 110, min_ratio: 0.1 };
        assert!((s.rate(1.0, 5) - 0.5).abs() < 1e-6);
        assert!((s.rate(1.0, 10) - 1.0).abs() < 1e-6);
        assert!((s.rate(1.0, 60) - 0.55).abs() < 1e-6);
        assert!((s.rate(1.0, 110) - 0.1).abs() < 1e-6);
        assert!((s.rate(1.0, 500) - 0.1).abs() < 1e-6);
        assert_eq!(Schedule::Constant.rate(0.3, 7), 0.3);
    }
}
