//! chingu-corpus: everything between a raw corpus and training-ready token shards — the
//! readers (AIHub 543 JSON, Q/A CSV, JSONL), text normalisation, tokenizer training, the
//! shard format, the embedded sample corpus and the `chingu prepare` pipeline.

pub mod batching;
pub mod durable;
pub mod error;
pub mod manifest;
pub mod normalize;
pub mod prepare;
pub mod progress;
pub mod readers;
pub mod record;
pub mod sample;
pub mod shard;
pub mod tokenizer;

pub use error::{BadRecord, Error, Location, Result};
pub use manifest::Manifest;
pub use prepare::{prepare, PrepareOptions, PrepareReport};
pub use record::{RawPair, Split};
