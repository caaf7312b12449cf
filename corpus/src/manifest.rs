//! `manifest.json`: what a prepared directory holds and how it was made. Later stages read it
//! to find shards and the tokenizer and to check nothing changed underneath them. It holds no
//! timestamps or machine details, so the same inputs and options give the same bytes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::readers::Format;
use crate::record::Split;
use crate::tokenizer::SpecialIds;
use crate::{Error, Result};

/// The manifest layout this code writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// The manifest's file name inside a prepared directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// The shard format version ([`crate::shard::VERSION`]).
    pub shard_version: u32,
    /// The chingu version that wrote it.
    pub chingu_version: String,
    /// The options that shaped the output.
    pub options: OptionsEntry,
    /// Every input, in reading order.
    pub sources: Vec<SourceEntry>,
    /// What happened to the pairs.
    pub counts: Counts,
    /// The first few bad records (with `--skip-bad`), located.
    pub bad_examples: Vec<String>,
    /// The tokenizer.
    pub tokenizer: TokenizerEntry,
    /// Token-length statistics over kept pairs (train and valid).
    pub lengths: Lengths,
    /// The shard files, train first, each split in order.
    pub shards: Vec<ShardEntry>,
    /// The held-out computed questions (embedded corpus only).
    pub heldout: Option<FileEntry>,
}

/// Options recorded for reproducibility.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptionsEntry {
    /// `--format`, if forced.
    pub format: Option<Format>,
    /// `--category` filters.
    pub categories: Vec<String>,
    /// `--speaker-type` filters.
    pub speaker_types: Vec<String>,
    /// `--valid-fraction`.
    pub valid_fraction: f64,
    /// `--vocab-size` (requested; the tokenizer entry has the real size).
    pub vocab_size: usize,
    /// `--skip-bad`.
    pub skip_bad: bool,
    /// `--shard-records`.
    pub shard_records: u64,
    /// `--tokenizer-sample`.
    pub tokenizer_sample: u64,
}

/// One input file (or the embedded corpus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// The path as given, or `<embedded>/…` for the built-in sample.
    pub path: String,
    /// How it was read.
    pub format: Format,
    /// sha256 of its bytes (for the embedded corpus: of its content and generator output).
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Pairs it yielded before normalisation and de-duplication.
    pub pairs: u64,
    /// Bad records skipped in it.
    pub bad: u64,
}

/// Pair accounting: `pairs_read = kept + duplicates + empty`, `kept = train + valid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Pairs the readers produced.
    pub pairs_read: u64,
    /// Pairs written to shards.
    pub kept: u64,
    /// Exact duplicates (after normalisation) removed.
    pub duplicates: u64,
    /// Pairs whose question or answer was empty after normalisation.
    pub empty: u64,
    /// Lines dropped inside dialogues (empty or system placeholders).
    pub dropped_lines: u64,
    /// Dialogues excluded by `--category` / `--speaker-type`.
    pub filtered_dialogues: u64,
    /// Bad records skipped (`--skip-bad`).
    pub bad: u64,
    /// Kept pairs in the train split.
    pub train: u64,
    /// Kept pairs in the valid split.
    pub valid: u64,
    /// Files in input directories passed over (unknown extension).
    pub ignored_files: u64,
}

/// The tokenizer and how it came to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerEntry {
    /// File name inside the prepared directory.
    pub file: String,
    /// sha256 of that file.
    pub sha256: String,
    /// Tokens, special and byte tokens included.
    pub vocab_size: u32,
    /// `trained`, or `reused` (`--tokenizer FILE`).
    pub origin: String,
    /// Pairs it was trained on (a deterministic sample of the train split).
    pub trained_on_pairs: u64,
    /// Ids of `<pad> <s> </s> <unk> <sep>`.
    pub special_ids: SpecialIdsEntry,
}

/// Serialisable copy of [`SpecialIds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIdsEntry {
    /// `<pad>`
    pub pad: u32,
    /// `<s>`
    pub bos: u32,
    /// `</s>`
    pub eos: u32,
    /// `<unk>`
    pub unk: u32,
    /// `<sep>`
    pub sep: u32,
}

