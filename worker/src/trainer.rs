//! The single-process trainer: length-bucketed batches from prepared shards, AdamW, periodic
//! validation and checkpoints, exact resume.
//!
//! Exactness: everything that shapes a step is a function of (seed, step, data cursor) and of
//! the tensors in the checkpoint — the batch plan is recomputed from the seed and epoch,
//! dropout masks are keyed by step — so a resumed run repeats the uninterrupted one bit for bit.

use std::path::PathBuf;
use std::time::Instant;

use chingu_corpus::batching::{epoch_plan, index_records, Cursor, RecordRef};
use chingu_kernels::Backend;
use chingu_model::{Config, Model, ModelError, Optimizer, OptimizerSettings};

use crate::checkpoint::{self, TrainState};
use crate::data::{make_batch, Prepared};
use crate::eval;
use crate::{Result, WorkerError};

/// What `chingu train` can be told.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Prepared data directory.
    pub data: PathBuf,
    /// Run directory (checkpoints, logs).
    pub run: PathBuf,
    /// Model preset (`tiny`, `seed-256`, `seed-768`); a resumed run keeps its own config.
    pub preset: String,
    /// Dropout override for the preset.
    pub dropout: Option<f32>,
    /// Position-encoding override for the preset.
    pub positions: Option<chingu_model::Positions>,
    /// Train until this many optimizer steps are done.
    pub steps: u64,
    /// Padded tokens (source + target) per batch.
    pub batch_tokens: usize,
    /// Optimizer settings.
    pub optimizer: OptimizerSettings,
    /// Seed for initialisation, data order and dropout.
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Validation loss every this many steps (0: never).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoints to keep.
    pub keep: usize,
    /// Continue from the run's latest checkpoint.
    pub resume: bool,
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: u64,
    /// Epoch of the batch.
    pub epoch: u64,
    /// Training loss of the batch.
    pub loss: f64,
    /// Target tokens in the batch.
    pub tokens: usize,
    /// Source + target tokens (padding excluded) per second of this step.
    pub tokens_per_s: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f32,
}

/// What the trainer tells its observer.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// Training starts (or resumes) at `step` with a model of `parameters`.
    Started {
        /// First step to run is `step + 1`.
        step: u64,
        /// Parameters.
        parameters: usize,
        /// Resumed from this checkpoint.
        resumed_from: Option<PathBuf>,
        /// Training records.
        records: usize,
    },
    /// A step finished.
    Step(StepReport),
    /// Validation loss.
    Validation {
        /// At step.
        step: u64,
        /// Loss.
        loss: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// At step.
        step: u64,
        /// Directory.
        dir: PathBuf,
    },
}

/// The end of a run.
pub struct TrainOutcome<B: Backend> {
    /// The trained model.
    pub model: Model<B>,
    /// Steps done in total.
    pub step: u64,
    /// Mean training tokens/s over this process's steps.
    pub tokens_per_s: f64,
    /// Last training loss.
    pub last_loss: f64,
}

fn non_finite(step: u64, e: ModelError) -> WorkerError {
    match e {
        ModelError::NonFinite(what) => WorkerError::Training(format!(
            "step {step}: {what}; stopping without writing a checkpoint (the last good one is kept). Try a lower --lr"
        )),
        other => other.into(),
    }
}

