//! The token-shard file format (version 1): question/answer pairs as token ids, read with mmap.
//!
//! ```text
//! offset 0    header, 128 bytes, little-endian
//!   0..8      magic  b"CHNGSHRD"
//!   8..12     format version (u32) = 1
//!   12..16    token width in bytes (u32): 2 when the vocabulary fits in u16, else 4
//!   16..20    vocabulary size (u32); every token id is below it
//!   20..24    flags (u32), 0
//!   24..32    record count N (u64)
//!   32..40    token count T (u64)
//!   40..48    index offset in bytes (u64)
//!   48..64    zero
//!   64..96    sha256 of (body ‖ header bytes 0..64)
//!   96..128   zero
//! 128         body: tokens, T × width bytes: each record's question then its answer
//!             zero padding to a multiple of 8
//! index       2N + 1 u64 token offsets: question start and answer start of each record, then T
//! ```
//! Shards are written to a temporary name, fsynced and renamed by the caller's output
//! directory; the checksum catches a file damaged later.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::{Error, Result};

/// The first eight bytes of every shard.
pub const MAGIC: &[u8; 8] = b"CHNGSHRD";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 128;

/// Bytes per token for a vocabulary size: u16 when every id fits.
pub fn token_width(vocab_size: u32) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Streams records into a new shard file.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    body_hash: Sha256,
    width: u32,
    vocab_size: u32,
    /// Token offset of each record's question start and answer start, in order.
    offsets: Vec<u64>,
    tokens: u64,
    scratch: Vec<u8>,
}

/// What a finished shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    /// Records (pairs).
    pub records: u64,
    /// Tokens in all records.
    pub tokens: u64,
}

impl ShardWriter {
    /// Creates `path` (truncating it) for ids below `vocab_size`.
    pub fn create(path: &Path, vocab_size: u32) -> Result<Self> {
        if vocab_size == 0 {
            return Err(Error::Invalid("a shard needs a vocabulary of at least one token".into()));
        }
        let file = File::create(path).at(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN as usize]).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            body_hash: Sha256::new(),
            width: token_width(vocab_size),
            vocab_size,
            offsets: Vec::new(),
            tokens: 0,
            scratch: Vec::new(),
        })
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.offsets.len() as u64 / 2
    }

    /// Appends one pair.
    pub fn push(&mut self, question: &[u32], answer: &[u32]) -> Result<()> {
        if let Some(&bad) = question.iter().chain(answer).find(|&&t| t >= self.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.offsets.push(self.tokens);
        self.write_tokens(question)?;
        self.offsets.push(self.tokens);
        self.write_tokens(answer)
    }

    fn write_tokens(&mut self, tokens: &[u32]) -> Result<()> {
        self.scratch.clear();
        if self.width == 2 {
            self.scratch.extend(tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()));
        } else {
            self.scratch.extend(tokens.iter().flat_map(|&t| t.to_le_bytes()));
        }
        let scratch = std::mem::take(&mut self.scratch);
        let written = self.write_body(&scratch);
        self.scratch = scratch;
        self.tokens += tokens.len() as u64;
        written
    }

    fn write_body(&mut self, bytes: &[u8]) -> Result<()> {
        self.body_hash.update(bytes);
        self.out.write_all(bytes).at(&self.path)
    }

    /// Writes the index and header and fsyncs the file.
    pub fn finish(mut self) -> Result<ShardStats> {
        let token_bytes = self.tokens * u64::from(self.width);
        let padding = (8 - token_bytes % 8) % 8;
        self.write_body(&vec![0u8; padding as usize])?;
        let index_offset = HEADER_LEN + token_bytes + padding;
        let mut index = Vec::with_capacity((self.offsets.len() + 1) * 8);
        for &offset in self.offsets.iter().chain([&self.tokens]) {
            index.extend_from_slice(&offset.to_le_bytes());
        }
        self.write_body(&index)?;

        let records = self.records();
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&self.width.to_le_bytes());
        header[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        header[24..32].copy_from_slice(&records.to_le_bytes());
        header[32..40].copy_from_slice(&self.tokens.to_le_bytes());
        header[40..48].copy_from_slice(&index_offset.to_le_bytes());
        let mut hash = self.body_hash.clone();
        hash.update(&header[0..64]);
        header[64..96].copy_from_slice(&hash.finalize());

        let path = self.path;
        let mut file = self.out.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).at(&path)?;
        file.write_all(&header).at(&path)?;
        file.sync_all().at(&path)?;
        Ok(ShardStats { records, tokens: self.tokens })
    }
}

