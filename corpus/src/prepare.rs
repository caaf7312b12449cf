//! `chingu prepare`: inputs → normalised, de-duplicated, split pairs → tokenizer → token shards
//! and a manifest, with bounded memory.
//!
//! Three passes, so nothing holds the corpus:
//! 1. **read**: every reader streams pairs; each is normalised, de-duplicated by a 128-bit hash
//!    (16 bytes per kept pair is the only state that grows with the corpus), assigned a split
//!    and appended to a spill file in the staging directory.
//! 2. **tokenizer**: trained on a deterministic, evenly spaced sample of the train split, read
//!    back from the spill file (or loaded with `--tokenizer`).
//! 3. **encode**: the spill file is read in chunks, each chunk encoded in parallel and written in
//!    order to the split's current shard.
//!
//! Output appears under `--out` only when complete (see [`crate::durable`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::durable::{sha256_file, write_synced, Staging};
use crate::error::IoContext;
use crate::manifest::*;
use crate::progress::{Progress, ProgressMode, Unit};
use crate::readers::{
    discover, read_aihub, read_csv, read_jsonl, AihubFilter, Format, HashingReader, InputFile,
};
use crate::record::{Event, Split};
use crate::shard::{ShardWriter, VERSION as SHARD_VERSION};
use crate::{normalize::normalize, sample, tokenizer, Error, Result};

/// How many bad records the manifest and summary quote.
const BAD_EXAMPLES: usize = 5;
/// Pairs encoded per parallel batch.
const ENCODE_CHUNK: usize = 8192;

/// Everything `chingu prepare` can be told.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files and directories to read; empty means the embedded sample corpus.
    pub inputs: Vec<PathBuf>,
    /// The output directory.
    pub out: PathBuf,
    /// Forces one format for every input.
    pub format: Option<Format>,
    /// AIHub dialogue filters.
    pub filter: AihubFilter,
    /// Share of pairs (by hash) that go to the valid split when the input does not say.
    pub valid_fraction: f64,
    /// Tokenizer vocabulary size to train.
    pub vocab_size: usize,
    /// Reuse this tokenizer.json instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Count and skip malformed records instead of stopping.
    pub skip_bad: bool,
    /// Records per shard file.
    pub shard_records: u64,
    /// At most this many train pairs feed the tokenizer trainer.
    pub tokenizer_sample: u64,
    /// How to show progress.
    pub progress: ProgressMode,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            out: PathBuf::from("prepared"),
            format: None,
            filter: AihubFilter::default(),
            valid_fraction: 0.05,
            vocab_size: 16_000,
            tokenizer: None,
            skip_bad: false,
            shard_records: 1 << 18,
            tokenizer_sample: 500_000,
            progress: ProgressMode::Auto,
        }
    }
}

/// What a run did: the manifest written, plus timings (kept out of the manifest so that
/// reruns are byte-identical).
#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// Where the output is.
    pub out: PathBuf,
    /// The manifest as written.
    pub manifest: Manifest,
    /// Phase 1 wall time.
    pub read_time: Duration,
    /// Phase 2 wall time.
    pub tokenizer_time: Duration,
    /// Phase 3 wall time.
    pub encode_time: Duration,
}

