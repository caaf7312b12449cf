//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` with `model.safetensors`,
//! `optimizer.safetensors` (AdamW moments as `exp_avg.<param>` / `exp_avg_sq.<param>`, f32),
//! `tokenizer.json` and `state.json` (step, data cursor, seed, config, optimizer settings,
//! tokenizer hash and the sha256 of every other file). `RUN/checkpoints/LATEST` names the
//! newest complete one.
//!
//! Durability: a checkpoint is built in `step-N.partial/`, every file fsynced, the directory
//! renamed, then LATEST replaced by rename — so LATEST only ever names a complete checkpoint.
//! Equal weights give identical bytes (sorted tensor names, no timestamps).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use chingu_corpus::batching::Cursor;
use chingu_corpus::durable::{sha256_file, write_synced};
use chingu_kernels::{Backend, BufRole};
use chingu_model::{Config, Layout, LossScaler, Model, Optimizer, OptimizerSettings};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::{Result, WorkerError};

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
const STATE_FILE: &str = "state.json";
const LATEST: &str = "LATEST";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Position in the data stream.
    pub cursor: Cursor,
    /// The run's seed (initialisation, data order, dropout).
    pub seed: u64,
    /// Tokens per batch (part of the data order).
    pub batch_tokens: usize,
    /// The model configuration.
    pub config: Config,
    /// Optimizer settings.
    pub optimizer: OptimizerSettings,
    /// sha256 of the tokenizer the model was trained with.
    pub tokenizer_sha256: String,
    /// sha256 of every other file in the checkpoint.
    pub files: BTreeMap<String, String>,
    /// Dynamic loss scaling state of an fp16 (GPU) run; absent for the CPU. A CPU resume of a
    /// GPU checkpoint ignores it, a GPU resume of a CPU one starts from the default scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// A checkpoint read back.
pub struct Loaded<B: Backend> {
    /// Where it was.
    pub dir: PathBuf,
    /// Its state.
    pub state: TrainState,
    /// The model.
    pub model: Model<B>,
    /// The optimizer (moments and step).
    pub optimizer: Optimizer<B>,
}

/// A checkpoint's model alone (to answer or score: no optimizer moments read or uploaded).
pub struct LoadedModel<B: Backend> {
    /// Where it was.
    pub dir: PathBuf,
    /// Its state.
    pub state: TrainState,
    /// The model.
    pub model: Model<B>,
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The directory of step `step`'s checkpoint.
pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(step_name(step))
}

/// The staging directory rank 0 writes step `step`'s parts into.
pub fn staging_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("{}.partial", step_name(step)))
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn tensors_to_bytes(
    names: &[String],
    shapes: &[Vec<usize>],
    values: &[Vec<f32>],
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        values.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> = names
        .iter()
        .zip(shapes)
        .zip(&bytes)
        .map(|((n, s), b)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map_err(|e| WorkerError::Checkpoint(e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "chingu".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| WorkerError::Checkpoint(e.to_string()))
}

fn tensors_from_file(
    path: &Path,
    names: &[String],
    shapes: &[Vec<usize>],
) -> Result<Vec<Vec<f64>>> {
    let bytes = fs::read(path).map_err(|e| WorkerError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| WorkerError::Checkpoint(format!("{}: {e}", path.display())))?;
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let view = st.tensor(name).map_err(|_| {
                WorkerError::Checkpoint(format!("{}: missing tensor {name}", path.display()))
            })?;
            if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(WorkerError::Checkpoint(format!(
                    "{}: {name} is {:?} {:?}, expected F32 {shape:?}",
                    path.display(),
                    view.dtype(),
                    view.shape()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect())
        })
        .collect()
}

/// Writes a checkpoint for `state.step` and moves LATEST to it; keeps the newest `keep`.
pub fn save<B: Backend>(
    run: &Path,
    model: &Model<B>,
    optimizer: &Optimizer<B>,
    state: TrainState,
    tokenizer: &Path,
    keep: usize,
) -> Result<PathBuf> {
    let partial = write_parts(run, state.step, model, optimizer, tokenizer)?;
    commit(run, &partial.dir, state, &partial.parts, keep)
}

/// One file of a checkpoint as written: name inside the directory, sha256, size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// File name.
    pub name: String,
    /// Hex sha256.
    pub sha256: String,
    /// Bytes.
    pub bytes: u64,
}

/// A checkpoint's files written to its staging directory, not yet committed.
#[derive(Debug, Clone)]
pub struct Staged {
    /// `RUN/checkpoints/step-N.partial`.
    pub dir: PathBuf,
    /// The files in it.
    pub parts: Vec<Part>,
}

/// Writes (and fsyncs) the model, optimizer and tokenizer files of step `step` into
/// `RUN/checkpoints/step-N.partial/` — the part a training process contributes; [`commit`]
/// finishes the checkpoint.
pub fn write_parts<B: Backend>(
    run: &Path,
    step: u64,
    model: &Model<B>,
    optimizer: &Optimizer<B>,
    tokenizer: &Path,
) -> Result<Staged> {
    let root = checkpoints_dir(run);
    fs::create_dir_all(&root).map_err(|e| WorkerError::io(&root, e))?;
    let partial = root.join(format!("{}.partial", step_name(step)));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| WorkerError::io(&partial, e))?;
    }
    fs::create_dir(&partial).map_err(|e| WorkerError::io(&partial, e))?;

    let names: Vec<String> = model.layout.specs.iter().map(|s| s.name.clone()).collect();
    let shapes: Vec<Vec<usize>> = model.layout.specs.iter().map(|s| s.shape.clone()).collect();
    let params: Vec<Vec<f32>> = model.params.iter().map(|p| model.backend.to_f32(p)).collect();
    write_synced(&partial.join(MODEL_FILE), &tensors_to_bytes(&names, &shapes, &params)?)
        .map_err(WorkerError::from)?;

    let mut opt_names = Vec::new();
    let mut opt_shapes = Vec::new();
    let mut opt_values = Vec::new();
    for (i, name) in names.iter().enumerate() {
        opt_names.push(format!("exp_avg.{name}"));
        opt_shapes.push(shapes[i].clone());
        opt_values.push(model.backend.to_f32(&optimizer.exp_avg[i]));
        opt_names.push(format!("exp_avg_sq.{name}"));
        opt_shapes.push(shapes[i].clone());
        opt_values.push(model.backend.to_f32(&optimizer.exp_avg_sq[i]));
    }
    write_synced(
        &partial.join(OPTIMIZER_FILE),
        &tensors_to_bytes(&opt_names, &opt_shapes, &opt_values)?,
    )
    .map_err(WorkerError::from)?;
    let tokenizer_bytes = fs::read(tokenizer).map_err(|e| WorkerError::io(tokenizer, e))?;
    write_synced(&partial.join(TOKENIZER_FILE), &tokenizer_bytes).map_err(WorkerError::from)?;

    let mut parts = Vec::new();
    for name in [MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE] {
        let path = partial.join(name);
        let bytes = fs::metadata(&path).map_err(|e| WorkerError::io(&path, e))?.len();
        let sha256 = sha256_file(&path).map_err(WorkerError::from)?;
        parts.push(Part { name: name.to_string(), sha256, bytes });
    }
    Ok(Staged { dir: partial, parts })
}

