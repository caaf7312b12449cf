//! Job manifests: the TOML file `chingu launch MANIFEST` reads, checked before any worker starts.
//!
//! A manifest names the run, the prepared data, the model, the training settings, the workers,
//! and the checkpoint, restart and coordinator policies (`deploy/quickstart.toml` shows every
//! key). Every section is optional except `[job]` with `run`, and `[train]` with `steps`; every
//! other key has a default, listed on its field below.
//!
//! The reader is strict because a typo in a manifest should cost seconds, not a wasted run:
//! unknown keys and sections, wrong types and out-of-range values are errors that name the
//! dotted key (`train.lr`), its `file:line:col` and what is allowed. It walks the spanned
//! document from [`toml::de::DeTable`] itself instead of deriving `Deserialize`, because serde's
//! errors know neither the dotted key nor where an unknown key was written.
//!
//! **Relative paths** (`job.run`, `data.path`) are relative to the current working directory of
//! the process that reads the manifest — the directory `chingu launch` is started in — not to
//! the manifest file, so `chingu launch deploy/quickstart.toml` run from the repository root
//! uses `./prepared` and `./runs/quickstart`. They are kept as written and resolved where used.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use chingu_corpus::manifest::MANIFEST_FILE;
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

/// The model presets a manifest may name (those of `chingu_model::Config::preset`).
pub const PRESETS: [&str; 3] = ["tiny", "seed-256", "seed-768"];
/// The learning-rate schedules: `constant`, or linear warm-up then cosine decay.
pub const SCHEDULES: [&str; 2] = ["constant", "cosine"];
/// The position encodings a manifest may ask for instead of the preset's.
pub const POSITIONS: [&str; 2] = ["sinusoidal", "learned"];
/// The most workers one job may have.
pub const MAX_WORKERS: usize = 64;

/// A parsed and validated job manifest, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The file it was read from (as given; used in messages).
    pub path: PathBuf,
    /// `[job]`: name, run directory, seed.
    pub job: Job,
    /// `[data]`: the prepared directory.
    pub data: Data,
    /// `[model]`: preset and overrides.
    pub model: ModelSection,
    /// `[train]`: optimisation settings.
    pub train: Train,
    /// `[workers]`: how many and on what.
    pub workers: Workers,
    /// `[checkpoint]`: when to write checkpoints and how many to keep.
    pub checkpoint: CheckpointPolicy,
    /// `[restart]`: how failed workers are replaced.
    pub restart: RestartPolicy,
    /// `[coordinator]`: where the coordinator listens.
    pub coordinator: CoordinatorSection,
    /// Where each key that was written in the file sits, for later messages about it.
    pub positions: KeyPositions,
}

/// `[job]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Name in logs and status; default: the manifest's file stem.
    pub name: String,
    /// Run directory: checkpoints, logs and the stored job spec (required).
    pub run: PathBuf,
    /// Seed for initialisation, data order and dropout; default 1.
    pub seed: u64,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    /// Prepared directory (from `chingu prepare`); default `prepared`.
    pub path: PathBuf,
    /// When `path` has no `manifest.json`, the launcher prepares the embedded sample corpus
    /// there first; default false (a missing directory is then an error).
    pub prepare_embedded: bool,
}

impl Default for Data {
    fn default() -> Self {
        Self { path: PathBuf::from("prepared"), prepare_embedded: false }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSection {
    /// One of [`PRESETS`]; default `tiny`.
    pub preset: String,
    /// Dropout override in `[0, 1)`; default: the preset's.
    pub dropout: Option<f32>,
    /// Position-encoding override, one of [`POSITIONS`]; default: the preset's.
    pub positions: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { preset: "tiny".to_owned(), dropout: None, positions: None }
    }
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Train {
    /// Optimizer steps to train to (required, > 0).
    pub steps: u64,
    /// Padded tokens per worker micro-batch; default 1024, at least 16.
    pub batch_tokens: usize,
    /// Micro-batches per worker per step; default 1, at least 1. The global batch is
    /// `batch_tokens × accumulate × workers.count` padded tokens.
    pub accumulate: usize,
    /// Peak learning rate; default 1e-3, finite and > 0.
    pub lr: f32,
    /// One of [`SCHEDULES`]; default `constant`.
    pub schedule: String,
    /// Linear warm-up steps of the cosine schedule; default 0, at most `steps`.
    pub warmup: u64,
    /// Where the cosine schedule ends, as a share of `lr`; default 0.1, in `[0, 1]`.
    pub min_lr_ratio: f32,
    /// AdamW weight decay; default 0.01, at least 0.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this; default `Some(1.0)`; `clip_norm = 0` turns
    /// clipping off (`None`).
    pub clip_norm: Option<f32>,
    /// Validation loss every this many steps; default 0 (never).
    pub eval_every: u64,
    /// CPU threads per worker; default 0: the launcher divides the cores among the workers.
    pub threads: usize,
}

impl Train {
    /// The defaults, with the one setting that has none.
    fn with_steps(steps: u64) -> Self {
        Self {
            steps,
            batch_tokens: 1024,
            accumulate: 1,
            lr: 1e-3,
            schedule: "constant".to_owned(),
            warmup: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            clip_norm: Some(1.0),
            eval_every: 0,
            threads: 0,
        }
    }
}

/// `[workers]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// Worker processes; default 1, between 1 and [`MAX_WORKERS`].
    pub count: usize,
    /// Device kind; default `auto`.
    pub backend: Backend,
    /// How gradients are summed across workers; default `auto`.
    pub collective: CollectiveKind,
}

impl Default for Workers {
    fn default() -> Self {
        Self { count: 1, backend: Backend::Auto, collective: CollectiveKind::Auto }
    }
}

/// How workers sum their gradients (`workers.collective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveKind {
    /// NCCL when the workers train on GPUs and there are several, else the TCP ring (nothing
    /// at all for one worker).
    #[default]
    Auto,
    /// The TCP ring through host memory, on any device (GPU ranks copy gradients out).
    Ring,
    /// NCCL, in place on the GPUs; an error on the CPU. Used even for one worker (to test it).
    Nccl,
}