/// Runs the whole pipeline.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    if !(0.0..1.0).contains(&opts.valid_fraction) {
        return Err(Error::Invalid(format!(
            "--valid-fraction must be in [0, 1), got {}",
            opts.valid_fraction
        )));
    }
    if opts.shard_records == 0 || opts.tokenizer_sample == 0 {
        return Err(Error::Invalid(
            "--shard-records and --tokenizer-sample must be positive".into(),
        ));
    }
    if opts.tokenizer.is_none() && opts.vocab_size < tokenizer::MIN_VOCAB_SIZE {
        return Err(Error::Invalid(format!(
            "--vocab-size must be at least {}, got {}",
            tokenizer::MIN_VOCAB_SIZE,
            opts.vocab_size
        )));
    }
    // Load a given tokenizer before any work, so a bad path fails fast.
    let reused =
        opts.tokenizer.as_deref().map(|p| Ok::<_, Error>((tokenizer::load(p)?, p))).transpose()?;
    let staging = Staging::new(&opts.out, MANIFEST_FILE)?;
    let spill_path = staging.path().join("pairs.spill");

    // Phase 1: read.
    let mut reading = ReadPass::new(opts, &spill_path)?;
    let computed = opts.inputs.is_empty().then(sample::computed);
    let discovered;
    let files: &[InputFile] = if opts.inputs.is_empty() {
        &[]
    } else {
        discovered = discover(&opts.inputs, opts.format)?;
        reading.counts.ignored_files = discovered.ignored.len() as u64;
        if discovered.files.is_empty() {
            return Err(Error::Invalid(format!(
                "no input files found in {} (looked for .json, .jsonl, .csv)",
                opts.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        &discovered.files
    };
    let total_bytes =
        files.iter().map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0)).sum();
    let mut progress = Progress::new(opts.progress, "read", Unit::Bytes, total_bytes);
    if let Some(computed) = &computed {
        reading.read_embedded(computed)?;
    }
    let mut bytes_done = 0;
    for file in files {
        bytes_done += reading.read_file(file)?;
        progress.update(bytes_done, reading.counts.pairs_read);
    }
    let read_time = progress.finish();
    let ReadPass { counts, sources, bad_examples, spill, .. } = reading;
    spill.finish()?;
    if counts.train == 0 {
        return Err(Error::Invalid(format!(
            "no training pairs: read {} pairs, {} duplicates, {} empty, {} bad",
            counts.pairs_read, counts.duplicates, counts.empty, counts.bad
        )));
    }

    // Phase 2: tokenizer.
    let started = std::time::Instant::now();
    let tokenizer_path = staging.path().join("tokenizer.json");
    let (tok, origin, trained_on_pairs) = match reused {
        Some((tok, path)) => {
            std::fs::copy(path, &tokenizer_path).at(&tokenizer_path)?;
            (tok, "reused", 0)
        }
        None => {
            let stride = counts.train.div_ceil(opts.tokenizer_sample);
            let failure = Mutex::new(None);
            let texts = || {
                let reader = SpillReader::open(&spill_path);
                let reader =
                    reader.map_err(|e| *failure.lock().expect("not poisoned") = Some(e)).ok();
                reader
                    .into_iter()
                    .flatten()
                    .map_while(|r| {
                        r.map_err(|e| *failure.lock().expect("not poisoned") = Some(e)).ok()
                    })
                    .filter(|(split, _, _)| *split == Split::Train)
                    .step_by(stride as usize)
                    .flat_map(|(_, q, a)| [q, a])
            };
            let tok = tokenizer::train(texts, opts.vocab_size)?;
            if let Some(e) = failure.into_inner().expect("not poisoned") {
                return Err(e);
            }
            write_synced(&tokenizer_path, tokenizer::to_json(&tok)?.as_bytes())?;
            (tok, "trained", counts.train.div_ceil(stride))
        }
    };
    let specials = tokenizer::special_ids(&tok)?;
    let vocab_size = tok.get_vocab_size(true) as u32;
    let tokenizer_entry = TokenizerEntry {
        file: "tokenizer.json".into(),
        sha256: sha256_file(&tokenizer_path)?,
        vocab_size,
        origin: origin.into(),
        trained_on_pairs,
        special_ids: specials.into(),
    };
    let tokenizer_time = started.elapsed();

    // Phase 3: encode and write shards.
    let mut progress = Progress::new(opts.progress, "encode", Unit::Pairs, counts.kept);
    // Indexed by `split as usize`: `Split::ALL` is in discriminant order.
    let mut writers = Split::ALL
        .map(|split| SplitShards::new(staging.path(), split, vocab_size, opts.shard_records));
    let mut lengths =
        [LengthCounter::default(), LengthCounter::default(), LengthCounter::default()];
    let mut reader = SpillReader::open(&spill_path)?;
    let mut done = 0u64;
    loop {
        let chunk: Vec<(Split, String, String)> =
            reader.by_ref().take(ENCODE_CHUNK).collect::<Result<_>>()?;
        if chunk.is_empty() {
            break;
        }
        let encoded: Vec<(Vec<u32>, Vec<u32>)> = chunk
            .par_iter()
            .map(|(_, q, a)| Ok((tokenizer::encode(&tok, q)?, tokenizer::encode(&tok, a)?)))
            .collect::<Result<_>>()?;
        for ((split, _, _), (q, a)) in chunk.iter().zip(&encoded) {
            lengths[0].add(q.len());
            lengths[1].add(a.len());
            lengths[2].add(q.len() + a.len());
            writers[*split as usize].push(q, a)?;
        }
        done += chunk.len() as u64;
        progress.update(done, done);
    }
    drop(reader);
    std::fs::remove_file(&spill_path).at(&spill_path)?;
    let mut shards = Vec::new();
    for writer in writers {
        shards.extend(writer.finish()?);
    }
    let encode_time = progress.finish();

    let heldout = match &computed {
        Some(computed) => Some(write_heldout(staging.path(), &computed.heldout)?),
        None => None,
    };
    let [question, answer, pair] = lengths.map(|c| c.stats());
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        shard_version: SHARD_VERSION,
        chingu_version: env!("CARGO_PKG_VERSION").into(),
        options: OptionsEntry {
            format: opts.format,
            categories: opts.filter.categories.clone(),
            speaker_types: opts.filter.speaker_types.clone(),
            valid_fraction: opts.valid_fraction,
            vocab_size: opts.vocab_size,
            skip_bad: opts.skip_bad,
            shard_records: opts.shard_records,
            tokenizer_sample: opts.tokenizer_sample,
        },
        sources,
        counts,
        bad_examples,
        tokenizer: tokenizer_entry,
        lengths: Lengths { question, answer, pair },
        shards,
        heldout,
    };
    let mut json =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    json.push('\n');
    write_synced(&staging.path().join(MANIFEST_FILE), json.as_bytes())?;
    let out = staging.commit()?;
    Ok(PrepareReport { out, manifest, read_time, tokenizer_time, encode_time })
}

