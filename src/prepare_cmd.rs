//! `chingu prepare`: arguments, and the summary table printed at the end.

use std::path::PathBuf;

use anyhow::Context;
use chingu_corpus::prepare::{prepare, PrepareOptions, PrepareReport};
use chingu_corpus::progress::ProgressMode;
use chingu_corpus::readers::{AihubFilter, Format};

/// Arguments of `chingu prepare` (the help text is on `Command::Prepare`).
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// Input files or directories (default: the embedded sample corpus).
    #[arg(value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output directory; replaced if it holds an earlier chingu prepare output.
    #[arg(long, default_value = "prepared")]
    pub out: PathBuf,
    /// Read every input as this format instead of detecting it.
    #[arg(long, value_parser = ["aihub", "csv", "jsonl"])]
    format: Option<String>,
    /// AIHub: keep only dialogues of this category (repeatable), e.g. 일상대화.
    #[arg(long = "category", value_name = "CATEGORY")]
    categories: Vec<String>,
    /// AIHub: keep only dialogues of this speaker type (repeatable), e.g. 1:1.
    #[arg(long = "speaker-type", value_name = "TYPE")]
    speaker_types: Vec<String>,
    /// Share of pairs sent to the valid split, chosen by a hash of the pair (ignored for
    /// inputs with their own split).
    #[arg(long, default_value_t = 0.05)]
    valid_fraction: f64,
    /// Vocabulary size of the trained tokenizer (special and 256 byte tokens included).
    #[arg(long, default_value_t = 16_000)]
    vocab_size: usize,
    /// Reuse this tokenizer.json instead of training one.
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Count and skip malformed records (the first few are listed) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Records per shard file.
    #[arg(long, default_value_t = 1 << 18)]
    shard_records: u64,
    /// Train the tokenizer on at most this many train pairs (an evenly spaced sample).
    #[arg(long, default_value_t = 500_000)]
    tokenizer_sample: u64,
    /// Progress display: a bar on a terminal and log lines otherwise (auto), always log
    /// lines (log), or none (quiet).
    #[arg(long, default_value = "auto", value_parser = ["auto", "log", "quiet"])]
    progress: String,
}

impl PrepareArgs {
    /// The quickstart: the embedded corpus with default options.
    pub fn quickstart() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: PrepareArgs,
        }
        Wrapper::parse_from(["chingu"]).args
    }

    fn options(self) -> anyhow::Result<PrepareOptions> {
        let format = self
            .format
            .as_deref()
            .map(str::parse::<Format>)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let progress = match self.progress.as_str() {
            "log" => ProgressMode::Log,
            "quiet" => ProgressMode::Quiet,
            _ => ProgressMode::Auto,
        };
        Ok(PrepareOptions {
            inputs: self.inputs,
            out: self.out,
            format,
            filter: AihubFilter { categories: self.categories, speaker_types: self.speaker_types },
            valid_fraction: self.valid_fraction,
            vocab_size: self.vocab_size,
            tokenizer: self.tokenizer,
            skip_bad: self.skip_bad,
            shard_records: self.shard_records,
            tokenizer_sample: self.tokenizer_sample,
            progress,
        })
    }
}

/// Runs `chingu prepare` and prints its summary.
pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let report = prepare(&options).context("chingu prepare failed; nothing was written")?;
    print!("{}", summary(&report));
    Ok(())
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(pairs: u64, seconds: f64) -> String {
    format!("{}/s", thousands((pairs as f64 / seconds.max(1e-9)) as u64))
}

/// The end-of-run table.
pub fn summary(report: &PrepareReport) -> String {
    let m = &report.manifest;
    let c = &m.counts;
    let bytes: u64 = m.sources.iter().map(|s| s.bytes).sum();
    let tokens = |split: &str| {
        m.shards.iter().filter(|s| s.split.name() == split).map(|s| s.tokens).sum::<u64>()
    };
    let shard_count = |split: &str| m.shards.iter().filter(|s| s.split.name() == split).count();
    let l = &m.lengths;
    let mut rows: Vec<(&str, String)> = vec![
        ("output", report.out.display().to_string()),
        ("sources", format!("{} file(s), {:.1} MB", m.sources.len(), bytes as f64 / 1e6)),
        ("pairs read", thousands(c.pairs_read)),
        (
            "kept",
            format!(
                "{} (train {}, valid {})",
                thousands(c.kept),
                thousands(c.train),
                thousands(c.valid)
            ),
        ),
        ("duplicates", thousands(c.duplicates)),
        ("empty", thousands(c.empty)),
        ("dropped lines", thousands(c.dropped_lines)),
        ("filtered", format!("{} dialogue(s)", thousands(c.filtered_dialogues))),
        ("bad records", thousands(c.bad)),
        (
            "tokenizer",
            format!(
                "{} tokens, {} (on {} pairs)",
                thousands(m.tokenizer.vocab_size.into()),
                m.tokenizer.origin,
                thousands(m.tokenizer.trained_on_pairs)
            ),
        ),
        (
            "tokens",
            format!("train {}, valid {}", thousands(tokens("train")), thousands(tokens("valid"))),
        ),
        (
            "pair length",
            format!(
                "p50 {}, p90 {}, p99 {}, max {} tokens",
                l.pair.p50, l.pair.p90, l.pair.p99, l.pair.max
            ),
        ),
        ("question p99", format!("{} tokens (answer p99 {})", l.question.p99, l.answer.p99)),
        ("shards", format!("train {}, valid {}", shard_count("train"), shard_count("valid"))),
        (
            "time",
            format!(
                "read {:.2}s ({}), tokenizer {:.2}s, encode+write {:.2}s ({})",
                report.read_time.as_secs_f64(),
                rate(c.pairs_read, report.read_time.as_secs_f64()),
                report.tokenizer_time.as_secs_f64(),
                report.encode_time.as_secs_f64(),
                rate(c.kept, report.encode_time.as_secs_f64()),
            ),
        ),
    ];
    if c.ignored_files > 0 {
        rows.insert(2, ("ignored files", thousands(c.ignored_files)));
    }
    if let Some(h) = &m.heldout {
        rows.push((
            "held-out",
            format!("{} computed questions in {}", thousands(h.records), h.file),
        ));
    }
    let mut out = String::from("\nchingu prepare: done\n");
    for (name, value) in rows {
        out.push_str(&format!("  {name:<14} {value}\n"));
    }
    for example in &m.bad_examples {
        out.push_str(&format!("  skipped: {example}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