impl CollectiveKind {
    /// Every kind, in the order messages list them.
    pub const ALL: [CollectiveKind; 3] =
        [CollectiveKind::Auto, CollectiveKind::Ring, CollectiveKind::Nccl];

    /// The name a manifest uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CollectiveKind::Auto => "auto",
            CollectiveKind::Ring => "ring",
            CollectiveKind::Nccl => "nccl",
        }
    }
}

/// What the workers compute on (`workers.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// A CUDA GPU per worker when built with CUDA and enough are found, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU per worker; an error when there are none.
    Cuda,
}

impl Backend {
    /// Every backend, in the order messages list them.
    pub const ALL: [Backend; 3] = [Backend::Auto, Backend::Cpu, Backend::Cuda];

    /// The name a manifest uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointPolicy {
    /// Checkpoint every this many steps; default 500; 0 turns step checkpoints off.
    pub every_steps: u64,
    /// Also checkpoint when this many minutes have passed since the last; default 0 (off).
    pub every_minutes: f64,
    /// Checkpoints to keep; default 3, at least 1.
    pub keep: usize,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self { every_steps: 500, every_minutes: 0.0, keep: 3 }
    }
}

/// `[restart]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Restarts from the last checkpoint before the job gives up; default 3.
    pub max_restarts: u32,
    /// A worker silent for this many seconds counts as dead; default 30, > 0.
    pub heartbeat_timeout_s: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { max_restarts: 3, heartbeat_timeout_s: 30.0 }
    }
}

/// `[coordinator]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordinatorSection {
    /// Listen address; default `127.0.0.1:0` (port 0: any free port).
    pub address: SocketAddr,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self { address: SocketAddr::from(([127, 0, 0, 1], 0)) }
    }
}

/// A place in a manifest file, both 1-based; `column` counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where each key written in a manifest sits, by dotted name (`train.lr`); sections by their
/// name (`train`). Keys left to their defaults have no position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPositions(BTreeMap<String, Position>);

impl KeyPositions {
    /// The position of the key `dotted`, when the file wrote it.
    pub fn get(&self, dotted: &str) -> Option<Position> {
        self.0.get(dotted).copied()
    }
}

