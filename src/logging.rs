//! Logging set-up: readable lines on stderr (`CHINGU_LOG` filters them; per-step training
//! events are hidden there by default) and every event as a JSON line in a file — the run's
//! `logs/train.jsonl`, `logs/coordinator.jsonl`, or `logs/worker-RANK.jsonl`, which a worker
//! only learns after joining (so its file is opened late and earlier lines are buffered).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where JSON lines go.
pub enum JsonLog {
    /// Nowhere.
    None,
    /// This file (appended).
    File(PathBuf),
    /// A file named later ([`DeferredLog::open`]).
    Deferred(DeferredLog),
}

enum Sink {
    Buffer(Vec<u8>),
    File(File),
    /// The file could not be opened: drop lines rather than buffer them forever.
    Discard,
}

/// A JSON log whose file is chosen after logging starts; lines before that are kept in memory.
#[derive(Clone)]
pub struct DeferredLog(Arc<Mutex<Sink>>);

impl Default for DeferredLog {
    fn default() -> Self {
        DeferredLog(Arc::new(Mutex::new(Sink::Buffer(Vec::new()))))
    }
}

impl DeferredLog {
    /// Opens `path` (appending), writes the buffered lines to it, and sends later lines there.
    pub fn open(&self, path: &Path) -> std::io::Result<()> {
        let mut sink = self.0.lock().expect("log sink");
        let mut file = match open_append(path) {
            Ok(file) => file,
            Err(e) => {
                *sink = Sink::Discard;
                return Err(e);
            }
        };
        if let Sink::Buffer(buffered) = &*sink {
            file.write_all(buffered)?;
        }
        *sink = Sink::File(file);
        Ok(())
    }
}

/// One writer handle of a [`DeferredLog`].
pub struct DeferredWriter(Arc<Mutex<Sink>>);

impl Write for DeferredWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.0.lock().expect("log sink") {
            Sink::Buffer(b) => {
                b.extend_from_slice(buf);
                Ok(buf.len())
            }
            Sink::File(f) => f.write(buf),
            Sink::Discard => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut *self.0.lock().expect("log sink") {
            Sink::Buffer(_) | Sink::Discard => Ok(()),
            Sink::File(f) => f.flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for DeferredLog {
    type Writer = DeferredWriter;

    fn make_writer(&'a self) -> Self::Writer {
        DeferredWriter(self.0.clone())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Installs the global subscriber.
pub fn init(json_log: JsonLog) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, EnvFilter};
    let stderr_filter = EnvFilter::try_from_env("CHINGU_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,chingu::train::step=warn"));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(stderr_filter);
    let json_filter = || EnvFilter::new("info");
    let (file, deferred) = match json_log {
        JsonLog::None => (None, None),
        JsonLog::File(path) => (
            Some(
                fmt::layer()
                    .json()
                    .with_writer(Mutex::new(open_append(&path)?))
                    .with_filter(json_filter()),
            ),
            None,
        ),
        JsonLog::Deferred(log) => {
            (None, Some(fmt::layer().json().with_writer(log).with_filter(json_filter())))
        }
    };
    tracing_subscriber::registry().with(stderr).with(file).with(deferred).init();
    Ok(())
}