/// File name of the held-out computed questions.
pub const HELDOUT_FILE: &str = "heldout.jsonl";

fn write_heldout(dir: &Path, items: &[sample::Computed]) -> Result<FileEntry> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    let path = dir.join(HELDOUT_FILE);
    write_synced(&path, text.as_bytes())?;
    Ok(FileEntry {
        file: HELDOUT_FILE.into(),
        records: items.len() as u64,
        sha256: sha256_file(&path)?,
    })
}

/// Phase 1 state.
struct ReadPass<'a> {
    opts: &'a PrepareOptions,
    seen: HashSet<u128>,
    spill: SpillWriter,
    counts: Counts,
    sources: Vec<SourceEntry>,
    bad_examples: Vec<String>,
}

impl<'a> ReadPass<'a> {
    fn new(opts: &'a PrepareOptions, spill_path: &Path) -> Result<Self> {
        Ok(Self {
            opts,
            seen: HashSet::new(),
            spill: SpillWriter::create(spill_path)?,
            counts: Counts::default(),
            sources: Vec::new(),
            bad_examples: Vec::new(),
        })
    }

    /// Handles one reader event; `source` accumulates the per-file counts.
    fn handle(&mut self, event: Event, source: &mut SourceEntry) -> Result<()> {
        match event {
            Event::Pair(pair) => {
                source.pairs += 1;
                self.counts.pairs_read += 1;
                let question = normalize(&pair.question);
                let answer = normalize(&pair.answer);
                if question.is_empty() || answer.is_empty() {
                    self.counts.empty += 1;
                    return Ok(());
                }
                // U+001F cannot survive normalisation, so it separates the two unambiguously.
                let mut hasher = Xxh3::new();
                hasher.update(question.as_bytes());
                hasher.update(b"\x1f");
                hasher.update(answer.as_bytes());
                let key = hasher.digest128();
                if !self.seen.insert(key) {
                    self.counts.duplicates += 1;
                    return Ok(());
                }
                let split =
                    pair.split.unwrap_or_else(|| split_by_hash(key, self.opts.valid_fraction));
                match split {
                    Split::Train => self.counts.train += 1,
                    Split::Valid => self.counts.valid += 1,
                }
                self.counts.kept += 1;
                self.spill.write(split, &question, &answer)
            }
            Event::Bad(bad) if self.opts.skip_bad => {
                source.bad += 1;
                self.counts.bad += 1;
                if self.bad_examples.len() < BAD_EXAMPLES {
                    tracing::warn!(%bad, "skipping bad record");
                    self.bad_examples.push(bad.to_string());
                }
                Ok(())
            }
            Event::Bad(bad) => Err(Error::BadRecord(bad)),
            Event::DroppedLine => {
                self.counts.dropped_lines += 1;
                Ok(())
            }
            Event::FilteredDialogue => {
                self.counts.filtered_dialogues += 1;
                Ok(())
            }
        }
    }

    fn read_embedded(&mut self, computed: &sample::ComputedSet) -> Result<()> {
        let mut source = SourceEntry {
            path: format!(
                "<embedded>/{} + computed questions v{}",
                sample::DAILY_PATH,
                sample::GENERATOR_VERSION
            ),
            format: Format::Csv,
            sha256: sample::fingerprint(computed),
            bytes: sample::DAILY_CSV.len() as u64,
            pairs: 0,
            bad: 0,
        };
        sample::read_sample(computed, &mut |event| self.handle(event, &mut source))?;
        self.sources.push(source);
        Ok(())
    }

