//! chingu-worker: one training process per device: the trainer (`trainer`, one process or one
//! rank), checkpoints (`checkpoint`), evaluation (`eval`), the gradient all-reduce seam
//! (`collective`), the job spec (`job`) and a launched worker's session with its coordinator
//! (`remote`).

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod eval;
pub mod job;
pub mod remote;
pub mod trainer;

use std::path::{Path, PathBuf};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Prepared data problems.
    #[error(transparent)]
    Corpus(#[from] chingu_corpus::Error),
    /// Model problems.
    #[error(transparent)]
    Model(#[from] chingu_model::ModelError),
    /// A checkpoint that cannot be used.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Training cannot go on (NaN, bad options): retrying gives the same error.
    #[error("{0}")]
    Training(String),
    /// The all-reduce failed (a peer died or hung): a restart may succeed.
    #[error("{0}")]
    Collective(String),
    /// The GPU failed inside a step: out of memory (a restart would only repeat it; the
    /// message says what to lower), a driver fault (a restart may succeed), or a refusal
    /// that would repeat (a shape or setting).
    #[error("{failure}{advice}")]
    Device {
        /// The op and the device's error.
        failure: chingu_kernels::DeviceFailure,
        /// What to change, where the failure says (after a separator), or empty.
        advice: String,
    },
}

impl WorkerError {
    /// True when running the same job again cannot help (bad data, bad settings, NaN, a GPU
    /// out of memory) — as opposed to a lost peer or coordinator, or a driver fault.
    pub fn is_deterministic(&self) -> bool {
        match self {
            WorkerError::Collective(_) | WorkerError::Io { .. } => false,
            WorkerError::Device { failure, .. } => !failure.transient,
            _ => true,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        WorkerError::Io { path: path.to_path_buf(), source }
    }
}

/// Shorthand.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