/// What is wrong with a manifest, and where.
///
/// Displays as `deploy/x.toml:12:5: message`, or `deploy/x.toml: message` without a position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file, as given.
    pub file: PathBuf,
    /// Where in it, when the problem has a place.
    pub position: Option<Position>,
    /// The dotted key concerned (`train.lr`), when there is one.
    pub key: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{}:{p}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl Manifest {
    /// Reads and parses the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = fs::read_to_string(path).map_err(|e| ManifestError {
            file: path.to_path_buf(),
            position: None,
            key: None,
            message: format!("cannot read the manifest: {e}"),
        })?;
        Manifest::parse(path, &text)
    }

    /// Parses manifest `text`; `path` names it in messages and gives `job.name` its default.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let mut doc = Doc { file: path, text, positions: BTreeMap::new() };
        let root = DeTable::parse(text).map_err(|e| {
            doc.error(e.span(), None, format!("TOML syntax error: {}", e.message()))
        })?;
        let root = root.get_ref();
        doc.reject_unknown_sections(root)?;

        let job = doc.section(root, "job")?;
        let data = doc.section(root, "data")?;
        let model = doc.section(root, "model")?;
        let train = doc.section(root, "train")?;
        let workers = doc.section(root, "workers")?;
        let checkpoint = doc.section(root, "checkpoint")?;
        let restart = doc.section(root, "restart")?;
        let coordinator = doc.section(root, "coordinator")?;

        let job = doc.job(&job)?;
        let data = doc.data(&data)?;
        let model = doc.model(&model)?;
        let train = doc.train(&train)?;
        let workers = doc.workers(&workers)?;
        let checkpoint = doc.checkpoint(&checkpoint)?;
        let restart = doc.restart(&restart)?;
        let coordinator = doc.coordinator(&coordinator)?;
        Ok(Manifest {
            path: path.to_path_buf(),
            job,
            data,
            model,
            train,
            workers,
            checkpoint,
            restart,
            coordinator,
            positions: KeyPositions(doc.positions),
        })
    }

    /// An error about the key `dotted` (`train.lr`), placed where the file wrote it.
    pub fn error_at(&self, dotted: &str, message: impl Into<String>) -> ManifestError {
        ManifestError {
            file: self.path.clone(),
            position: self.positions.get(dotted),
            key: Some(dotted.to_owned()),
            message: message.into(),
        }
    }

    /// Checks the paths before any worker starts: `data.path` must hold a prepared directory
    /// (unless `data.prepare_embedded`, which prepares it when missing), and `job.run` must be a
    /// directory this process can create and write (it is created, and a probe file written
    /// and removed).
    pub fn check_paths(&self) -> Result<(), ManifestError> {
        let data = &self.data.path;
        let shown = shown_path(data);
        if data.exists() && !data.is_dir() {
            return Err(self.error_at(
                "data.path",
                format!("`data.path` = {shown} is not a directory; name a prepared directory"),
            ));
        }
        if !self.data.prepare_embedded {
            if !data.is_dir() {
                return Err(self.error_at(
                    "data.path",
                    format!(
                        "`data.path` = {shown} does not exist; run `chingu prepare --out {}` \
                         first, or set `data.prepare_embedded = true` to prepare the embedded \
                         sample corpus there",
                        data.display()
                    ),
                ));
            }
            if !data.join(MANIFEST_FILE).is_file() {
                return Err(self.error_at(
                    "data.path",
                    format!(
                        "`data.path` = {shown} has no {MANIFEST_FILE}, so it is not a prepared \
                         directory; run `chingu prepare --out {}` or point `data.path` at one",
                        data.display()
                    ),
                ));
            }
        }

        let run = &self.job.run;
        let shown = shown_path(run);
        fs::create_dir_all(run).map_err(|e| {
            self.error_at("job.run", format!("`job.run` = {shown}: cannot create it: {e}"))
        })?;
        let probe = run.join(format!(".chingu-write-probe-{}", std::process::id()));
        let written = fs::File::create(&probe).and_then(|mut f| f.write_all(b"probe"));
        let removed = fs::remove_file(&probe);
        written.and(removed).map_err(|e| {
            self.error_at("job.run", format!("`job.run` = {shown} is not writable: {e}"))
        })
    }

    /// The resolved manifest as canonical TOML, every default spelled out; [`Manifest::parse`]
    /// reads it back to an equal manifest. The launcher stores it in the run directory.
    pub fn to_toml(&self) -> String {
        let mut out = format!(
            "# The resolved job manifest (from {}), every default spelled out.\n",
            self.path.display()
        );
        let mut section = |name: &str, keys: Vec<(&str, String)>| {
            out.push_str(&format!("\n[{name}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
        };
        let (job, data, model, train) = (&self.job, &self.data, &self.model, &self.train);
        section(
            "job",
            vec![
                ("name", quoted(&job.name)),
                ("run", quoted(&job.run.to_string_lossy())),
                ("seed", job.seed.to_string()),
            ],
        );
        section(
            "data",
            vec![
                ("path", quoted(&data.path.to_string_lossy())),
                ("prepare_embedded", data.prepare_embedded.to_string()),
            ],
        );
        let mut keys = vec![("preset", quoted(&model.preset))];
        if let Some(dropout) = model.dropout {
            keys.push(("dropout", format!("{dropout:?}")));
        }
        if let Some(positions) = &model.positions {
            keys.push(("positions", quoted(positions)));
        }
        section("model", keys);
        section(
            "train",
            vec![
                ("steps", train.steps.to_string()),
                ("batch_tokens", train.batch_tokens.to_string()),
                ("accumulate", train.accumulate.to_string()),
                ("lr", format!("{:?}", train.lr)),
                ("schedule", quoted(&train.schedule)),
                ("warmup", train.warmup.to_string()),
                ("min_lr_ratio", format!("{:?}", train.min_lr_ratio)),
                ("weight_decay", format!("{:?}", train.weight_decay)),
                ("clip_norm", format!("{:?}", train.clip_norm.unwrap_or(0.0))),
                ("eval_every", train.eval_every.to_string()),
                ("threads", train.threads.to_string()),
            ],
        );
        section(
            "workers",
            vec![
                ("count", self.workers.count.to_string()),
                ("backend", quoted(self.workers.backend.as_str())),
                ("collective", quoted(self.workers.collective.as_str())),
            ],
        );
        section(
            "checkpoint",
            vec![
                ("every_steps", self.checkpoint.every_steps.to_string()),
                ("every_minutes", format!("{:?}", self.checkpoint.every_minutes)),
                ("keep", self.checkpoint.keep.to_string()),
            ],
        );
        section(
            "restart",
            vec![
                ("max_restarts", self.restart.max_restarts.to_string()),
                ("heartbeat_timeout_s", format!("{:?}", self.restart.heartbeat_timeout_s)),
            ],
        );
        section("coordinator", vec![("address", quoted(&self.coordinator.address.to_string()))]);
        out
    }
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A path for messages: as written, plus where it resolves when relative.
fn shown_path(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => {
            format!("{:?} ({})", path.display().to_string(), cwd.join(path).display())
        }
        _ => format!("{:?}", path.display().to_string()),
    }
}

/// The sections and their keys, in the order messages list them.
const SECTIONS: [(&str, &[&str]); 8] = [
    ("job", &["name", "run", "seed"]),
    ("data", &["path", "prepare_embedded"]),
    ("model", &["preset", "dropout", "positions"]),
    (
        "train",
        &[
            "steps",
            "batch_tokens",
            "accumulate",
            "lr",
            "schedule",
            "warmup",
            "min_lr_ratio",
            "weight_decay",
            "clip_norm",
            "eval_every",
            "threads",
        ],
    ),
    ("workers", &["count", "backend", "collective"]),
    ("checkpoint", &["every_steps", "every_minutes", "keep"]),
    ("restart", &["max_restarts", "heartbeat_timeout_s"]),
    ("coordinator", &["address"]),
];

/// One section of the document: its name, the span of its header (or inline key), and its
/// table; `None` when the file leaves the section out.
struct Section<'t, 'i> {
    name: &'static str,
    span: Option<Range<usize>>,
    table: Option<&'t DeTable<'i>>,
}

type Value<'i> = Spanned<DeValue<'i>>;

/// The document being read, and the positions of the keys read so far.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
    positions: BTreeMap<String, Position>,
}

