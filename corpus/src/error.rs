//! The corpus crate's error type, and `Location`, which says where in an input a problem is.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in an input file something was found: always the file, then as much as is known
/// (line and column for text formats, a JSON path such as `info[2].annotations.lines[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The input file.
    pub path: PathBuf,
    /// 1-based line number, when known.
    pub line: Option<u64>,
    /// 1-based column, when known.
    pub column: Option<u64>,
    /// Path inside a JSON document, when known.
    pub json_path: Option<String>,
}

impl Location {
    /// A location naming only the file.
    pub fn file(path: &Path) -> Self {
        Self { path: path.to_path_buf(), line: None, column: None, json_path: None }
    }

    /// A location naming a line of a file.
    pub fn line(path: &Path, line: u64) -> Self {
        Self { line: Some(line), ..Self::file(path) }
    }

    /// Adds a column.
    pub fn with_column(mut self, column: u64) -> Self {
        self.column = Some(column);
        self
    }

    /// Adds a JSON path.
    pub fn with_json_path(mut self, json_path: impl Into<String>) -> Self {
        self.json_path = Some(json_path.into());
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(json_path) = &self.json_path {
            write!(f, " at {json_path}")?;
        }
        Ok(())
    }
}

/// A malformed record: the run stops on it unless `--skip-bad` counts it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Where the record is.
    pub location: Location,
    /// What is wrong with it, phrased for a person.
    pub message: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed input record (see [`BadRecord`]).
    #[error("bad input: {0} (pass --skip-bad to count and skip such records)")]
    BadRecord(BadRecord),
    /// An input whose overall shape is unusable: no Q/A columns, unknown format, and so on.
    #[error("{location}: {message}")]
    Input {
        /// Where.
        location: Location,
        /// What is wrong and what to do.
        message: String,
    },
    /// A shard file that is not what it claims to be.
    #[error("{}: corrupt shard: {message}", path.display())]
    CorruptShard {
        /// The shard file.
        path: PathBuf,
        /// What check failed.
        message: String,
    },
    /// A failure inside the `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad options or an impossible request.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    /// A tokenizer-library error.
    pub fn tokenizer(err: impl fmt::Display) -> Self {
        Error::Tokenizer(err.to_string())
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
