//! Input discovery and format detection, and the three readers (AIHub 543 JSON, Q/A CSV,
//! JSONL). Readers stream: each pushes [`Event`]s into a sink as it goes and never holds more
//! than one record (one dialogue file for AIHub) in memory.

mod aihub;
mod csv_qa;
mod jsonl;

pub use aihub::{read_aihub, AihubFilter};
pub use csv_qa::read_csv;
pub use jsonl::read_jsonl;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Location};
use crate::record::Split;
use crate::{Error, Result};

/// The input formats `chingu prepare` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// AIHub dataset 543 dialogue JSON (`info[].annotations.lines[].norm_text`).
    Aihub,
    /// A CSV with question and answer columns found by header name.
    Csv,
    /// One JSON object per line: `{"question", "answer"}` or `{"turns": [...]}`.
    Jsonl,
}

impl Format {
    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Format::Aihub => "aihub",
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "aihub" => Ok(Format::Aihub),
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            other => Err(format!("unknown format {other:?}: expected aihub, csv or jsonl")),
        }
    }
}

/// One file to read, with its format and the split its location implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// The file.
    pub path: PathBuf,
    /// How to read it.
    pub format: Format,
    /// `Some` when a `TL_*`/`VL_*` (or `Training`/`Validation`) folder on the path decides it.
    pub split: Option<Split>,
}

/// The result of walking the inputs.
#[derive(Debug, Default)]
pub struct Discovered {
    /// Files to read, in a deterministic order (arguments in order, directories sorted).
    pub files: Vec<InputFile>,
    /// Files inside directories that were passed over (unknown extension or hidden).
    pub ignored: Vec<PathBuf>,
}

/// Expands files and directory trees into the list of files to read.
///
/// Directory trees contribute files ending in `.json`, `.jsonl`, `.ndjson` or `.csv`; hidden
/// entries are skipped. A file named on the command line is always read, whatever its name.
pub fn discover(inputs: &[PathBuf], format_override: Option<Format>) -> Result<Discovered> {
    let mut found = Discovered::default();
    for input in inputs {
        let meta = std::fs::metadata(input).at(input)?;
        if meta.is_file() {
            let format = match format_override {
                Some(f) => f,
                None => detect_format(input)?,
            };
            found.files.push(InputFile { path: input.clone(), format, split: split_of(input) });
            continue;
        }
        let walker = walkdir::WalkDir::new(input)
            .follow_links(true)
            .sort_by(|a, b| a.file_name().cmp(b.file_name()))
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        for entry in walker {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(input).to_path_buf();
                Error::io(&path, e.into_io_error().unwrap_or_else(|| io::Error::other("walk")))
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.into_path();
            if !has_known_extension(&path) {
                found.ignored.push(path);
                continue;
            }
            let format = match format_override {
                Some(f) => f,
                None => detect_format(&path)?,
            };
            let split = split_of(&path);
            found.files.push(InputFile { path, format, split });
        }
    }
    Ok(found)
}

fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

fn has_known_extension(path: &Path) -> bool {
    matches!(extension(path).as_str(), "json" | "jsonl" | "ndjson" | "csv")
}

/// The split a path's folders imply: the innermost folder named `TL_*`/`Training*` (train) or
/// `VL_*`/`Validation*` (valid) decides, as in AIHub's download layout.
pub fn split_of(path: &Path) -> Option<Split> {
    let parent = path.parent()?;
    parent.components().rev().find_map(|c| {
        let name = c.as_os_str().to_string_lossy().to_ascii_lowercase();
        if name.starts_with("tl_") || name.starts_with("training") {
            Some(Split::Train)
        } else if name.starts_with("vl_") || name.starts_with("validation") {
            Some(Split::Valid)
        } else {
            None
        }
    })
}

