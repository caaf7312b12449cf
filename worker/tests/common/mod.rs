//! What the worker's device tests share: a small prepared corpus and training options.

use std::path::{Path, PathBuf};

use chingu_corpus::prepare::{prepare, PrepareOptions};
use chingu_corpus::progress::ProgressMode;
use chingu_model::OptimizerSettings;
use chingu_worker::trainer::TrainOptions;

/// A small Q/A corpus with enough variety for a few batches per step.
pub fn prepared(dir: &Path) -> PathBuf {
    let csv = dir.join("qa.csv");
    let mut text = String::from("Q,A,label\n");
    for i in 0..60 {
        text.push_str(&format!("{i} 더하기 {} 은?,{} 입니다,0\n", i % 7, i + i % 7));
        text.push_str(&format!("오늘 기분이 {i}점이야,그렇구나 {}점이구나,0\n", i * 3 % 11));
    }
    std::fs::write(&csv, text).unwrap();
    let out = dir.join("prepared");
    prepare(&PrepareOptions {
        inputs: vec![csv],
        out: out.clone(),
        vocab_size: 512,
        progress: ProgressMode::Quiet,
        ..PrepareOptions::default()
    })
    .unwrap();
    out
}

pub fn options(data: &Path, run: &Path, steps: u64) -> TrainOptions {
    TrainOptions {
        data: data.to_path_buf(),
        run: run.to_path_buf(),
        preset: "micro".into(),
        dropout: Some(0.1),
        positions: None,
        steps,
        batch_tokens: 160,
        optimizer: OptimizerSettings::default(),
        seed: 7,
        checkpoint_every: 0,
        eval_every: 0,
        eval_batches: 1,
        keep: 1,
        resume: false,
        resume_step: None,
    }
}