/// Finishes a staged checkpoint: re-hashes every part against what its writer reported,
/// writes `state.json` with the hashes, renames the directory to `step-N`, moves LATEST to it
/// and keeps the newest `keep`. A part that does not match is an error naming it.
pub fn commit(
    run: &Path,
    partial: &Path,
    mut state: TrainState,
    parts: &[Part],
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    let name = step_name(state.step);
    let final_dir = root.join(&name);
    state.files.clear();
    for part in parts {
        let path = partial.join(&part.name);
        let sha = sha256_file(&path).map_err(WorkerError::from)?;
        let bytes = fs::metadata(&path).map_err(|e| WorkerError::io(&path, e))?.len();
        if sha != part.sha256 || bytes != part.bytes {
            return Err(WorkerError::Checkpoint(format!(
                "{}: {bytes} bytes with sha256 {sha}, but its writer reported {} bytes with {}",
                path.display(),
                part.bytes,
                part.sha256
            )));
        }
        state.files.insert(part.name.clone(), sha);
    }
    let mut json =
        serde_json::to_string_pretty(&state).map_err(|e| WorkerError::Checkpoint(e.to_string()))?;
    json.push('\n');
    write_synced(&partial.join(STATE_FILE), json.as_bytes()).map_err(WorkerError::from)?;
    sync_dir(partial)?;

    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| WorkerError::io(&final_dir, e))?;
    }
    fs::rename(partial, &final_dir).map_err(|e| WorkerError::io(&final_dir, e))?;
    sync_dir(&root)?;
    let latest_tmp = root.join(format!("{LATEST}.tmp"));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes()).map_err(WorkerError::from)?;
    fs::rename(&latest_tmp, root.join(LATEST)).map_err(|e| WorkerError::io(&root, e))?;
    sync_dir(&root)?;

    // Retention: the newest `keep` complete checkpoints stay.
    let mut steps = list_steps(&root)?;
    steps.sort_unstable();
    let excess = steps.len().saturating_sub(keep.max(1));
    for &old in &steps[..excess] {
        let dir = root.join(step_name(old));
        fs::remove_dir_all(&dir).map_err(|e| WorkerError::io(&dir, e))?;
    }
    Ok(final_dir)
}

fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| WorkerError::io(path, e))?;
    let _ = path;
    Ok(())
}

fn list_steps(root: &Path) -> Result<Vec<u64>> {
    let mut steps = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
        Err(e) => return Err(WorkerError::io(root, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| WorkerError::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            steps.push(step);
        }
    }
    Ok(steps)
}

