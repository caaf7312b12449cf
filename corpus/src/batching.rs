//! Length-bucketed batches built to a token budget, in a deterministic order.
//!
//! Each epoch: every record is shuffled (seeded by run seed and epoch), cut into pools of
//! `POOL_BATCHES` batches' worth, each pool sorted by length and cut into batches whose padded
//! size `rows × (longest source + longest target)` stays within the budget; then the batches
//! of the epoch are shuffled. Neighbours in length share a batch, so little is padding. The
//! plan is a pure function of (records, seed, epoch, budget): a data cursor (epoch, batch
//! index) is all a checkpoint needs to resume exactly.

use crate::shard::Shard;
use crate::{Error, Result};

/// Pools span this many batches' worth of records before sorting by length.
const POOL_BATCHES: usize = 64;

/// Where one record lives and how long its sides are (in tokens, specials included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    /// Index into the shard list.
    pub shard: u32,
    /// Record index inside the shard.
    pub record: u32,
    /// Source length with `</s>`.
    pub src_len: u32,
    /// Target length with `<s>`/`</s>`.
    pub tgt_len: u32,
}

/// The position in the data stream: saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Epochs completed.
    pub epoch: u64,
    /// Batches of the current epoch already used.
    pub batch: u64,
}

/// splitmix64 stream for shuffles.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Lists every record of `shards` with its lengths (plus the specials the model adds:
/// `</s>` after the source, `<s>`…`</s>` around the target).
pub fn index_records(shards: &[Shard], max_len: usize) -> Result<(Vec<RecordRef>, usize)> {
    let mut records = Vec::new();
    let mut too_long = 0;
    for (s, shard) in shards.iter().enumerate() {
        for i in 0..shard.len() {
            let r = shard.record(i);
            let (src_len, tgt_len) = (r.question.len() + 1, r.answer.len() + 1);
            if src_len > max_len || tgt_len > max_len {
                too_long += 1;
                continue;
            }
            records.push(RecordRef {
                shard: s as u32,
                record: i as u32,
                src_len: src_len as u32,
                tgt_len: tgt_len as u32,
            });
        }
    }
    if records.is_empty() {
        return Err(Error::Invalid(format!(
            "no usable records ({too_long} longer than max_len {max_len})"
        )));
    }
    Ok((records, too_long))
}

/// The batches of one epoch, each a list of records sorted longest first.
pub fn epoch_plan(
    records: &[RecordRef],
    seed: u64,
    epoch: u64,
    batch_tokens: usize,
) -> Vec<Vec<RecordRef>> {
    let mut rng = Rng(seed ^ epoch.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut order = records.to_vec();
    rng.shuffle(&mut order);
    let mean_tokens =
        records.iter().map(|r| (r.src_len + r.tgt_len) as usize).sum::<usize>() / records.len();
    let pool = (POOL_BATCHES * batch_tokens / mean_tokens.max(1)).max(1);
    let mut batches = Vec::new();
    for chunk in order.chunks_mut(pool) {
        chunk.sort_by_key(|r| std::cmp::Reverse((r.src_len + r.tgt_len, r.src_len)));
        let mut current: Vec<RecordRef> = Vec::new();
        let (mut max_src, mut max_tgt) = (0usize, 0usize);
        for &r in chunk.iter() {
            let (s, t) = (max_src.max(r.src_len as usize), max_tgt.max(r.tgt_len as usize));
            if !current.is_empty() && (current.len() + 1) * (s + t) > batch_tokens {
                batches.push(std::mem::take(&mut current));
                (max_src, max_tgt) = (r.src_len as usize, r.tgt_len as usize);
            } else {
                (max_src, max_tgt) = (s, t);
            }
            current.push(r);
        }
        if !current.is_empty() {
            batches.push(current);
        }
    }
    rng.shuffle(&mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u32) -> Vec<RecordRef> {
        (0..n)
            .map(|i| RecordRef {
                shard: 0,
                record: i,
                src_len: 1 + (i * 7) % 30,
                tgt_len: 2 + (i * 13) % 20,
            })
            .collect()
    }

    #[test]
    fn every_record_once_per_epoch_within_budget() {
        let recs = records(1000);
        for epoch in 0..3 {
            let plan = epoch_plan(&recs, 9, epoch, 400);
            let mut seen: Vec<u32> = plan.iter().flatten().map(|r| r.record).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..1000).collect::<Vec<_>>());
            for batch in &plan {
                let s = batch.iter().map(|r| r.src_len).max().unwrap() as usize;
                let t = batch.iter().map(|r| r.tgt_len).max().unwrap() as usize;
                assert!(batch.len() == 1 || batch.len() * (s + t) <= 400);
            }
        }
    }

    #[test]
    fn plans_are_deterministic_and_vary_by_epoch() {
        let recs = records(500);
        assert_eq!(epoch_plan(&recs, 1, 0, 300), epoch_plan(&recs, 1, 0, 300));
        assert_ne!(epoch_plan(&recs, 1, 0, 300), epoch_plan(&recs, 1, 1, 300));
        assert_ne!(epoch_plan(&recs, 1, 0, 300), epoch_plan(&recs, 2, 0, 300));
    }

    #[test]
    fn bucketing_keeps_padding_low() {
        let recs = records(5000);
        let plan = epoch_plan(&recs, 3, 0, 2000);
        let real: usize = recs.iter().map(|r| (r.src_len + r.tgt_len) as usize).sum();
        let padded: usize = plan
            .iter()
            .map(|b| {
                b.len()
                    * (b.iter().map(|r| r.src_len).max().unwrap()
                        + b.iter().map(|r| r.tgt_len).max().unwrap()) as usize
            })
            .sum();
        assert!((padded as f64) < real as f64 * 1.25, "padding {padded} vs real {real}");
    }
}