/// A shard opened read-only through mmap.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    width: u32,
    vocab_size: u32,
    records: usize,
    tokens: u64,
    index_offset: usize,
}

/// The token ids of one side of a record, read straight from the mapped file.
#[derive(Clone, Copy)]
pub struct Tokens<'a> {
    bytes: &'a [u8],
    width: u32,
}

impl<'a> Tokens<'a> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.width as usize
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The ids in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let width = self.width as usize;
        self.bytes.chunks_exact(width).map(move |c| {
            if width == 2 {
                u32::from(u16::from_le_bytes([c[0], c[1]]))
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            }
        })
    }

    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

/// One record: a question and its answer.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    /// The question's tokens.
    pub question: Tokens<'a>,
    /// The answer's tokens.
    pub answer: Tokens<'a>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Shard {
    /// Maps `path` and checks its structure (magic, version, sizes, offsets). The checksum is
    /// checked by [`Shard::verify_checksum`], which reads the whole file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: the map is read-only and shards are never modified in place (they are
        // replaced by rename), so the mapped bytes cannot change under us.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let corrupt = |message: String| Error::CorruptShard { path: path.to_path_buf(), message };
        if map.len() < HEADER_LEN as usize {
            return Err(corrupt(format!("{} bytes is shorter than the header", map.len())));
        }
        if &map[0..8] != MAGIC {
            return Err(corrupt("not a chingu shard (bad magic)".into()));
        }
        if map[96..HEADER_LEN as usize].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved header bytes are not zero".into()));
        }
        let version = le_u32(&map, 8);
        if version != VERSION {
            return Err(corrupt(format!(
                "format version {version}, this chingu reads version {VERSION}; re-run chingu prepare"
            )));
        }
        let width = le_u32(&map, 12);
        let vocab_size = le_u32(&map, 16);
        let records = le_u64(&map, 24);
        let tokens = le_u64(&map, 32);
        let index_offset = le_u64(&map, 40);
        if width != token_width(vocab_size) {
            return Err(corrupt(format!(
                "token width {width} does not fit vocabulary size {vocab_size}"
            )));
        }
        let token_end =
            tokens.checked_mul(u64::from(width)).and_then(|b| b.checked_add(HEADER_LEN));
        let expected_len = records
            .checked_mul(2)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(8))
            .and_then(|n| n.checked_add(index_offset));
        match (token_end, expected_len) {
            (Some(end), Some(len)) if end <= index_offset && index_offset - end < 8 && len == map.len() as u64 => {}
            _ => {
                return Err(corrupt(format!(
                    "sizes disagree: {records} records, {tokens} tokens, index at {index_offset}, file {} bytes (truncated?)",
                    map.len()
                )))
            }
        }
        let shard = Shard {
            path: path.to_path_buf(),
            width,
            vocab_size,
            records: records as usize,
            tokens,
            index_offset: index_offset as usize,
            map,
        };
        let mut previous = 0;
        for i in 0..=2 * shard.records {
            let offset = shard.offset(i);
            if offset < previous || (i == 0 && offset != 0) {
                return Err(corrupt(format!("record offsets are not increasing at entry {i}")));
            }
            previous = offset;
        }
        if previous != tokens {
            return Err(corrupt(format!("index ends at token {previous}, header says {tokens}")));
        }
        Ok(shard)
    }

    /// Maps and fully verifies `path`, checksum included.
    pub fn open_verified(path: &Path) -> Result<Self> {
        let shard = Self::open(path)?;
        shard.verify_checksum()?;
        Ok(shard)
    }

    /// Recomputes the sha256 and compares it with the header's.
    pub fn verify_checksum(&self) -> Result<()> {
        let mut hash = Sha256::new();
        hash.update(&self.map[HEADER_LEN as usize..]);
        hash.update(&self.map[0..64]);
        if hash.finalize().as_slice() != &self.map[64..96] {
            return Err(Error::CorruptShard {
                path: self.path.clone(),
                message: "checksum mismatch: the file was damaged after it was written".into(),
            });
        }
        Ok(())
    }

    fn offset(&self, entry: usize) -> u64 {
        le_u64(&self.map, self.index_offset + entry * 8)
    }

    fn tokens_between(&self, start: u64, end: u64) -> Tokens<'_> {
        let w = u64::from(self.width);
        let from = (HEADER_LEN + start * w) as usize;
        let to = (HEADER_LEN + end * w) as usize;
        Tokens { bytes: &self.map[from..to], width: self.width }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when the shard holds no records.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Total tokens.
    pub fn total_tokens(&self) -> u64 {
        self.tokens
    }

    /// The vocabulary size the shard was written for.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Record `i` (panics when out of range, like slice indexing).
    pub fn record(&self, i: usize) -> Record<'_> {
        assert!(i < self.records, "record {i} out of range for a shard of {}", self.records);
        let (q, a, end) = (self.offset(2 * i), self.offset(2 * i + 1), self.offset(2 * i + 2));
        Record { question: self.tokens_between(q, a), answer: self.tokens_between(a, end) }
    }

    /// All records in order.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        (0..self.records).map(|i| self.record(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(path: &Path, vocab: u32, records: &[(Vec<u32>, Vec<u32>)]) -> ShardStats {
        let mut w = ShardWriter::create(path, vocab).unwrap();
        for (q, a) in records {
            w.push(q, a).unwrap();
        }
        w.finish().unwrap()
    }

    /// A vocabulary size and records drawn below it.
    type Records = (u32, Vec<(Vec<u32>, Vec<u32>)>);

    fn records_strategy() -> impl Strategy<Value = Records> {
        prop_oneof![Just(300u32), Just(65_536u32), Just(70_000u32), Just(u32::MAX)].prop_flat_map(
            |vocab| {
                let tok = 0..vocab;
                let side = prop::collection::vec(tok, 0..20);
                (Just(vocab), prop::collection::vec((side.clone(), side), 0..30))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trips((vocab, records) in records_strategy()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.shard");
            let stats = write(&path, vocab, &records);
            prop_assert_eq!(stats.records, records.len() as u64);
            let shard = Shard::open_verified(&path).unwrap();
            prop_assert_eq!(shard.len(), records.len());
            prop_assert_eq!(shard.vocab_size(), vocab);
            let total: usize = records.iter().map(|(q, a)| q.len() + a.len()).sum();
            prop_assert_eq!(shard.total_tokens(), total as u64);
            for (i, (q, a)) in records.iter().enumerate() {
                let r = shard.record(i);
                prop_assert_eq!(&r.question.to_vec(), q);
                prop_assert_eq!(&r.answer.to_vec(), a);
            }
        }

        #[test]
        fn any_flipped_byte_is_detected(
            (vocab, records) in records_strategy(),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.shard");
            write(&path, vocab, &records);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = position.index(bytes.len());
            bytes[at] ^= flip;
            std::fs::write(&path, &bytes).unwrap();
            prop_assert!(Shard::open_verified(&path).is_err(), "flip at byte {} went unnoticed", at);
        }
    }

    #[test]
    fn uses_two_bytes_per_token_for_small_vocabularies() {
        assert_eq!(token_width(8_000), 2);
        assert_eq!(token_width(65_536), 2);
        assert_eq!(token_width(65_537), 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.shard");
        write(&path, 1000, &[(vec![1, 2, 3], vec![4])]);
        // header + 4 tokens × 2 bytes, padded to 8 + index of 3 u64.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 + 8 + 24);
    }

    #[test]
    fn truncation_and_foreign_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.shard");
        write(&path, 1000, &[(vec![1, 2, 3], vec![4, 5])]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        let err = Shard::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, "Q,A\n".repeat(100)).unwrap();
        let err = Shard::open(&path).err().unwrap().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }

    #[test]
    fn out_of_vocabulary_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(&dir.path().join("x.shard"), 10).unwrap();
        let err = w.push(&[1, 10], &[]).unwrap_err().to_string();
        assert!(err.contains("token id 10"), "{err}");
    }
}