impl Doc<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        key: Option<&str>,
        message: String,
    ) -> ManifestError {
        ManifestError {
            file: self.file.to_path_buf(),
            position: span.map(|s| Position::of_offset(self.text, s.start)),
            key: key.map(str::to_owned),
            message,
        }
    }

    /// Top-level keys must be the known sections; the first unknown one in the file is named.
    fn reject_unknown_sections(&self, root: &DeTable<'_>) -> Result<(), ManifestError> {
        let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
        let unknown = root
            .iter()
            .filter(|(key, _)| !names.contains(&key.get_ref().as_ref()))
            .min_by_key(|(key, _)| key.span().start);
        let Some((key, value)) = unknown else { return Ok(()) };
        let name = key.get_ref().as_ref();
        let what = if value.get_ref().is_table() {
            format!("unknown section [{name}]")
        } else {
            format!("unknown key `{name}` (top-level keys must be in a section)")
        };
        Err(self.error(
            Some(key.span()),
            Some(name),
            format!("{what}{}; the sections are: {}", suggestion(name, &names), names.join(", ")),
        ))
    }

    /// The section `name`, with its unknown keys rejected.
    fn section<'t, 'i>(
        &mut self,
        root: &'t DeTable<'i>,
        name: &'static str,
    ) -> Result<Section<'t, 'i>, ManifestError> {
        let Some((key, value)) = root.get_key_value(name) else {
            return Ok(Section { name, span: None, table: None });
        };
        let Some(table) = value.get_ref().as_table() else {
            return Err(self.error(
                Some(value.span()),
                Some(name),
                format!(
                    "`{name}` must be a table (a [{name}] section), found {}",
                    value.get_ref().type_str()
                ),
            ));
        };
        self.positions.insert(name.to_owned(), Position::of_offset(self.text, key.span().start));
        let allowed = SECTIONS.iter().find(|(n, _)| *n == name).map_or(&[][..], |(_, keys)| keys);
        let unknown = table
            .iter()
            .filter(|(k, _)| !allowed.contains(&k.get_ref().as_ref()))
            .min_by_key(|(k, _)| k.span().start);
        if let Some((k, _)) = unknown {
            let dotted = format!("{name}.{}", k.get_ref());
            return Err(self.error(
                Some(k.span()),
                Some(&dotted),
                format!(
                    "unknown key `{dotted}`{}; [{name}] allows: {}",
                    suggestion(k.get_ref(), allowed),
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Section { name, span: Some(key.span()), table: Some(table) })
    }

    /// The value of `key` in `section`, recording where the key was written.
    fn value<'t, 'i>(&mut self, section: &Section<'t, 'i>, key: &str) -> Option<&'t Value<'i>> {
        let (k, v) = section.table?.get_key_value(key)?;
        self.positions.insert(
            format!("{}.{key}", section.name),
            Position::of_offset(self.text, k.span().start),
        );
        Some(v)
    }

    /// An error about the value `value` of `section.key`.
    fn invalid(
        &self,
        section: &Section<'_, '_>,
        key: &str,
        value: &Value<'_>,
        rule: &str,
    ) -> ManifestError {
        let dotted = format!("{}.{key}", section.name);
        self.error(Some(value.span()), Some(&dotted), format!("`{dotted}` {rule}"))
    }

    /// A required key is missing: placed at the section's header when there is one.
    fn missing(&self, section: &Section<'_, '_>, key: &str, example: &str) -> ManifestError {
        let dotted = format!("{}.{key}", section.name);
        let message = match section.table {
            Some(_) => format!("[{}] needs `{key}`, e.g. `{example}`", section.name),
            None => format!("missing [{}] section with `{key}`, e.g. `{example}`", section.name),
        };
        self.error(section.span.clone(), Some(&dotted), message)
    }

    fn string(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
    ) -> Result<Option<Spanned<String>>, ManifestError> {
        let Some(value) = self.value(section, key) else { return Ok(None) };
        match value.get_ref().as_str() {
            Some(s) if s.trim().is_empty() => {
                Err(self.invalid(section, key, value, "must not be empty"))
            }
            Some(s) => Ok(Some(Spanned::new(value.span(), s.to_owned()))),
            None => Err(self.invalid(section, key, value, &found("a string", value))),
        }
    }

    fn choice(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
        allowed: &[&str],
    ) -> Result<Option<String>, ManifestError> {
        let Some(value) = self.string(section, key)? else { return Ok(None) };
        if allowed.contains(&value.get_ref().as_str()) {
            return Ok(Some(value.into_inner()));
        }
        let listed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        let dotted = format!("{}.{key}", section.name);
        Err(self.error(
            Some(value.span()),
            Some(&dotted),
            format!(
                "`{dotted}` must be one of {}, got {:?}{}",
                listed.join(", "),
                value.get_ref(),
                suggestion(value.get_ref(), allowed)
            ),
        ))
    }

    fn boolean(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
    ) -> Result<Option<bool>, ManifestError> {
        let Some(value) = self.value(section, key) else { return Ok(None) };
        match value.get_ref().as_bool() {
            Some(b) => Ok(Some(b)),
            None => Err(self.invalid(section, key, value, &found("true or false", value))),
        }
    }

    /// An integer in `range`.
    fn integer(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
        range: RangeInclusive<i64>,
    ) -> Result<Option<i64>, ManifestError> {
        let Some(value) = self.value(section, key) else { return Ok(None) };
        let Some(int) = value.get_ref().as_integer() else {
            return Err(self.invalid(section, key, value, &found("an integer", value)));
        };
        let parsed = i64::from_str_radix(int.as_str(), int.radix()).ok();
        match parsed {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => {
                let rule = match (*range.start(), *range.end()) {
                    (0, i64::MAX) => "must not be negative".to_owned(),
                    (lo, i64::MAX) => format!("must be at least {lo}"),
                    (lo, hi) => format!("must be between {lo} and {hi}"),
                };
                Err(self.invalid(section, key, value, &format!("{rule}, got {int}")))
            }
        }
    }

    fn unsigned(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
        min: i64,
    ) -> Result<Option<u64>, ManifestError> {
        Ok(self.integer(section, key, min..=i64::MAX)?.map(|n| n as u64))
    }

    fn size(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
        min: i64,
    ) -> Result<Option<usize>, ManifestError> {
        let max = i64::try_from(usize::MAX).unwrap_or(i64::MAX);
        Ok(self.integer(section, key, min..=max)?.map(|n| n as usize))
    }

    /// A finite number (an integer is taken as one) for which `ok` holds, else `rule`.
    fn number(
        &mut self,
        section: &Section<'_, '_>,
        key: &str,
        ok: fn(f64) -> bool,
        rule: &str,
    ) -> Result<Option<f64>, ManifestError> {
        let Some(value) = self.value(section, key) else { return Ok(None) };
        let (parsed, raw) = match value.get_ref() {
            DeValue::Float(x) => (x.as_str().parse::<f64>().ok(), x.to_string()),
            DeValue::Integer(n) => {
                (i64::from_str_radix(n.as_str(), n.radix()).ok().map(|n| n as f64), n.to_string())
            }
            _ => return Err(self.invalid(section, key, value, &found("a number", value))),
        };
        match parsed {
            Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
            _ => Err(self.invalid(section, key, value, &format!("{rule}, got {raw}"))),
        }
    }

    fn job(&mut self, s: &Section<'_, '_>) -> Result<Job, ManifestError> {
        let default_name = self.file.file_stem().map_or("job".into(), |s| s.to_string_lossy());
        let name = self.string(s, "name")?.map_or(default_name.into_owned(), Spanned::into_inner);
        let run = self.string(s, "run")?;
        let run = run.ok_or_else(|| self.missing(s, "run", "run = \"runs/quickstart\""))?;
        let seed = self.unsigned(s, "seed", 0)?.unwrap_or(1);
        Ok(Job { name, run: PathBuf::from(run.into_inner()), seed })
    }

    fn data(&mut self, s: &Section<'_, '_>) -> Result<Data, ManifestError> {
        let d = Data::default();
        Ok(Data {
            path: self.string(s, "path")?.map_or(d.path, |p| PathBuf::from(p.into_inner())),
            prepare_embedded: self.boolean(s, "prepare_embedded")?.unwrap_or(d.prepare_embedded),
        })
    }

    fn model(&mut self, s: &Section<'_, '_>) -> Result<ModelSection, ManifestError> {
        let d = ModelSection::default();
        let dropout =
            self.number(s, "dropout", |x| (0.0..1.0).contains(&x), "must be in [0, 1)")?;
        Ok(ModelSection {
            preset: self.choice(s, "preset", &PRESETS)?.unwrap_or(d.preset),
            dropout: dropout.map(|x| x as f32).or(d.dropout),
            positions: self.choice(s, "positions", &POSITIONS)?.or(d.positions),
        })
    }

    fn train(&mut self, s: &Section<'_, '_>) -> Result<Train, ManifestError> {
        let steps = self.unsigned(s, "steps", 1)?;
        let steps = steps.ok_or_else(|| self.missing(s, "steps", "steps = 6000"))?;
        let d = Train::with_steps(steps);
        let positive = |x: f64| x > 0.0;
        let non_negative = |x: f64| x >= 0.0;
        let warmup = self.unsigned(s, "warmup", 0)?.unwrap_or(d.warmup);
        if warmup > steps {
            let value = self.value(s, "warmup").expect("warmup was read");
            return Err(self.invalid(
                s,
                "warmup",
                value,
                &format!("({warmup}) must not exceed `train.steps` ({steps})"),
            ));
        }
        let clip = self.number(s, "clip_norm", non_negative, "must not be negative (0: off)")?;
        Ok(Train {
            steps,
            batch_tokens: self.size(s, "batch_tokens", 16)?.unwrap_or(d.batch_tokens),
            accumulate: self.size(s, "accumulate", 1)?.unwrap_or(d.accumulate),
            lr: self
                .number(s, "lr", positive, "must be greater than 0")?
                .map_or(d.lr, |x| x as f32),
            schedule: self.choice(s, "schedule", &SCHEDULES)?.unwrap_or(d.schedule),
            warmup,
            min_lr_ratio: self
                .number(s, "min_lr_ratio", |x| (0.0..=1.0).contains(&x), "must be in [0, 1]")?
                .map_or(d.min_lr_ratio, |x| x as f32),
            weight_decay: self
                .number(s, "weight_decay", non_negative, "must not be negative")?
                .map_or(d.weight_decay, |x| x as f32),
            clip_norm: clip.map_or(d.clip_norm, |x| (x > 0.0).then_some(x as f32)),
            eval_every: self.unsigned(s, "eval_every", 0)?.unwrap_or(d.eval_every),
            threads: self.size(s, "threads", 0)?.unwrap_or(d.threads),
        })
    }

    fn workers(&mut self, s: &Section<'_, '_>) -> Result<Workers, ManifestError> {
        let d = Workers::default();
        let count = self.integer(s, "count", 1..=MAX_WORKERS as i64)?;
        let names: Vec<&str> = Backend::ALL.iter().map(|b| b.as_str()).collect();
        let backend = self.choice(s, "backend", &names)?;
        let kinds: Vec<&str> = CollectiveKind::ALL.iter().map(|c| c.as_str()).collect();
        let collective = self.choice(s, "collective", &kinds)?;
        Ok(Workers {
            collective: collective
                .and_then(|c| CollectiveKind::ALL.into_iter().find(|x| x.as_str() == c))
                .unwrap_or(d.collective),
            count: count.map_or(d.count, |n| n as usize),
            backend: backend
                .and_then(|b| Backend::ALL.into_iter().find(|x| x.as_str() == b))
                .unwrap_or(d.backend),
        })
    }

    fn checkpoint(&mut self, s: &Section<'_, '_>) -> Result<CheckpointPolicy, ManifestError> {
        let d = CheckpointPolicy::default();
        Ok(CheckpointPolicy {
            every_steps: self.unsigned(s, "every_steps", 0)?.unwrap_or(d.every_steps),
            every_minutes: self
                .number(s, "every_minutes", |x| x >= 0.0, "must not be negative (0: off)")?
                .unwrap_or(d.every_minutes),
            keep: self.size(s, "keep", 1)?.unwrap_or(d.keep),
        })
    }

    fn restart(&mut self, s: &Section<'_, '_>) -> Result<RestartPolicy, ManifestError> {
        let d = RestartPolicy::default();
        let max = self.integer(s, "max_restarts", 0..=i64::from(u32::MAX))?;
        Ok(RestartPolicy {
            max_restarts: max.map_or(d.max_restarts, |n| n as u32),
            heartbeat_timeout_s: self
                .number(s, "heartbeat_timeout_s", |x| x > 0.0, "must be greater than 0")?
                .unwrap_or(d.heartbeat_timeout_s),
        })
    }

    fn coordinator(&mut self, s: &Section<'_, '_>) -> Result<CoordinatorSection, ManifestError> {
        let Some(address) = self.string(s, "address")? else {
            return Ok(CoordinatorSection::default());
        };
        match address.get_ref().trim().parse::<SocketAddr>() {
            Ok(address) => Ok(CoordinatorSection { address }),
            Err(_) => Err(self.error(
                Some(address.span()),
                Some("coordinator.address"),
                format!(
                    "`coordinator.address` must be an IP address and port such as \
                     \"127.0.0.1:0\" or \"[::1]:7000\" (port 0: any free port; host names are \
                     not resolved), got {:?}",
                    address.get_ref()
                ),
            )),
        }
    }
}

/// "must be EXPECTED, found TYPE".
fn found(expected: &str, value: &Value<'_>) -> String {
    format!("must be {expected}, found {}", value.get_ref().type_str())
}

/// " (did you mean `x`?)" for the allowed name closest to `name`, when one is close.
fn suggestion(name: &str, allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|a| (edit_distance(name, a), a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min()
        .map_or(String::new(), |(_, a)| format!(" (did you mean `{a}`?)"))
}

/// Levenshtein distance over characters, with adjacent swaps costing one (as typos do).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("deploy/x.toml"), text)
    }

    fn parse_err(text: &str) -> ManifestError {
        match parse(text) {
            Ok(m) => panic!("expected an error, parsed {m:?}"),
            Err(e) => e,
        }
    }

    const FULL: &str = r#"# every key
[job]
name = "full"
run = "runs/full"
seed = 42

[data]
path = "data/prepared"
prepare_embedded = true

[model]
preset = "seed-256"
dropout = 0.2
positions = "learned"

[train]
steps = 1_000
batch_tokens = 2048
accumulate = 4
lr = 3e-4
schedule = "cosine"
warmup = 100
min_lr_ratio = 0.05
weight_decay = 0.1
clip_norm = 0.5
eval_every = 250
threads = 3

[workers]
count = 8
backend = "cuda"
collective = "nccl"

[checkpoint]
every_steps = 200
every_minutes = 15
keep = 5

[restart]
max_restarts = 7
heartbeat_timeout_s = 12.5

[coordinator]
address = "0.0.0.0:7000"
"#;

    #[test]
    fn full_manifest_parses_every_field() {
        let m = parse(FULL).unwrap();
        assert_eq!(m.path, Path::new("deploy/x.toml"));
        assert_eq!(m.job, Job { name: "full".into(), run: "runs/full".into(), seed: 42 });
        assert_eq!(m.data, Data { path: "data/prepared".into(), prepare_embedded: true });
        assert_eq!(
            m.model,
            ModelSection {
                preset: "seed-256".into(),
                dropout: Some(0.2),
                positions: Some("learned".into())
            }
        );
        assert_eq!(
            m.train,
            Train {
                steps: 1000,
                batch_tokens: 2048,
                accumulate: 4,
                lr: 3e-4,
                schedule: "cosine".into(),
                warmup: 100,
                min_lr_ratio: 0.05,
                weight_decay: 0.1,
                clip_norm: Some(0.5),
                eval_every: 250,
                threads: 3,
            }
        );
        assert_eq!(
            m.workers,
            Workers { count: 8, backend: Backend::Cuda, collective: CollectiveKind::Nccl }
        );
        assert_eq!(
            m.checkpoint,
            CheckpointPolicy { every_steps: 200, every_minutes: 15.0, keep: 5 }
        );
        assert_eq!(m.restart, RestartPolicy { max_restarts: 7, heartbeat_timeout_s: 12.5 });
        assert_eq!(m.coordinator.address, "0.0.0.0:7000".parse::<SocketAddr>().unwrap());
        assert_eq!(m.positions.get("train.lr"), Some(Position { line: 20, column: 1 }));
        assert_eq!(m.positions.get("job"), Some(Position { line: 2, column: 2 }));
    }

    #[test]
    fn minimal_manifest_gets_the_defaults() {
        let m = parse("[job]\nrun = \"runs/a\"\n\n[train]\nsteps = 10\n").unwrap();
        assert_eq!(m.job, Job { name: "x".into(), run: "runs/a".into(), seed: 1 });
        assert_eq!(m.data, Data { path: "prepared".into(), prepare_embedded: false });
        assert_eq!(m.model, ModelSection { preset: "tiny".into(), dropout: None, positions: None });
        let t = &m.train;
        assert_eq!((t.steps, t.batch_tokens, t.accumulate), (10, 1024, 1));
        assert_eq!((t.lr, t.schedule.as_str(), t.warmup), (1e-3, "constant", 0));
        assert_eq!((t.min_lr_ratio, t.weight_decay, t.clip_norm), (0.1, 0.01, Some(1.0)));
        assert_eq!((t.eval_every, t.threads), (0, 0));
        assert_eq!(
            m.workers,
            Workers { count: 1, backend: Backend::Auto, collective: CollectiveKind::Auto }
        );
        assert_eq!(
            m.checkpoint,
            CheckpointPolicy { every_steps: 500, every_minutes: 0.0, keep: 3 }
        );
        assert_eq!(m.restart, RestartPolicy { max_restarts: 3, heartbeat_timeout_s: 30.0 });
        assert_eq!(m.coordinator.address.to_string(), "127.0.0.1:0");
        assert_eq!(m.positions.get("data.path"), None);
    }

    #[test]
    fn clip_norm_zero_turns_clipping_off_and_ints_are_numbers() {
        let m = parse("[job]\nrun = \"r\"\n[train]\nsteps = 5\nclip_norm = 0\nlr = 1\n").unwrap();
        assert_eq!(m.train.clip_norm, None);
        assert_eq!(m.train.lr, 1.0);
    }

    #[test]
    fn inline_and_dotted_sections_read_the_same() {
        let m = parse("job = { run = \"r\" }\ntrain.steps = 9\nworkers.count = 2\n").unwrap();
        assert_eq!(m.job.run, Path::new("r"));
        assert_eq!(m.train.steps, 9);
        assert_eq!(m.workers.count, 2);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = parse_err("[job]\nrun = \"r\"\n\n[train]\nsteps = 10\n  stpes = 5\n");
        assert_eq!(e.position, Some(Position { line: 6, column: 3 }));
        assert_eq!(e.key.as_deref(), Some("train.stpes"));
        let shown = e.to_string();
        assert!(shown.starts_with("deploy/x.toml:6:3: unknown key `train.stpes`"), "{shown}");
        assert!(shown.contains("did you mean `steps`?"), "{shown}");
        assert!(shown.contains("batch_tokens, accumulate, lr"), "{shown}");
    }

    #[test]
    fn unknown_section_is_named_with_its_line() {
        let e = parse_err("[job]\nrun = \"r\"\n[train]\nsteps = 1\n\n[trian]\nlr = 1.0\n");
        assert_eq!(e.position.map(|p| p.line), Some(6));
        let shown = e.to_string();
        assert!(shown.starts_with("deploy/x.toml:6:2: unknown section [trian]"), "{shown}");
        assert!(shown.contains("did you mean `train`?"), "{shown}");
        assert!(shown.contains("job, data, model, train, workers"), "{shown}");

        let e = parse_err("seed = 3\n[job]\nrun = \"r\"\n[train]\nsteps = 1\n");
        assert!(e.to_string().starts_with("deploy/x.toml:1:1: unknown key `seed`"), "{e}");
    }

    #[test]
    fn bad_values_name_key_line_and_rule() {
        let base = "[job]\nrun = \"r\"\n[train]\nsteps = 10\n";
        let cases = [
            ("[workers]\ncount = 0\n", "workers.count", 6, "must be between 1 and 64, got 0"),
            ("lr = -1.0\n", "train.lr", 5, "must be greater than 0, got -1.0"),
            ("lr = nan\n", "train.lr", 5, "must be greater than 0, got nan"),
            ("[workers]\nbackend = \"tpu\"\n", "workers.backend", 6, "\"auto\", \"cpu\", \"cuda\""),
            (
                "[workers]\ncollective = \"mpi\"\n",
                "workers.collective",
                6,
                "\"auto\", \"ring\", \"nccl\"",
            ),
            ("[model]\npreset = \"huge\"\n", "model.preset", 6, "\"tiny\", \"seed-256\""),
            ("[model]\ndropout = 1.0\n", "model.dropout", 6, "must be in [0, 1), got 1.0"),
            (
                "batch_tokens = \"big\"\n",
                "train.batch_tokens",
                5,
                "must be an integer, found string",
            ),
            ("steps_x = 1\n", "train.steps_x", 5, "unknown key"),
            ("warmup = 11\n", "train.warmup", 5, "must not exceed `train.steps` (10)"),
            ("[checkpoint]\nkeep = 0\n", "checkpoint.keep", 6, "must be at least 1, got 0"),
            ("[restart]\nheartbeat_timeout_s = 0\n", "restart.heartbeat_timeout_s", 6, "> 0"),
            ("[coordinator]\naddress = \"localhost:1\"\n", "coordinator.address", 6, "IP address"),
            ("[data]\nprepare_embedded = 1\n", "data.prepare_embedded", 6, "true or false"),
        ];
        for (extra, key, line, needle) in cases {
            let e = parse_err(&format!("{base}{extra}"));
            let shown = e.to_string();
            assert_eq!(e.key.as_deref(), Some(key), "{shown}");
            assert_eq!(e.position.map(|p| p.line), Some(line), "{shown}");
            assert!(shown.starts_with(&format!("deploy/x.toml:{line}:")), "{shown}");
            assert!(shown.contains(key), "{shown}");
            let needle = needle.replace("> 0", "must be greater than 0");
            assert!(shown.contains(&needle), "{shown} lacks {needle}");
        }
    }

    #[test]
    fn a_section_that_is_not_a_table_is_an_error() {
        let e = parse_err("job = 3\n[train]\nsteps = 1\n");
        assert_eq!(
            e.to_string(),
            "deploy/x.toml:1:7: `job` must be a table (a [job] section), found integer"
        );
    }

    #[test]
    fn missing_required_keys_are_errors() {
        let e = parse_err("[train]\nsteps = 10\n");
        assert_eq!(e.key.as_deref(), Some("job.run"));
        assert!(
            e.to_string().starts_with("deploy/x.toml: missing [job] section with `run`"),
            "{e}"
        );
        let e = parse_err("[job]\nname = \"a\"\n[train]\nsteps = 10\n");
        assert!(e.to_string().starts_with("deploy/x.toml:1:2: [job] needs `run`"), "{e}");
        let e = parse_err("[job]\nrun = \"r\"\n\n[train]\nlr = 1e-3\n");
        assert!(e.to_string().starts_with("deploy/x.toml:4:2: [train] needs `steps`"), "{e}");
        let e = parse_err("[job]\nrun = \"r\"\n[train]\nsteps = 0\n");
        assert_eq!(e.to_string(), "deploy/x.toml:4:9: `train.steps` must be at least 1, got 0");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = parse_err("[job]\nrun = \"r\"\n[train]\nsteps = = 3\n");
        assert_eq!(e.position.map(|p| p.line), Some(4));
        assert!(e.to_string().starts_with("deploy/x.toml:4:"), "{e}");
        assert!(e.to_string().contains("TOML syntax error"), "{e}");
        let e = parse_err("[job]\nrun = \"r\"\nrun = \"s\"\n[train]\nsteps = 3\n");
        assert_eq!(e.position.map(|p| p.line), Some(3), "{e}");
    }

    #[test]
    fn columns_count_characters() {
        let e = parse_err("[job]\nrun = \"런\"; x = 1\n[train]\nsteps = 3\n");
        assert_eq!(e.position, Some(Position { line: 2, column: 10 }), "{e}");
        assert_eq!(Position::of_offset("ab\n가나다", 9), Position { line: 2, column: 3 });
    }

    #[test]
    fn check_paths_reports_missing_data_with_its_line() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("missing");
        let run = tmp.path().join("runs/a");
        let text = format!(
            "[job]\nrun = '{}'\n[train]\nsteps = 1\n[data]\npath = '{}'\n",
            run.display(),
            data.display()
        );
        let m = parse(&text).unwrap();
        let e = m.check_paths().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("data.path"));
        let shown = e.to_string();
        assert!(shown.starts_with("deploy/x.toml:6:1: `data.path`"), "{shown}");
        assert!(shown.contains("does not exist"), "{shown}");
        assert!(shown.contains("prepare_embedded"), "{shown}");

        // An existing directory without manifest.json is not prepared data either.
        fs::create_dir_all(&data).unwrap();
        let e = m.check_paths().unwrap_err();
        assert!(e.to_string().contains("has no manifest.json"), "{e}");

        fs::write(data.join(MANIFEST_FILE), "{}").unwrap();
        m.check_paths().unwrap();
        assert!(run.is_dir());
        assert_eq!(fs::read_dir(&run).unwrap().count(), 0, "the probe file is removed");
    }

    #[test]
    fn check_paths_accepts_missing_data_when_prepared_on_launch() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[job]\nrun = '{}'\n[train]\nsteps = 1\n[data]\npath = '{}'\nprepare_embedded = true\n",
            tmp.path().join("run").display(),
            tmp.path().join("not-yet").display()
        );
        parse(&text).unwrap().check_paths().unwrap();
    }

    #[test]
    fn check_paths_reports_an_uncreatable_run_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let text = format!(
            "[data]\nprepare_embedded = true\npath = '{}'\n[job]\nrun = '{}'\n[train]\nsteps = 1\n",
            tmp.path().join("d").display(),
            file.join("run").display()
        );
        let e = parse(&text).unwrap().check_paths().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("job.run"));
        assert!(e.to_string().starts_with("deploy/x.toml:5:1: `job.run`"), "{e}");
        assert!(e.to_string().contains("cannot create it"), "{e}");
    }

    #[test]
    fn to_toml_reads_back_equal() {
        for text in [FULL, "[job]\nrun = \"r\"\n[train]\nsteps = 3\nclip_norm = 0\n"] {
            let m = parse(text).unwrap();
            let back = parse(&m.to_toml()).unwrap();
            let strip = |m: &Manifest| Manifest { positions: KeyPositions::default(), ..m.clone() };
            assert_eq!(strip(&back), strip(&m), "{}", m.to_toml());
        }
    }

    #[test]
    fn presets_are_the_models() {
        for preset in PRESETS {
            chingu_model::Config::preset(preset, 1000).unwrap();
        }
    }

    #[test]
    fn example_manifests_parse() {
        let q = Manifest::parse(
            Path::new("deploy/quickstart.toml"),
            include_str!("../../deploy/quickstart.toml"),
        )
        .unwrap();
        assert_eq!(
            q.job,
            Job { name: "quickstart".into(), run: "runs/quickstart".into(), seed: 1 }
        );
        assert_eq!(q.data, Data { path: "prepared".into(), prepare_embedded: true });
        assert_eq!(q.model.preset, "tiny");
        let t = &q.train;
        assert_eq!((t.steps, t.batch_tokens, t.accumulate, t.lr), (8000, 1024, 1, 1e-3));
        assert_eq!((t.schedule.as_str(), t.warmup, t.eval_every), ("cosine", 200, 1000));
        assert_eq!(
            q.workers,
            Workers { count: 1, backend: Backend::Auto, collective: CollectiveKind::Auto }
        );
        assert_eq!((q.checkpoint.every_steps, q.checkpoint.keep), (1000, 3));
        assert_eq!(q.restart, RestartPolicy { max_restarts: 3, heartbeat_timeout_s: 30.0 });
        assert_eq!(q.coordinator, CoordinatorSection::default());

        let c = Manifest::parse(
            Path::new("deploy/cpu-2workers.toml"),
            include_str!("../../deploy/cpu-2workers.toml"),
        )
        .unwrap();
        assert_eq!(c.job.name, "cpu-2workers");
        assert_eq!(c.job.run, Path::new("runs/cpu-2workers"));
        assert_eq!(
            c.workers,
            Workers { count: 2, backend: Backend::Cpu, collective: CollectiveKind::Auto }
        );
        assert_eq!((c.train.steps, c.train.batch_tokens), (8000, 512));
        // The same global batch as the quickstart's, split over two workers.
        let global = |m: &Manifest| m.train.batch_tokens * m.train.accumulate * m.workers.count;
        assert_eq!(global(&c), global(&q));
        assert_eq!(Train { batch_tokens: 1024, ..c.train.clone() }, q.train);
    }
}
