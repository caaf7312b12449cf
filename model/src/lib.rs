//! chingu-model: the encoder-decoder transformer written once over
//! [`chingu_kernels::Backend`] — configuration and presets, the parameter layout, explicit
//! forward and backward passes — plus the optimizer pieces that act on the whole model.

pub mod config;
pub mod generate;
pub mod optim;
pub mod params;
pub mod transformer;

pub use config::{Activation, Config, NormPlacement, Positions};
pub use optim::{LossScaler, Optimizer, OptimizerSettings, Schedule, UpdateInfo};
pub use params::Layout;
pub use transformer::{Batch, LossStats, Model, StageHook};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An invalid configuration, with what to change.
    #[error("model config: {0}")]
    Config(String),
    /// A batch inconsistent with itself or the model.
    #[error("batch: {0}")]
    Batch(String),
    /// A NaN or infinity where a number was expected.
    #[error("non-finite values: {0}")]
    NonFinite(String),
}

/// Shorthand.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