impl From<SpecialIds> for SpecialIdsEntry {
    fn from(s: SpecialIds) -> Self {
        Self { pad: s.pad, bos: s.bos, eos: s.eos, unk: s.unk, sep: s.sep }
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the prepared directory.
    pub file: String,
    /// Which split.
    pub split: Split,
    /// Records (pairs).
    pub records: u64,
    /// Tokens.
    pub tokens: u64,
    /// sha256 of the file.
    pub sha256: String,
}

/// Any other file in the prepared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the prepared directory.
    pub file: String,
    /// Records (lines).
    pub records: u64,
    /// sha256 of the file.
    pub sha256: String,
}

/// Token-length statistics for questions, answers and whole pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lengths {
    /// Question lengths.
    pub question: LengthStats,
    /// Answer lengths.
    pub answer: LengthStats,
    /// Question + answer.
    pub pair: LengthStats,
}

/// Summary of one length distribution, in tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    /// Mean, rounded to 0.01.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest.
    pub max: u64,
    /// Counts in power-of-two buckets: `[lo, hi)` tokens.
    pub histogram: Vec<Bucket>,
}

/// One histogram bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Inclusive lower bound.
    pub lo: u64,
    /// Exclusive upper bound; `null` for the open-ended last bucket.
    pub hi: Option<u64>,
    /// Sequences in the bucket.
    pub count: u64,
}

impl Manifest {
    /// Reads `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), e.line())))?;
        if manifest.format_version != MANIFEST_VERSION {
            return Err(Error::Invalid(format!(
                "{}: manifest version {} (this chingu reads {MANIFEST_VERSION}); re-run chingu prepare",
                path.display(),
                manifest.format_version
            )));
        }
        Ok(manifest)
    }
}

/// Exact length counts, summarised into [`LengthStats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct LengthCounter {
    counts: Vec<u64>,
    total: u64,
    sum: u64,
}

impl LengthCounter {
    pub(crate) fn add(&mut self, length: usize) {
        if self.counts.len() <= length {
            self.counts.resize(length + 1, 0);
        }
        self.counts[length] += 1;
        self.total += 1;
        self.sum += length as u64;
    }

    fn percentile(&self, p: f64) -> u64 {
        // Smallest length with at least p of the sequences at or below it.
        let needed = ((p * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (length, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= needed {
                return length as u64;
            }
        }
        0
    }

    pub(crate) fn stats(&self) -> LengthStats {
        let max = self.counts.len().saturating_sub(1) as u64;
        let mut histogram = Vec::new();
        let mut lo = 0u64;
        let mut hi = 8u64;
        while lo <= max || histogram.is_empty() {
            let last = hi > 1024;
            let upper =
                if last { self.counts.len() as u64 } else { hi.min(self.counts.len() as u64) };
            let count = (lo.min(upper)..upper).map(|l| self.counts[l as usize]).sum();
            histogram.push(Bucket { lo, hi: (!last).then_some(hi), count });
            if last {
                break;
            }
            lo = hi;
            hi *= 2;
        }
        let mean = if self.total == 0 {
            0.0
        } else {
            (self.sum as f64 / self.total as f64 * 100.0).round() / 100.0
        };
        LengthStats {
            mean,
            p50: self.percentile(0.5),
            p90: self.percentile(0.9),
            p99: self.percentile(0.99),
            max,
            histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_stats_are_exact() {
        let mut c = LengthCounter::default();
        for l in 1..=100 {
            c.add(l);
        }
        c.add(2000);
        let s = c.stats();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (51, 91, 100, 2000));
        assert_eq!(s.mean, 69.8);
        let counts: Vec<_> = s.histogram.iter().map(|b| (b.lo, b.hi, b.count)).collect();
        assert_eq!(
            counts,
            [
                (0, Some(8), 7),
                (8, Some(16), 8),
                (16, Some(32), 16),
                (32, Some(64), 32),
                (64, Some(128), 37),
                (128, Some(256), 0),
                (256, Some(512), 0),
                (512, Some(1024), 0),
                (1024, None, 1)
            ]
        );
    }

    #[test]
    fn empty_counter_has_one_empty_bucket() {
        let s = LengthCounter::default().stats();
        assert_eq!(s.max, 0);
        assert_eq!(s.histogram, [Bucket { lo: 0, hi: Some(8), count: 0 }]);
    }
}
