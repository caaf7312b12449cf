//! The job spec a coordinator hands every worker at `Join` (as JSON): what to train, on which
//! data, into which run directory, with which settings. Built by the coordinator from a
//! manifest; turned into [`TrainOptions`] by the worker.

use std::path::PathBuf;

use chingu_model::{OptimizerSettings, Positions};
use serde::{Deserialize, Serialize};

use crate::trainer::TrainOptions;

/// Everything a worker needs to know about the job besides its rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name (logs, status).
    pub name: String,
    /// Run directory (absolute): checkpoints, logs, metrics.
    pub run: PathBuf,
    /// Prepared data directory (absolute).
    pub data: PathBuf,
    /// Model preset.
    pub preset: String,
    /// Dropout override.
    pub dropout: Option<f32>,
    /// Position-encoding override.
    pub positions: Option<Positions>,
    /// Optimizer steps to reach.
    pub steps: u64,
    /// Padded tokens per micro-batch.
    pub batch_tokens: usize,
    /// Micro-batches per rank per step.
    pub accumulate: usize,
    /// Optimizer settings.
    pub optimizer: OptimizerSettings,
    /// Seed for initialisation, data order and dropout.
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end and on request).
    pub checkpoint_every: u64,
    /// Validation every this many steps on rank 0 (0: never).
    pub eval_every: u64,
    /// Checkpoints to keep.
    pub keep: usize,
    /// CPU threads per worker (0: the machine's cores divided by the workers).
    pub threads: usize,
    /// "auto", "cpu" or "cuda".
    pub backend: String,
    /// How gradients are summed: "auto", "ring" or "nccl" (`workers.collective`).
    #[serde(default = "auto")]
    pub collective: String,
}

fn auto() -> String {
    "auto".into()
}

impl JobSpec {
    /// The trainer options of this job, continuing from `resume_step`'s checkpoint if given.
    pub fn train_options(&self, resume_step: Option<u64>) -> TrainOptions {
        TrainOptions {
            data: self.data.clone(),
            run: self.run.clone(),
            preset: self.preset.clone(),
            dropout: self.dropout,
            positions: self.positions,
            steps: self.steps,
            batch_tokens: self.batch_tokens,
            optimizer: self.optimizer,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            eval_batches: 20,
            keep: self.keep,
            resume: resume_step.is_some(),
            resume_step,
        }
    }
}
