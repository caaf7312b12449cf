//! Cached incremental decoding gives the same logits as recomputing the whole sequence.

use chingu_kernels::Cpu;
use chingu_model::{Activation, Batch, Config, Model, NormPlacement};

fn config(norm: NormPlacement) -> Config {
    Config {
        vocab: 13,
        d_model: 8,
        heads: 2,
        d_ff: 16,
        encoder_layers: 2,
        decoder_layers: 2,
        max_len: 10,
        dropout: 0.0,
        norm,
        activation: Activation::Gelu,
        tied_embeddings: norm == NormPlacement::Pre,
        label_smoothing: 0.0,
        pad_id: 0,
        positions: chingu_model::Positions::Sinusoidal,
    }
}

fn check(norm: NormPlacement) {
    check_config(config(norm));
}

fn check_config(config: Config) {
    let norm = config.norm;
    let model = Model::new(Cpu::<f64>::new(), config.clone(), 3).unwrap();
    // Bigger weights so the check is not passed by near-uniform outputs.
    let values = model.params.iter().map(|p| p.iter().map(|v| v * 20.0).collect()).collect();
    let model = Model::from_values(Cpu::<f64>::new(), config, values).unwrap();
    let src = vec![5, 6, 7, 2];
    let tgt_in = vec![1, 9, 4, 11, 3, 8];
    let t = tgt_in.len();
    let batch = Batch {
        batch: 1,
        src_len: 4,
        tgt_len: t,
        src: src.clone(),
        src_lengths: vec![4],
        tgt_in: tgt_in.clone(),
        tgt_out: vec![9, 4, 11, 3, 8, 2],
        tgt_lengths: vec![t],
    };
    let full = model.logits(&batch).unwrap();
    let encoded = model.encode(&src, &[4], 4).unwrap();
    let mut state = model.start_decode(encoded, t).unwrap();
    let mut spread = 0.0f64;
    for (pos, &token) in tgt_in.iter().enumerate() {
        let step = model.decode_step(&mut state, &[token]).unwrap();
        for (v, &l) in step.iter().enumerate() {
            let want = full[pos * 13 + v];
            spread = spread.max(want.abs());
            assert!(
                (f64::from(l) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{norm:?} position {pos} token {v}: cached {l} vs full {want}"
            );
        }
    }
    assert!(spread > 1.0, "logits too flat to test anything");
    assert!(model.decode_step(&mut state, &[1]).is_err(), "capacity is enforced");
}

#[test]
fn cached_decoding_equals_full_recomputation_pre_norm() {
    check(NormPlacement::Pre);
}

#[test]
fn cached_decoding_equals_full_recomputation_post_norm() {
    check(NormPlacement::Post);
}

#[test]
fn cached_decoding_equals_full_recomputation_learned_positions() {
    let mut c = config(NormPlacement::Pre);
    c.positions = chingu_model::Positions::Learned;
    check_config(c);
}

mod beam {
    use super::*;
    use chingu_model::generate::{GenerateOptions, Strategy};

    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = f64::from(max) + row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
        row.iter().map(|&v| f64::from(v) - lse).collect()
    }

    /// Log-probability of `answer` (then `</s>` if `finished`) under the distribution generation
    /// uses, by stepping the decoder.
    fn score(model: &Model<Cpu<f64>>, src: &[u32], answer: &[u32], finished: bool) -> f64 {
        let mut state =
            model.start_decode(model.encode(src, &[src.len()], src.len()).unwrap(), 3).unwrap();
        let mut total = 0.0;
        let mut prev = 1;
        let targets: Vec<u32> = answer.iter().copied().chain(finished.then_some(2)).collect();
        for &t in &targets {
            let mut row = model.decode_step(&mut state, &[prev]).unwrap();
            row[0] = f32::NEG_INFINITY; // generation never emits <pad> or <s>
            row[1] = f32::NEG_INFINITY;
            total += log_softmax(&row)[t as usize];
            prev = t;
        }
        total
    }

    #[test]
    fn wide_beam_finds_the_exhaustive_best_and_width_one_is_greedy() {
        let mut greedy_missed = 0;
        for seed in 0..20 {
            let mut config = config(NormPlacement::Pre);
            config.vocab = 6;
            let model = Model::new(Cpu::<f64>::new(), config.clone(), seed).unwrap();
            let values = model.params.iter().map(|p| p.iter().map(|v| v * 0.3).collect()).collect();
            let model = Model::from_values(Cpu::<f64>::new(), config, values).unwrap();
            let src = vec![3, 4, 5, 2];
            // Every answer of up to 3 tokens from {3, 4, 5}: generation never emits <pad> (0)
            // or <s> (1), and </s> (2) ends an answer.
            let alphabet = [3u32, 4, 5];
            let mut best = (f64::NEG_INFINITY, Vec::new());
            let mut consider = |answer: Vec<u32>, finished: bool| {
                let s = score(&model, &src, &answer, finished);
                if s > best.0 {
                    best = (s, answer);
                }
            };
            consider(vec![], true);
            for &a in &alphabet {
                consider(vec![a], true);
                for &b in &alphabet {
                    consider(vec![a, b], true);
                    for &c in &alphabet {
                        consider(vec![a, b, c], false); // capacity reached: no </s>
                    }
                }
            }
            let options =
                |strategy| GenerateOptions { strategy, max_new_tokens: 3, repetition_penalty: 1.0 };
            let beam = |width| {
                model
                    .generate(&src, 1, 2, options(Strategy::Beam { width, length_penalty: 0.0 }))
                    .unwrap()
            };
            assert_eq!(beam(64), best.1, "seed {seed}: exhaustive best scores {}", best.0);
            let greedy = model.generate(&src, 1, 2, options(Strategy::Greedy)).unwrap();
            assert_eq!(beam(1), greedy, "seed {seed}");
            greedy_missed += usize::from(greedy != best.1);
        }
        // Some of these models must be ones where greedy decoding misses the best answer, or
        // the test would not tell beam search from greedy.
        assert!(greedy_missed > 0, "greedy was optimal for every seed");
        eprintln!("greedy missed the best answer for {greedy_missed} of 20 models");
    }
}
