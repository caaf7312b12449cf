//! Evaluation: teacher-forced loss, perplexity and token accuracy on the valid split (the
//! original's first test mode), and autoregressive exact match and chrF on question/answer
//! pairs (the held-out computed questions, or the valid split).

use chingu_corpus::batching::{epoch_plan, RecordRef};
use chingu_corpus::manifest::SpecialIdsEntry;
use chingu_corpus::normalize::normalize;
use chingu_corpus::shard::Shard;
use chingu_corpus::tokenizer::{self, Tokenizer};
use chingu_kernels::Backend;
use chingu_model::generate::GenerateOptions;
use chingu_model::Model;

use crate::data::make_batch;
use crate::Result;

/// Teacher-forced scores.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TeacherForced {
    /// Mean cross-entropy per target token (label smoothing included, as trained).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Share of target tokens whose argmax prediction is right.
    pub token_accuracy: f64,
    /// Target tokens scored.
    pub tokens: usize,
}

/// Teacher-forced loss, perplexity and token accuracy over up to `max_batches` batches of a
/// fixed plan of `records` (one forward pass per batch).
pub fn teacher_forced<B: Backend>(
    model: &Model<B>,
    shards: &[Shard],
    records: &[RecordRef],
    specials: SpecialIdsEntry,
    batch_tokens: usize,
    max_batches: usize,
) -> Result<TeacherForced> {
    let plan = epoch_plan(records, 0, 0, batch_tokens);
    let (mut loss_sum, mut tokens, mut correct) = (0.0f64, 0usize, 0usize);
    let vocab = model.config.vocab;
    for batch_records in plan.iter().take(max_batches.max(1)) {
        let batch = make_batch(shards, batch_records, specials);
        let (stats, logits) = model.loss_and_logits(&batch)?;
        loss_sum += stats.loss * stats.tokens as f64;
        tokens += stats.tokens;
        for (row, &target) in batch.tgt_out.iter().enumerate() {
            if target == specials.pad {
                continue;
            }
            let l = &logits[row * vocab..][..vocab];
            let best = l
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0;
            correct += usize::from(best == target as usize);
        }
    }
    let loss = loss_sum / tokens.max(1) as f64;
    Ok(TeacherForced {
        loss,
        perplexity: loss.exp(),
        token_accuracy: correct as f64 / tokens.max(1) as f64,
        tokens,
    })
}

/// Answers `question` with the model.
pub fn answer<B: Backend>(
    model: &Model<B>,
    tok: &Tokenizer,
    specials: SpecialIdsEntry,
    question: &str,
    options: GenerateOptions,
) -> Result<String> {
    let mut src = tokenizer::encode(tok, &normalize(question))?;
    src.truncate(model.config.max_len - 1);
    src.push(specials.eos);
    let ids = model.generate(&src, specials.bos, specials.eos, options)?;
    Ok(tokenizer::decode(tok, &ids)?)
}

/// Character n-gram F-score (chrF, n = 1…6, β = 2) of `hypothesis` against `reference`, in
/// [0, 100]; spaces are ignored as in the standard definition.
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<Vec<_>>();
    let (h, r) = (strip(hypothesis), strip(reference));
    let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
    for n in 1..=6 {
        if h.len() < n || r.len() < n {
            continue;
        }
        let grams = |s: &[char]| {
            let mut m = std::collections::HashMap::new();
            for w in s.windows(n) {
                *m.entry(w.to_vec()).or_insert(0usize) += 1;
            }
            m
        };
        let (hg, rg) = (grams(&h), grams(&r));
        let matched: usize = hg.iter().map(|(g, &c)| c.min(*rg.get(g).unwrap_or(&0))).sum();
        precision += matched as f64 / (h.len() - n + 1) as f64;
        recall += matched as f64 / (r.len() - n + 1) as f64;
        orders += 1;
    }
    if orders == 0 {
        return if h == r { 100.0 } else { 0.0 };
    }
    let (p, r) = (precision / orders as f64, recall / orders as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    let beta2 = 4.0;
    100.0 * (1.0 + beta2) * p * r / (beta2 * p + r)
}

/// Exact match and chrF of generated answers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerationScores {
    /// Questions asked.
    pub questions: usize,
    /// Answers equal to the reference after normalisation.
    pub exact: usize,
    /// exact / questions.
    pub exact_match: f64,
    /// Mean chrF.
    pub chrf: f64,
}

/// Scores greedy answers to `pairs` (question, reference).
pub fn score_generation<B: Backend>(
    model: &Model<B>,
    tok: &Tokenizer,
    specials: SpecialIdsEntry,
    pairs: &[(String, String)],
) -> Result<GenerationScores> {
    let (mut exact, mut chrf_sum) = (0usize, 0.0);
    for (q, reference) in pairs {
        let got = answer(
            model,
            tok,
            specials,
            q,
            GenerateOptions { max_new_tokens: model.config.max_len.min(64), ..Default::default() },
        )?;
        let reference = normalize(reference);
        exact += usize::from(normalize(&got) == reference);
        chrf_sum += chrf(&got, &reference);
    }
    let n = pairs.len().max(1);
    Ok(GenerationScores {
        questions: pairs.len(),
        exact,
        exact_match: exact as f64 / n as f64,
        chrf: chrf_sum / n as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::chrf;

    #[test]
    fn chrf_bounds_and_order() {
        assert_eq!(chrf("안녕하세요", "안녕하세요"), 100.0);
        assert_eq!(chrf("가나다", "라마바"), 0.0);
        // By hand (spaces dropped): hypothesis 오늘날씨좋네요 (7 chars), reference 오늘날씨가좋네요
        // (8). Matched n-grams for n = 1..6: 7, 5, 3, 1, 0, 0 of 7, 6, 5, 4, 3, 2 hypothesis
        // and 8, 7, 6, 5, 4, 3 reference n-grams. Mean precision P = 0.44722, mean recall
        // R = 0.38155, chrF = 100 · 5PR / (4P + R) = 39.309.
        let close = chrf("오늘 날씨 좋네요", "오늘 날씨가 좋네요");
        assert!((close - 39.309).abs() < 1e-3, "{close}");
        let far = chrf("배고파요", "오늘 날씨가 좋네요");
        assert!(far < close);
    }
}
