//! The trainer: length-bucketed batches from prepared shards, AdamW, periodic validation and
//! checkpoints, exact resume — for one process (`chingu train`) or one rank of a data-parallel
//! job (`chingu launch`), through the same loop.
//!
//! Exactness: everything that shapes a step is a function of (seed, step, data cursor) and of
//! the tensors in the checkpoint — the batch plan is recomputed from the seed and epoch,
//! dropout masks are keyed by step — so a resumed run repeats the uninterrupted one bit for bit.
//!
//! Data parallelism: a step consumes a *group* of `world × accumulate` consecutive batches of
//! the epoch plan; rank r takes slots `r·accumulate .. (r+1)·accumulate`, so every record is
//! used exactly once per epoch across ranks and the cursor stays one number. Each slot's
//! gradient is scaled by its share of the group's target tokens (so the sum is the mean over the
//! whole group), slots are summed in order on a rank, then across ranks by the collective. Slot
//! k's dropout is keyed by (seed, step, k), whoever computes it. With two ranks the all-reduce
//! is one commutative addition, so 2 ranks × 1 slot and 1 rank × 2 slots give the same bits.
//!
//! The all-reduce overlaps backward in both of its forms ([`Comm`]): through host memory, the
//! last slot's finished stages are copied out and summed on a helper thread; on the device
//! (NCCL), each finished stage's gradient buffers are queued, in place, on the collective's own
//! stream, and the optimizer's work is ordered after them.

use std::path::PathBuf;
use std::time::Instant;

use chingu_corpus::batching::{epoch_plan, index_records, Cursor, RecordRef};
use chingu_kernels::gpu::ops::SAVE_PROBS_VAR;
use chingu_kernels::{Backend, BufRole};
use chingu_model::{Config, Model, ModelError, Optimizer, OptimizerSettings};

use crate::checkpoint::{self, TrainState};
use crate::collective::{Collective, CollectiveError, Solo};
use crate::data::{make_batch, Prepared};
use crate::eval;
use crate::{Result, WorkerError};
use chingu_kernels::gpu::collective::DeviceCollective;

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
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Validation loss every this many steps (0: never).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoints to keep.
    pub keep: usize,
    /// Continue from the run's latest checkpoint.
    pub resume: bool,
    /// Continue from exactly this step's checkpoint (a launched job's coordinator names it,
    /// so every rank starts from the same one); overrides `resume`.
    pub resume_step: Option<u64>,
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
    /// Seconds the gradient all-reduce worked: on its helper thread (host collectives) or on
    /// the device, group by group (NCCL); 0 without a collective.
    pub allreduce_s: f64,
    /// Seconds of it not hidden behind the backward pass (the step waited for them).
    pub allreduce_exposed_s: f64,
    /// Seconds of the whole step.
    pub step_s: f64,
    /// (bytes in use, bytes in all) of the device's memory after the step, where the backend
    /// can tell (a GPU).
    pub device_memory: Option<(usize, usize)>,
}

/// What the ranks may ask for at a step boundary; summed across ranks, so all act together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    /// Write a checkpoint after this step.
    pub checkpoint: bool,
    /// Checkpoint after this step, then stop.
    pub stop: bool,
}

/// How a rank's gradients are summed with the other ranks'.
pub enum Comm<'a> {
    /// Through host memory: each finished stage is copied out and summed by the
    /// [`Collective`] on a helper thread (`Solo` for one process; the TCP ring for CPU ranks
    /// and for GPU ranks without NCCL).
    Host(&'a mut (dyn Collective + 'static)),
    /// In place on the device (NCCL): the backend's fp32 gradient buffers, queued stage by
    /// stage on the collective's own stream. Used even with one rank when given.
    Device(&'a mut (dyn DeviceCollective + 'static)),
}

/// How this process takes part in training: its collective, its slots per step, where control
/// requests come from and how checkpoints are written.
pub struct Parallel<'a, B: Backend> {
    /// Sums gradients across ranks.
    pub collective: Comm<'a>,
    /// Micro-batches per rank per step (gradient accumulation).
    pub accumulate: usize,
    /// This rank's requests, asked once per step.
    pub requests: &'a mut dyn FnMut() -> Requests,
    /// Writes a checkpoint of the given state; returns where it went (None on ranks that do
    /// not write).
    pub checkpoint: &'a mut CheckpointWriter<'a, B>,
}