/// Decides a file's format from its extension, looking at the content where the extension
/// is ambiguous: a `.json` file whose first line is a complete `{"question"...}` or
/// `{"turns"...}` object is JSONL; other `.json` files are AIHub documents.
pub fn detect_format(path: &Path) -> Result<Format> {
    match extension(path).as_str() {
        "csv" | "tsv" => return Ok(Format::Csv),
        "jsonl" | "ndjson" => return Ok(Format::Jsonl),
        _ => {}
    }
    let mut reader = BufReader::new(File::open(path).at(path)?);
    skip_bom(&mut reader).at(path)?;
    let mut first_line = String::new();
    // A failure to read here (say, invalid UTF-8) is reported properly by the reader later.
    let _ = reader.by_ref().take(1 << 20).read_line(&mut first_line);
    let trimmed = first_line.trim_start();
    if trimmed.starts_with('{') {
        let is_jsonl =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(trimmed.trim_end())
                .map(|obj| obj.contains_key("question") || obj.contains_key("turns"))
                .unwrap_or(false);
        return Ok(if is_jsonl { Format::Jsonl } else { Format::Aihub });
    }
    if extension(path) == "json" {
        return Ok(Format::Aihub);
    }
    if trimmed.is_empty() {
        return Err(Error::Input {
            location: Location::file(path),
            message: "cannot tell the format of an empty file; pass --format".into(),
        });
    }
    Ok(Format::Csv)
}

/// serde_json's message without its " at line L column C" tail (our locations carry that).
pub(crate) fn json_error_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) if e.line() > 0 => text[..at].to_string(),
        _ => text,
    }
}

/// Consumes a UTF-8 byte-order mark if the stream starts with one.
pub(crate) fn skip_bom(reader: &mut impl BufRead) -> io::Result<()> {
    let buf = reader.fill_buf()?;
    if buf.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(())
}

/// Wraps a reader and hashes every byte that passes through, so a source's sha256 costs no
/// second read of the file.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Starts hashing `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Reads whatever is left (so the hash covers the whole input), then returns the hex
    /// sha256 and the byte count.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex(&self.hasher.finalize()), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_follow_aihub_folders() {
        assert_eq!(split_of(Path::new("a/TL_01. KAKAO/x.json")), Some(Split::Train));
        assert_eq!(split_of(Path::new("a/Validation/VL_02/x.json")), Some(Split::Valid));
        assert_eq!(split_of(Path::new("VL_data/TL_inner/x.json")), Some(Split::Train));
        assert_eq!(split_of(Path::new("data/x.json")), None);
    }

    #[test]
    fn detects_formats_by_extension_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        assert_eq!(detect_format(&write("a.csv", "Q,A\n")).unwrap(), Format::Csv);
        assert_eq!(detect_format(&write("a.jsonl", "")).unwrap(), Format::Jsonl);
        let jsonl_named_json = write("b.json", "{\"question\":\"q\",\"answer\":\"a\"}\n{}\n");
        assert_eq!(detect_format(&jsonl_named_json).unwrap(), Format::Jsonl);
        assert_eq!(detect_format(&write("c.json", "{\n \"info\": []}")).unwrap(), Format::Aihub);
        assert_eq!(detect_format(&write("d.txt", "\u{feff}Q,A\n")).unwrap(), Format::Csv);
        let err = detect_format(&write("e.txt", "")).unwrap_err().to_string();
        assert!(err.contains("e.txt") && err.contains("--format"), "{err}");
    }

    #[test]
    fn discover_walks_sorted_and_skips_hidden_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("TL_b")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join("TL_b/2.json"), "{\"info\":[]}").unwrap();
        std::fs::write(root.join("TL_b/1.json"), "{\"info\":[]}").unwrap();
        std::fs::write(root.join("a.csv"), "Q,A\n").unwrap();
        std::fs::write(root.join("notes.txt"), "hi").unwrap();
        std::fs::write(root.join(".git/x.json"), "{}").unwrap();
        let found = discover(&[root.to_path_buf()], None).unwrap();
        let names: Vec<_> =
            found.files.iter().map(|f| f.path.strip_prefix(root).unwrap().to_owned()).collect();
        assert_eq!(
            names,
            [PathBuf::from("TL_b/1.json"), PathBuf::from("TL_b/2.json"), PathBuf::from("a.csv")]
        );
        assert_eq!(found.files[0].split, Some(Split::Train));
        assert_eq!(found.files[2].split, None);
        assert_eq!(found.ignored, [root.join("notes.txt")]);
    }

    #[test]
    fn hashing_reader_hashes_everything() {
        let mut r = HashingReader::new(&b"abc"[..]);
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        let (sha, bytes) = r.finish().unwrap();
        assert_eq!(bytes, 3);
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
