//! Prepared data as the trainer sees it: the manifest, tokenizer, shards, and batches of
//! token ids with the special tokens the model expects.

use std::path::{Path, PathBuf};

use chingu_corpus::batching::RecordRef;
use chingu_corpus::manifest::SpecialIdsEntry;
use chingu_corpus::shard::Shard;
use chingu_corpus::{tokenizer, Manifest, Split};
use chingu_model::Batch;

use crate::Result;

/// An opened prepared directory.
pub struct Prepared {
    /// Its path.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The tokenizer.
    pub tokenizer: tokenizer::Tokenizer,
    /// Train shards, verified.
    pub train: Vec<Shard>,
    /// Valid shards, verified.
    pub valid: Vec<Shard>,
}

impl Prepared {
    /// Opens `dir` and verifies every shard's checksum.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let tokenizer = tokenizer::load(&dir.join(&manifest.tokenizer.file))?;
        let mut train = Vec::new();
        let mut valid = Vec::new();
        for entry in &manifest.shards {
            let shard = Shard::open_verified(&dir.join(&entry.file))?;
            match entry.split {
                Split::Train => train.push(shard),
                Split::Valid => valid.push(shard),
            }
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, tokenizer, train, valid })
    }

    /// The tokenizer file.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.file)
    }

    /// Special token ids.
    pub fn specials(&self) -> SpecialIdsEntry {
        self.manifest.tokenizer.special_ids
    }
}

/// Builds a padded batch: source = question `</s>`; decoder input = `<s>` answer; target =
/// answer `</s>`.
pub fn make_batch(shards: &[Shard], records: &[RecordRef], specials: SpecialIdsEntry) -> Batch {
    let batch = records.len();
    let src_len = records.iter().map(|r| r.src_len as usize).max().unwrap_or(1);
    let tgt_len = records.iter().map(|r| r.tgt_len as usize).max().unwrap_or(1);
    let pad = specials.pad;
    let mut b = Batch {
        batch,
        src_len,
        tgt_len,
        src: vec![pad; batch * src_len],
        src_lengths: Vec::with_capacity(batch),
        tgt_in: vec![pad; batch * tgt_len],
        tgt_out: vec![pad; batch * tgt_len],
        tgt_lengths: Vec::with_capacity(batch),
    };
    for (row, r) in records.iter().enumerate() {
        let rec = shards[r.shard as usize].record(r.record as usize);
        let (q, a) = (rec.question.to_vec(), rec.answer.to_vec());
        let src = &mut b.src[row * src_len..];
        src[..q.len()].copy_from_slice(&q);
        src[q.len()] = specials.eos;
        b.src_lengths.push(q.len() + 1);
        let tin = &mut b.tgt_in[row * tgt_len..];
        tin[0] = specials.bos;
        tin[1..=a.len()].copy_from_slice(&a);
        let tout = &mut b.tgt_out[row * tgt_len..];
        tout[..a.len()].copy_from_slice(&a);
        tout[a.len()] = specials.eos;
        b.tgt_lengths.push(a.len() + 1);
    }
    b
}
