//! cuBLASLt's tuned choices kept on disk (`CHINGU_GEMM_TUNE`, on by default): for each product
//! shape, which of the heuristic's answers timing chose. A later process on this machine (the
//! same cache) — a resumed job, the next run, a rank started after the choice was kept — takes
//! the same algorithm without timing again, and so computes the same bits: timing alone would
//! choose anew each run, and two answers within the timing noise of each other could swap.
//! (Ranks that start together on an empty cache each time the shape, and the last to write
//! wins; machines with caches of their own choose for themselves.)
//!
//! One small file per (device, cuBLASLt version, product shape): the chosen answer's index and
//! a fingerprint of that algorithm's bytes, then the shape's whole description. A file is
//! written to a temporary name and renamed, so concurrent writers (ranks tuning the same
//! shape at once) never leave a half-written one; the last rename wins, and either choice is
//! a good one. A kept choice is taken only if the heuristic still offers that very algorithm
//! (found by its fingerprint, wherever it now stands); anything unreadable or stale costs a
//! timing, never an error.

use std::path::{Path, PathBuf};

/// The first line's tag: the format of a kept choice.
const FORMAT: &str = "chingu-cublaslt-tune v1";

/// Where kept choices live (`None`: nowhere, every shape timed in each process).
#[derive(Debug, Clone)]
pub struct TuneStore {
    dir: Option<PathBuf>,
}

impl TuneStore {
    /// Choices kept in `dir` (created at the first one written), or nowhere.
    pub fn at(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The file for `key` (a shape's whole description, device and library version
    /// included): named by the key's 128-bit hash.
    fn path(&self, key: &str) -> Option<PathBuf> {
        let hash = xxhash_rust::xxh3::xxh3_128(key.as_bytes());
        self.dir.as_ref().map(|d| d.join(format!("{hash:032x}.txt")))
    }

    /// The index, among the heuristic's answers now (given as `fingerprints`, in order), of
    /// the algorithm kept for `key`; `None` where none was kept, the file does not parse or
    /// names another key, or the heuristic no longer offers that algorithm.
    pub fn load(&self, key: &str, fingerprints: &[u64]) -> Option<usize> {
        let text = std::fs::read_to_string(self.path(key)?).ok()?;
        parse(&text, key, fingerprints)
    }

    /// Keeps answer `index` (its algorithm's `fingerprint`) for `key`.
    pub fn save(&self, key: &str, index: usize, fingerprint: u64) -> std::io::Result<()> {
        let Some(path) = self.path(key) else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_new(&path, format!("{FORMAT}\n{index} {fingerprint:016x}\n{key}\n").as_bytes())
    }
}

/// A kept choice's index among `fingerprints`: the stored index where the same algorithm is
/// still there, else wherever it now stands; `None` for another key, a malformed file or an
/// algorithm no longer offered.
fn parse(text: &str, key: &str, fingerprints: &[u64]) -> Option<usize> {
    let mut lines = text.lines();
    if lines.next()? != FORMAT {
        return None;
    }
    let (index, print) = lines.next()?.split_once(' ')?;
    let (index, print): (usize, u64) = (index.parse().ok()?, u64::from_str_radix(print, 16).ok()?);
    // The whole key, checked: a hash collision, or an edited file, takes nothing.
    if lines.collect::<Vec<_>>().join("\n") != key {
        return None;
    }
    if fingerprints.get(index) == Some(&print) {
        return Some(index);
    }
    fingerprints.iter().position(|&p| p == print)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced, then
/// renamed over it: readers see the old file or the whole new one (also the kernel cache's
/// writer, `nvrtc::compile_cached`). (`chingu-corpus`'s `durable.rs` does the same for
/// prepared data; this crate does not depend on it.)
pub(super) fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // A name no other writer uses: other processes (their ids), other devices of this one
    // (a counter), sharing the directory.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A fingerprint of an algorithm's opaque bytes (cuBLASLt's `cublasLtMatmulAlgo_t`).
pub fn fingerprint(words: &[u64]) -> u64 {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (TuneStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "chingu-tune-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        (TuneStore::at(Some(dir.join("nested"))), dir)
    }

    #[test]
    fn a_kept_choice_is_found_where_the_algorithm_now_stands() {
        let (store, dir) = store();
        let key = "NVIDIA H200 sm_90; cuBLASLt 130000; PlanKey { m: 18432, .. }";
        let prints = [11, 22, 33, 44];
        assert_eq!(store.load(key, &prints), None, "nothing kept yet");
        store.save(key, 2, 33).unwrap();
        assert_eq!(store.load(key, &prints), Some(2));
        // The heuristic's answers reordered: the same algorithm, at its new place.
        assert_eq!(store.load(key, &[33, 11, 22]), Some(0));
        // That algorithm no longer offered: timed again.
        assert_eq!(store.load(key, &[11, 22, 44]), None);
        // Another key (another device, another shape) takes nothing of it.
        assert_eq!(store.load("NVIDIA H100 sm_90; cuBLASLt 130000; PlanKey", &prints), None);
        // A later choice replaces it.
        store.save(key, 3, 44).unwrap();
        assert_eq!(store.load(key, &prints), Some(3));
        // No temporary file left behind.
        let names: Vec<String> = std::fs::read_dir(dir.join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].ends_with(".txt"), "{names:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn malformed_or_foreign_files_take_nothing() {
        let key = "k";
        let prints = [5, 6];
        assert_eq!(parse(&format!("{FORMAT}\n1 0000000000000006\nk\n"), key, &prints), Some(1));
        assert_eq!(parse(&format!("{FORMAT}\n1 0000000000000006\nother\n"), key, &prints), None);
        assert_eq!(parse("chingu-cublaslt-tune v0\n1 6\nk\n", key, &prints), None);
        assert_eq!(parse(&format!("{FORMAT}\n1\nk\n"), key, &prints), None);
        assert_eq!(parse(&format!("{FORMAT}\nx 6\nk\n"), key, &prints), None);
        assert_eq!(parse(&format!("{FORMAT}\n1 zz\nk\n"), key, &prints), None);
        assert_eq!(parse("", key, &prints), None);
        // An index past the answers, its algorithm elsewhere: found there.
        assert_eq!(parse(&format!("{FORMAT}\n9 0000000000000005\nk\n"), key, &prints), Some(0));
    }

    #[test]
    fn no_directory_keeps_nothing() {
        let store = TuneStore::at(None);
        store.save("k", 0, 1).unwrap();
        assert_eq!(store.load("k", &[1]), None);
    }

    #[test]
    fn fingerprints_tell_algorithms_apart() {
        let a = [1u64, 2, 3, 4, 5, 6, 7, 8];
        let mut b = a;
        b[7] ^= 1;
        assert_eq!(fingerprint(&a), fingerprint(&a));
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}