/// Writes one checkpoint (see [`Parallel::checkpoint`]).
pub type CheckpointWriter<'a, B> =
    dyn FnMut(&Model<B>, &Optimizer<B>, TrainState) -> Result<Option<PathBuf>> + 'a;

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
    /// True when training stopped on request before `steps`.
    pub stopped: bool,
}

fn non_finite(step: u64, e: ModelError) -> WorkerError {
    match e {
        ModelError::NonFinite(what) => WorkerError::Training(format!(
            "step {step}: {what}; stopping without writing a checkpoint (the last good one is kept). Try a lower learning rate (--lr, or train.lr in a manifest)"
        )),
        other => other.into(),
    }
}

/// Trains on `backend` in this process alone, reporting to `observer`; checkpoints go to
/// `opts.run` directly.
pub fn train<B: Backend + Clone>(
    backend: B,
    opts: &TrainOptions,
    observer: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome<B>> {
    let data = Prepared::open(&opts.data)?;
    let tokenizer = data.tokenizer_path();
    let mut save = |model: &Model<B>, optimizer: &Optimizer<B>, state: TrainState| {
        checkpoint::save(&opts.run, model, optimizer, state, &tokenizer, opts.keep).map(Some)
    };
    let parallel = Parallel {
        collective: Comm::Host(&mut Solo),
        accumulate: 1,
        requests: &mut Requests::default,
        checkpoint: &mut save,
    };
    train_parallel(backend, opts, parallel, observer)
}

/// Trains on `backend` as one rank of `parallel`, reporting to `observer`. A device that
/// fails inside a step (a GPU out of memory) ends the run with [`WorkerError::Device`] instead
/// of a panic; checkpoints already written stay good.
pub fn train_parallel<B: Backend + Clone>(
    backend: B,
    opts: &TrainOptions,
    parallel: Parallel<'_, B>,
    observer: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome<B>> {
    chingu_kernels::catch_device_failure(|| train_unguarded(backend, opts, parallel, observer))
        .unwrap_or_else(|failure| {
            let advice = if failure.out_of_memory {
                format!(
                    " — this batch does not fit on the GPU: lower the batch ({} tokens now: \
                     --batch-tokens, or train.batch_tokens in a launch manifest); raising \
                     train.accumulate keeps the tokens per optimizer step. Where attention \
                     runs through cuBLASLt products (heads wider than 64 over long sequences, \
                     or CHINGU_ATTN=gemm), {}=0 also frees the softmax it keeps for backward \
                     (2 bytes a score, recomputed instead)",
                    opts.batch_tokens, SAVE_PROBS_VAR
                )
            } else {
                String::new()
            };
            Err(WorkerError::Device { failure, advice })
        })
}

/// Logs the device's memory use after the first step and whenever it has grown by a
/// twentieth since (a longer batch): how much room the batch leaves. Returns what was last
/// logged.
fn log_device_memory(memory: Option<(usize, usize)>, step: u64, last: usize) -> usize {
    let Some((in_use, total)) = memory else { return last };
    if last > 0 && in_use <= last + last / 20 {
        return last;
    }
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    tracing::info!(
        target: "chingu::train::memory",
        step,
        in_use,
        total,
        "device memory: {:.2} of {:.2} GiB in use after step {step} ({:.0}%)",
        gib(in_use),
        gib(total),
        100.0 * in_use as f64 / total.max(1) as f64
    );
    in_use
}

fn train_unguarded<B: Backend + Clone>(
    backend: B,
    opts: &TrainOptions,
    parallel: Parallel<'_, B>,
    observer: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome<B>> {
    let Parallel { mut collective, accumulate, requests, checkpoint: write_checkpoint } = parallel;
    let (rank, world) = match &collective {
        Comm::Host(c) => (c.rank(), c.world_size()),
        Comm::Device(c) => (c.rank(), c.world_size()),
    };
    let accumulate = accumulate.max(1);
    let group = world * accumulate;
    let data = Prepared::open(&opts.data)?;
    let specials = data.specials();
    let tokenizer_sha = data.manifest.tokenizer.sha256.clone();
    let vocab = data.manifest.tokenizer.vocab_size as usize;

    let loaded = match opts.resume_step {
        Some(step) => {
            Some(checkpoint::load_dir(backend.clone(), &checkpoint::step_dir(&opts.run, step))?)
        }
        None if opts.resume => checkpoint::load_latest(backend.clone(), &opts.run)?,
        None => None,
    };
    let (mut model, mut optimizer, mut cursor, seed, batch_tokens, resumed_from) = match loaded {
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
    let mut spare_grads: Vec<B::Buf> = Vec::new();
    let stages = model.backward_stages();
    let mut stopped = false;
    // Requests that arrived on a step an fp16 overflow skipped, honoured at the next update.
    let mut carried = Requests::default();
    // Device memory last logged (a GPU's allocator keeps each step's peak, so this only grows).
    let mut memory_logged = 0usize;
    while optimizer.step < opts.steps {
        if cursor.batch as usize >= plan.1.len() {
            cursor = Cursor { epoch: cursor.epoch + 1, batch: 0 };
        }
        if plan.0 != cursor.epoch {
            plan = (cursor.epoch, epoch_plan(&records, seed, cursor.epoch, batch_tokens));
        }
        let first = cursor.batch as usize;
        let slots = &plan.1[first..(first + group).min(plan.1.len())];
        let group_targets: usize = slots.iter().flatten().map(|r| r.tgt_len as usize).sum();
        let started = Instant::now();
        let step = optimizer.step + 1;
        let (mut weighted_loss, mut real_tokens) = (0.0f64, 0usize);
        let (requested, comm) = std::thread::scope(|scope| -> Result<(Requests, CommStats)> {
            // With more than one rank, the last slot's gradients leave for the all-reduce stage
            // by stage while the rest of its backward pass runs.
            let mut reducer = match &mut collective {
                Comm::Host(c) if world > 1 => {
                    Some(StepReducer::Host(Reducer::start(scope, &mut **c, stages.clone())))
                }
                Comm::Host(_) => None,
                Comm::Device(c) => Some(StepReducer::Device(DeviceReducer {
                    collective: &mut **c,
                    stages: &stages,
                    error: None,
                })),
            };
            for i in 0..accumulate {
                let slot = rank * accumulate + i;
                if i > 0 {
                    // Keep the slots so far aside; this slot's gradient is computed fresh.
                    if spare_grads.is_empty() {
                        spare_grads = model
                            .grads
                            .iter()
                            .map(|g| {
                                model.backend.zeros_as(model.backend.len(g), BufRole::Gradient)
                            })
                            .collect();
                    }
                    std::mem::swap(&mut spare_grads, &mut model.grads);
                }
                model.zero_grads();
                let records = slots.get(slot);
                let slot_targets: usize =
                    records.into_iter().flatten().map(|r| r.tgt_len as usize).sum();
                // Each slot's share of the group's targets, so the sum is the group's mean.
                let share = (group > 1 && records.is_some())
                    .then(|| (slot_targets as f64 / group_targets as f64) as f32);
                let earlier = (i > 0).then_some(&spare_grads);
                let stream = if i + 1 == accumulate { reducer.as_mut() } else { None };
                let mut finish_stage =
                    FinishStage { stages: &stages, share, earlier, reducer: stream };
                match records {
                    Some(records) => {
                        let batch = make_batch(&data.train, records, specials);
                        let slot_seed = if slot == 0 {
                            seed
                        } else {
                            seed ^ chingu_kernels::rng::mix(slot as u64)
                        };
                        let stats = model
                            .forward_backward_staged(
                                &batch,
                                slot_seed,
                                step,
                                &mut |stage, backend, grads| {
                                    finish_stage.run(stage, backend, grads)
                                },
                            )
                            .map_err(|e| non_finite(step, e))?;
                        debug_assert_eq!(stats.tokens, slot_targets);
                        weighted_loss += stats.loss * stats.tokens as f64;
                        real_tokens +=
                            batch.src_lengths.iter().chain(&batch.tgt_lengths).sum::<usize>();
                    }
                    None => {
                        // No batch left for this slot at the end of the epoch: zeros (plus the
                        // earlier slots) still take part, stage by stage.
                        for stage in 0..stages.len() {
                            finish_stage.run(stage, &model.backend, &mut model.grads);
                        }
                    }
                }
            }
            let local = (requests)();
            match reducer {
                None => Ok((local, CommStats::default())),
                Some(reducer) => {
                    // The loss travels as two f32s (high and low part): each rank's value is
                    // exact, their sum is rounded once in f32 (~1e-7 relative), which is plenty
                    // for a reported loss and touches no weight.
                    let high = weighted_loss as f32;
                    let control = [
                        high,
                        (weighted_loss - f64::from(high)) as f32,
                        f32::from(u8::from(local.checkpoint)),
                        f32::from(u8::from(local.stop)),
                    ];
                    let (summed, comm) = reducer
                        .finish(&mut model, &control)
                        .map_err(|e| WorkerError::Collective(format!("step {step}: {e}")))?;
                    weighted_loss = f64::from(summed[0]) + f64::from(summed[1]);
                    Ok((Requests { checkpoint: summed[2] > 0.0, stop: summed[3] > 0.0 }, comm))
                }
            }
        })?;
        let loss = weighted_loss / group_targets.max(1) as f64;
        let info = optimizer.update(&mut model).map_err(|e| non_finite(step, e))?;
        cursor.batch += slots.len() as u64;
        let requested = Requests {
            checkpoint: requested.checkpoint || carried.checkpoint,
            stop: requested.stop || carried.stop,
        };
        if info.skipped {
            // fp16 gradients overflowed: no update was made (the batch is consumed, the step
            // number is not) and the loss scale was halved. Every rank sees the same summed
            // gradients, so all skip together; checkpoint and stop requests wait for the next
            // update (each skip halves the scale, so one comes soon).
            let scale = info.loss_scale.unwrap_or(f32::NAN);
            tracing::warn!(target: "chingu::train::overflow", step, loss_scale = scale, "gradient overflow at loss scale {scale}: update skipped, scale halved");
            carried = requested;
            continue;
        }
        carried = Requests::default();
        let seconds = started.elapsed().as_secs_f64();
        total_tokens += real_tokens;
        total_time += seconds;
        last_loss = loss;
        let report = StepReport {
            step,
            epoch: cursor.epoch,
            loss,
            tokens: group_targets,
            tokens_per_s: real_tokens as f64 / seconds.max(1e-9),
            grad_norm: info.grad_norm,
            lr: info.lr,
            allreduce_s: comm.reduce_s,
            allreduce_exposed_s: comm.exposed_s,
            step_s: seconds,
            device_memory: model.backend.device_memory(),
        };
        tracing::info!(target: "chingu::train::step", step, epoch = cursor.epoch, loss, tokens = group_targets, tokens_per_s = report.tokens_per_s, grad_norm = info.grad_norm, lr = info.lr, allreduce_s = comm.reduce_s, allreduce_exposed_s = comm.exposed_s, step_s = seconds);
        let memory = report.device_memory;
        observer(&TrainEvent::Step(report));
        memory_logged = log_device_memory(memory, step, memory_logged);

        if rank == 0
            && opts.eval_every > 0
            && step % opts.eval_every == 0
            && !valid_records.is_empty()
        {
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
        let scheduled = opts.checkpoint_every > 0 && step % opts.checkpoint_every == 0;
        if scheduled || step == opts.steps || requested.checkpoint || requested.stop {
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
                loss_scaler: optimizer.scaler,
            };
            if let Some(dir) = (write_checkpoint)(&model, &optimizer, state)? {
                tracing::info!(target: "chingu::train::checkpoint", step, dir = %dir.display());
                observer(&TrainEvent::Checkpoint { step, dir });
            }
        }
        if requested.stop {
            stopped = true;
            break;
        }
    }
    Ok(TrainOutcome {
        step: optimizer.step,
        model,
        tokens_per_s: total_tokens as f64 / total_time.max(1e-9),
        last_loss,
        stopped,
    })
}

/// Floats per all-reduce message sent during backward: large enough to amortise a round trip,
/// small enough that the first leaves early.
const OVERLAP_BUCKET: usize = 1 << 18;

/// Time spent in the all-reduce of one step.
#[derive(Debug, Clone, Copy, Default)]
struct CommStats {
    /// Seconds the collective worked (its thread's time, or the device's per-group time).
    reduce_s: f64,
    /// Seconds the step waited for it after the backward pass.
    exposed_s: f64,
}

/// What happens to a stage's gradients when backward finishes it: scaled to the slot's
/// share, added to the earlier slots, and — for the last slot of a rank — handed to the
/// all-reduce.
struct FinishStage<'a, 'r, 'scope, 'd, B: Backend> {
    stages: &'a [Vec<usize>],
    share: Option<f32>,
    earlier: Option<&'a Vec<B::Buf>>,
    reducer: Option<&'r mut StepReducer<'scope, 'd>>,
}

impl<B: Backend> FinishStage<'_, '_, '_, '_, B> {
    fn run(&mut self, stage: usize, backend: &B, grads: &mut [B::Buf]) {
        for &i in &self.stages[stage] {
            if let Some(share) = self.share {
                backend.scale(&mut grads[i], share);
            }
            if let Some(earlier) = self.earlier {
                backend.add_assign(&mut grads[i], &earlier[i]);
            }
        }
        if let Some(reducer) = self.reducer.as_deref_mut() {
            reducer.stage_ready(stage, backend, grads);
        }
    }
}

/// The all-reduce of one step, in either of its forms (see [`Comm`]).
enum StepReducer<'scope, 'd> {
    Host(Reducer<'scope>),
    Device(DeviceReducer<'d>),
}

impl StepReducer<'_, '_> {
    fn stage_ready<B: Backend>(&mut self, stage: usize, backend: &B, grads: &[B::Buf]) {
        match self {
            StepReducer::Host(r) => r.stage_ready(stage, backend, grads),
            StepReducer::Device(r) => r.stage_ready(stage, backend, grads),
        }
    }

    fn finish<B: Backend>(
        self,
        model: &mut Model<B>,
        control: &[f32],
    ) -> std::result::Result<(Vec<f32>, CommStats), CollectiveError> {
        match self {
            StepReducer::Host(r) => r.finish(model, control),
            StepReducer::Device(r) => r.finish(model, control),
        }
    }
}

/// Sums gradients in place on the device: each finished stage's buffers are queued as one
/// group on the collective's stream while backward goes on; `finish` queues the control values
/// last and orders the optimizer after every sum.
struct DeviceReducer<'d> {
    collective: &'d mut dyn DeviceCollective,
    stages: &'d [Vec<usize>],
    /// The first failure, reported by `finish` (queueing happens inside backward's callback).
    error: Option<String>,
}

impl DeviceReducer<'_> {
    fn stage_ready<B: Backend>(&mut self, stage: usize, backend: &B, grads: &[B::Buf]) {
        if self.error.is_some() {
            return;
        }
        let buffers: Option<Vec<(u64, usize)>> =
            self.stages[stage].iter().map(|&i| backend.device_f32(&grads[i])).collect();
        let Some(buffers) = buffers else {
            self.error = Some("a device collective was given gradients that are not fp32 device buffers (is this rank on the CPU?)".into());
            return;
        };
        // SAFETY: the stage's gradients are final (backward reports a stage only then) and
        // nothing writes or frees them before `finish` joins: the optimizer runs after it.
        if let Err(e) = unsafe { self.collective.queue_all_reduce(&buffers) } {
            self.error = Some(e.to_string());
        }
    }

    fn finish<B: Backend>(
        self,
        model: &mut Model<B>,
        control: &[f32],
    ) -> std::result::Result<(Vec<f32>, CommStats), CollectiveError> {
        let backward_done = Instant::now();
        if let Some(e) = self.error {
            return Err(CollectiveError::Broken(e));
        }
        let broken = |e: chingu_kernels::gpu::GpuError| CollectiveError::Broken(e.to_string());
        let control_buf = model.backend.upload_f32_as(control, BufRole::Gradient);
        let address = model.backend.device_f32(&control_buf).ok_or_else(|| {
            CollectiveError::Broken(
                "the backend has no device buffers for the control values".into(),
            )
        })?;
        // SAFETY: `control_buf` lives until its sum is read back below.
        unsafe { self.collective.queue_all_reduce(&[address]) }.map_err(broken)?;
        self.collective.join().map_err(broken)?;
        // Reading the control values back waits for every sum of the step.
        let summed = model.backend.to_f32(&control_buf);
        let exposed_s = backward_done.elapsed().as_secs_f64();
        let reduce_s = self.collective.last_seconds().unwrap_or(exposed_s);
        Ok((summed, CommStats { reduce_s, exposed_s }))
    }
}

/// A batch of parameters' gradients, flattened, on its way through the all-reduce.
struct Bucket {
    params: Vec<usize>,
    data: Vec<f32>,
    seconds: f64,
}

/// All-reduces gradients on a helper thread while backward goes on: stages' gradients are
/// packed into buckets in stage order (the same on every rank, so every rank sums the same
/// messages) and reduced one after another.
struct Reducer<'scope> {
    stages: Vec<Vec<usize>>,
    pending: Bucket,
    to_comm: Option<std::sync::mpsc::Sender<Bucket>>,
    results:
        std::sync::mpsc::Receiver<std::result::Result<Bucket, crate::collective::CollectiveError>>,
    helper: std::thread::ScopedJoinHandle<'scope, ()>,
    sent: usize,
}

impl<'scope> Reducer<'scope> {
    fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        collective: &'scope mut dyn Collective,
        stages: Vec<Vec<usize>>,
    ) -> Self {
        let (to_comm, inbox) = std::sync::mpsc::channel::<Bucket>();
        let (outbox, results) = std::sync::mpsc::channel();
        let helper = scope.spawn(move || {
            for mut bucket in inbox {
                let started = Instant::now();
                let result = collective.all_reduce_sum(&mut bucket.data);
                bucket.seconds = started.elapsed().as_secs_f64();
                let failed = result.is_err();
                let _ = outbox.send(result.map(|()| bucket));
                if failed {
                    return;
                }
            }
        });
        Reducer {
            stages,
            pending: Bucket { params: Vec::new(), data: Vec::new(), seconds: 0.0 },
            to_comm: Some(to_comm),
            results,
            helper,
            sent: 0,
        }
    }

    fn stage_ready<B: Backend>(&mut self, stage: usize, backend: &B, grads: &[B::Buf]) {
        for &i in &self.stages[stage] {
            self.pending.params.push(i);
            self.pending.data.extend(backend.to_f32(&grads[i]));
        }
        if self.pending.data.len() >= OVERLAP_BUCKET || stage + 1 == self.stages.len() {
            self.send();
        }
    }

    fn send(&mut self) {
        if !self.pending.params.is_empty() || !self.pending.data.is_empty() {
            let bucket = std::mem::replace(
                &mut self.pending,
                Bucket { params: Vec::new(), data: Vec::new(), seconds: 0.0 },
            );
            if let Some(to_comm) = &self.to_comm {
                let _ = to_comm.send(bucket);
                self.sent += 1;
            }
        }
    }

    /// Sends `control` last, waits for every bucket and writes the sums back into the
    /// gradients; returns the summed control values and the step's communication times.
    fn finish<B: Backend>(
        mut self,
        model: &mut Model<B>,
        control: &[f32],
    ) -> std::result::Result<(Vec<f32>, CommStats), CollectiveError> {
        let backward_done = Instant::now();
        self.send();
        self.pending.data.extend_from_slice(control);
        self.send();
        drop(self.to_comm.take());
        let mut stats = CommStats::default();
        let mut control_sum = Vec::new();
        for _ in 0..self.sent {
            let bucket = match self.results.recv() {
                Ok(result) => result?,
                Err(_) => break,
            };
            stats.reduce_s += bucket.seconds;
            if bucket.params.is_empty() {
                control_sum = bucket.data;
                continue;
            }
            let mut offset = 0;
            for &i in &bucket.params {
                let n = model.backend.len(&model.grads[i]);
                model.grads[i] = model
                    .backend
                    .upload_f32_as(&bucket.data[offset..offset + n], BufRole::Gradient);
                offset += n;
            }
        }
        let _ = self.helper.join();
        if control_sum.len() != control.len() {
            return Err(crate::collective::CollectiveError::Broken(
                "the all-reduce thread stopped before the step's last message".into(),
            ));
        }
        stats.exposed_s = backward_done.elapsed().as_secs_f64();
        Ok((control_sum, stats))
    }
}