    /// Reads one file; returns its size in bytes.
    fn read_file(&mut self, file: &InputFile) -> Result<u64> {
        let path = &file.path;
        let mut source = SourceEntry {
            path: path.display().to_string(),
            format: file.format,
            sha256: String::new(),
            bytes: 0,
            pairs: 0,
            bad: 0,
        };
        let mut input = HashingReader::new(File::open(path).at(path)?);
        match file.format {
            Format::Csv => {
                read_csv(path, &mut input, file.split, &mut |e| self.handle(e, &mut source))?
            }
            Format::Jsonl => {
                read_jsonl(path, &mut input, file.split, &mut |e| self.handle(e, &mut source))?
            }
            Format::Aihub => {
                let mut bytes = Vec::new();
                input.read_to_end(&mut bytes).at(path)?;
                let opts = self.opts;
                read_aihub(path, &bytes, file.split, &opts.filter, &mut |e| {
                    self.handle(e, &mut source)
                })?;
            }
        }
        let (sha256, bytes) = input.finish().at(path)?;
        source.sha256 = sha256;
        source.bytes = bytes;
        self.sources.push(source);
        Ok(bytes)
    }
}

/// Valid when the pair's hash falls in the lowest `valid_fraction` of the 64-bit range.
fn split_by_hash(key: u128, valid_fraction: f64) -> Split {
    let position = (key >> 64) as u64 as f64 / 18_446_744_073_709_551_616.0;
    if position < valid_fraction {
        Split::Valid
    } else {
        Split::Train
    }
}

/// Spill record: split (u8), question length (u32 LE), answer length (u32 LE), both texts.
struct SpillWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl SpillWriter {
    fn create(path: &Path) -> Result<Self> {
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, File::create(path).at(path)?),
            path: path.into(),
        })
    }

    fn write(&mut self, split: Split, question: &str, answer: &str) -> Result<()> {
        let mut header = [0u8; 9];
        header[0] = split as u8;
        header[1..5].copy_from_slice(&(question.len() as u32).to_le_bytes());
        header[5..9].copy_from_slice(&(answer.len() as u32).to_le_bytes());
        self.out.write_all(&header).at(&self.path)?;
        self.out.write_all(question.as_bytes()).at(&self.path)?;
        self.out.write_all(answer.as_bytes()).at(&self.path)
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush().at(&self.path)
    }
}

struct SpillReader {
    input: BufReader<File>,
    path: PathBuf,
}

impl SpillReader {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            input: BufReader::with_capacity(1 << 20, File::open(path).at(path)?),
            path: path.into(),
        })
    }

    fn next_record(&mut self) -> Result<Option<(Split, String, String)>> {
        let mut header = [0u8; 9];
        match self.input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::io(&self.path, e)),
        }
        let split = if header[0] == Split::Valid as u8 { Split::Valid } else { Split::Train };
        let q_len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
        let a_len = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
        let mut text = vec![0u8; q_len + a_len];
        self.input.read_exact(&mut text).at(&self.path)?;
        let answer = String::from_utf8(text.split_off(q_len))
            .map_err(|e| Error::io(&self.path, std::io::Error::other(e)))?;
        let question =
            String::from_utf8(text).map_err(|e| Error::io(&self.path, std::io::Error::other(e)))?;
        Ok(Some((split, question, answer)))
    }
}

impl Iterator for SpillReader {
    type Item = Result<(Split, String, String)>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// The shards of one split: a new file every `per_shard` records.
struct SplitShards {
    dir: PathBuf,
    split: Split,
    vocab_size: u32,
    per_shard: u64,
    current: Option<ShardWriter>,
    done: Vec<ShardEntry>,
}

impl SplitShards {
    fn new(dir: &Path, split: Split, vocab_size: u32, per_shard: u64) -> Self {
        Self { dir: dir.into(), split, vocab_size, per_shard, current: None, done: Vec::new() }
    }

    fn file_name(&self, index: usize) -> String {
        format!("{}-{index:05}.shard", self.split.name())
    }

    fn push(&mut self, question: &[u32], answer: &[u32]) -> Result<()> {
        if self.current.as_ref().is_some_and(|w| w.records() >= self.per_shard) {
            self.close_current()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(self.file_name(self.done.len()));
            self.current = Some(ShardWriter::create(&path, self.vocab_size)?);
        }
        self.current.as_mut().expect("just opened").push(question, answer)
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            let file = self.file_name(self.done.len());
            let stats = writer.finish()?;
            let sha256 = sha256_file(&self.dir.join(&file))?;
            self.done.push(ShardEntry {
                file,
                split: self.split,
                records: stats.records,
                tokens: stats.tokens,
                sha256,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardEntry>> {
        self.close_current()?;
        Ok(self.done)
    }
}