/// The step LATEST names, if any.
pub fn latest_step(run: &Path) -> Option<u64> {
    let name = fs::read_to_string(checkpoints_dir(run).join(LATEST)).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

/// True when the run has at least one checkpoint directory.
pub fn has_checkpoints(run: &Path) -> bool {
    list_steps(&checkpoints_dir(run)).map(|s| !s.is_empty()).unwrap_or(false)
}

/// Reads and verifies one checkpoint directory.
pub fn load_dir<B: Backend>(backend: B, dir: &Path) -> Result<Loaded<B>> {
    let LoadedModel { dir, state, model } = read_dir(backend, dir, true)?;
    let layout = Layout::new(&state.config);
    let opt_names: Vec<String> = layout
        .specs
        .iter()
        .flat_map(|s| [format!("exp_avg.{}", s.name), format!("exp_avg_sq.{}", s.name)])
        .collect();
    let opt_shapes: Vec<Vec<usize>> =
        layout.specs.iter().flat_map(|s| [s.shape.clone(), s.shape.clone()]).collect();
    let moments = tensors_from_file(&dir.join(OPTIMIZER_FILE), &opt_names, &opt_shapes)?;
    let mut optimizer = Optimizer::new(&model, state.optimizer);
    for (i, pair) in moments.chunks(2).enumerate() {
        optimizer.exp_avg[i] = model.backend.upload_f64_as(&pair[0], BufRole::OptimizerState);
        optimizer.exp_avg_sq[i] = model.backend.upload_f64_as(&pair[1], BufRole::OptimizerState);
    }
    optimizer.step = state.step;
    if let Some(scaler) = state.loss_scaler {
        optimizer.set_scaler(&model, scaler);
    }
    Ok(Loaded { dir, state, model, optimizer })
}

/// Reads and verifies one checkpoint directory's state and model (the optimizer file's
/// checksum too when `with_optimizer`: it is about to be read).
fn read_dir<B: Backend>(backend: B, dir: &Path, with_optimizer: bool) -> Result<LoadedModel<B>> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(|e| WorkerError::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| WorkerError::Checkpoint(format!("{}: {e}", state_path.display())))?;
    if state.version != CHECKPOINT_VERSION {
        return Err(WorkerError::Checkpoint(format!(
            "{}: checkpoint version {}, this chingu reads {CHECKPOINT_VERSION}",
            state_path.display(),
            state.version
        )));
    }
    for (file, expected) in &state.files {
        if file == OPTIMIZER_FILE && !with_optimizer {
            continue;
        }
        let path = dir.join(file);
        let actual = sha256_file(&path).map_err(WorkerError::from)?;
        if &actual != expected {
            return Err(WorkerError::Checkpoint(format!(
                "{}: checksum mismatch (file damaged or truncated)",
                path.display()
            )));
        }
    }
    state.config.validate().map_err(WorkerError::from)?;
    let layout = Layout::new(&state.config);
    let names: Vec<String> = layout.specs.iter().map(|s| s.name.clone()).collect();
    let shapes: Vec<Vec<usize>> = layout.specs.iter().map(|s| s.shape.clone()).collect();
    let values = tensors_from_file(&dir.join(MODEL_FILE), &names, &shapes)?;
    let model =
        Model::from_values(backend, state.config.clone(), values).map_err(WorkerError::from)?;
    Ok(LoadedModel { dir: dir.to_path_buf(), state, model })
}

/// Loads the checkpoint LATEST names; if it fails verification, falls back to the newest older
/// one that passes, logging why. `Ok(None)` when the run has no checkpoint.
pub fn load_latest<B: Backend + Clone>(backend: B, run: &Path) -> Result<Option<Loaded<B>>> {
    first_usable(run, |dir| load_dir(backend.clone(), dir))
}

/// [`load_latest`]'s model alone, for answering and scoring: the optimizer moments are neither
/// read nor put on the device.
pub fn load_latest_model<B: Backend + Clone>(
    backend: B,
    run: &Path,
) -> Result<Option<LoadedModel<B>>> {
    first_usable(run, |dir| read_dir(backend.clone(), dir, false))
}

/// The first checkpoint of `run` that `load` accepts: LATEST's, then the others newest first,
/// logging each one skipped and why.
fn first_usable<T>(run: &Path, load: impl Fn(&Path) -> Result<T>) -> Result<Option<T>> {
    let root = checkpoints_dir(run);
    let mut steps = list_steps(&root)?;
    if steps.is_empty() {
        return Ok(None);
    }
    steps.sort_unstable_by(|a, b| b.cmp(a));
    let latest = fs::read_to_string(root.join(LATEST)).ok().map(|s| s.trim().to_string());
    // LATEST first, then the others newest first.
    let mut order: Vec<String> = latest.iter().cloned().collect();
    order.extend(steps.iter().map(|&s| step_name(s)).filter(|n| Some(n) != latest.as_ref()));
    let mut failures = Vec::new();
    for name in order {
        let dir = root.join(&name);
        match load(&dir) {
            Ok(loaded) => {
                if !failures.is_empty() {
                    tracing::warn!(checkpoint = %dir.display(), skipped = ?failures, "fell back to an older checkpoint");
                }
                return Ok(Some(loaded));
            }
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), error = %e, "checkpoint unusable");
                failures.push(e.to_string());
            }
        }
    }
    Err(WorkerError::Checkpoint(format!(
        "no usable checkpoint in {}: {}",
        root.display(),
        failures.join("; ")
    )))
}