/// Trains on `backend`, reporting to `observer`.
pub fn train<B: Backend + Clone>(
    backend: B,
    opts: &TrainOptions,
    observer: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome<B>> {
    let data = Prepared::open(&opts.data)?;
    let specials = data.specials();
    let tokenizer_sha = data.manifest.tokenizer.sha256.clone();
    let vocab = data.manifest.tokenizer.vocab_size as usize;

    let (mut model, mut optimizer, mut cursor, seed, batch_tokens, resumed_from) = match opts
        .resume
        .then(|| checkpoint::load_latest(backend.clone(), &opts.run))
        .transpose()?
        .flatten()
    {
        Some(loaded) => {
            if loaded.state.tokenizer_sha256 != tokenizer_sha {
                return Err(WorkerError::Training(format!(
                    "{} was trained with another tokenizer than {} has; point --data at the data it was trained on",
                    loaded.dir.display(),
                    opts.data.display()
                )));
            }
            let s = &loaded.state;
            (loaded.model, loaded.optimizer, s.cursor, s.seed, s.batch_tokens, Some(loaded.dir))
        }
        None => {
            if checkpoint::has_checkpoints(&opts.run) {
                return Err(WorkerError::Training(format!("{} already has checkpoints: pass --resume to continue it, or choose another --run", opts.run.display())));
            }
            let mut config = Config::preset(&opts.preset, vocab)?;
            if let Some(p) = opts.dropout {
                config.dropout = p;
            }
            if let Some(p) = opts.positions {
                config.positions = p;
            }
            config.pad_id = specials.pad;
            let model = Model::new(backend, config, opts.seed)?;
            let optimizer = Optimizer::new(&model, opts.optimizer);
            (model, optimizer, Cursor::default(), opts.seed, opts.batch_tokens, None)
        }
    };
    if model.config.vocab != vocab {
        return Err(ModelError::Config(format!(
            "model vocabulary {} differs from the tokenizer's {vocab}",
            model.config.vocab
        ))
        .into());
    }
    let (records, _) = index_records(&data.train, model.config.max_len)?;
    let (valid_records, _) = if data.valid.is_empty() {
        (Vec::new(), 0)
    } else {
        index_records(&data.valid, model.config.max_len)?
    };
    observer(&TrainEvent::Started {
        step: optimizer.step,
        parameters: model.parameter_count(),
        resumed_from,
        records: records.len(),
    });

    let mut plan: (u64, Vec<Vec<RecordRef>>) =
        (cursor.epoch, epoch_plan(&records, seed, cursor.epoch, batch_tokens));
    let (mut total_tokens, mut total_time, mut last_loss) = (0usize, 0.0f64, f64::NAN);
    while optimizer.step < opts.steps {
        if cursor.batch as usize >= plan.1.len() {
            cursor = Cursor { epoch: cursor.epoch + 1, batch: 0 };
        }
        if plan.0 != cursor.epoch {
            plan = (cursor.epoch, epoch_plan(&records, seed, cursor.epoch, batch_tokens));
        }
        let batch_records = &plan.1[cursor.batch as usize];
        let batch = make_batch(&data.train, batch_records, specials);
        let started = Instant::now();
        let step = optimizer.step + 1;
        model.zero_grads();
        let stats = model.forward_backward(&batch, seed, step).map_err(|e| non_finite(step, e))?;
        let info = optimizer.update(&mut model).map_err(|e| non_finite(step, e))?;
        cursor.batch += 1;
        let seconds = started.elapsed().as_secs_f64();
        let real_tokens: usize = batch.src_lengths.iter().chain(&batch.tgt_lengths).sum();
        total_tokens += real_tokens;
        total_time += seconds;
        last_loss = stats.loss;
        let report = StepReport {
            step,
            epoch: cursor.epoch,
            loss: stats.loss,
            tokens: stats.tokens,
            tokens_per_s: real_tokens as f64 / seconds.max(1e-9),
            grad_norm: info.grad_norm,
            lr: info.lr,
        };
        tracing::info!(target: "chingu::train::step", step, epoch = cursor.epoch, loss = stats.loss, tokens = stats.tokens, tokens_per_s = report.tokens_per_s, grad_norm = info.grad_norm, lr = info.lr);
        observer(&TrainEvent::Step(report));

        if opts.eval_every > 0 && step % opts.eval_every == 0 && !valid_records.is_empty() {
            let loss = eval::teacher_forced(
                &model,
                &data.valid,
                &valid_records,
                specials,
                batch_tokens,
                opts.eval_batches,
            )?
            .loss;
            tracing::info!(target: "chingu::train::valid", step, valid_loss = loss);
            observer(&TrainEvent::Validation { step, loss });
        }
        if step % opts.checkpoint_every.max(1) == 0 || step == opts.steps {
            let state = TrainState {
                version: checkpoint::CHECKPOINT_VERSION,
                step,
                cursor,
                seed,
                batch_tokens,
                config: model.config.clone(),
                optimizer: optimizer.settings,
                tokenizer_sha256: tokenizer_sha.clone(),
                files: Default::default(),
            };
            let dir = checkpoint::save(
                &opts.run,
                &model,
                &optimizer,
                state,
                &data.tokenizer_path(),
                opts.keep,
            )?;
            tracing::info!(target: "chingu::train::checkpoint", step, dir = %dir.display());
            observer(&TrainEvent::Checkpoint { step, dir });
        }
    }
    Ok(TrainOutcome {
        step: optimizer.step,
        model,
        tokens_per_s: total_tokens as f64 / total_time.max(1e-9),
        last_loss,
    })
}
