//! Whole-model finite-difference gradient checks in f64: every parameter tensor (a few
//! elements of each) for pre- and post-norm, GELU and ReLU, tied and untied embeddings, with
//! and without dropout (the dropout mask is a function of the key, so the loss stays a smooth
//! function of the weights). Tolerance as in the kernel checks: 1e-7 absolute + 1e-6 relative.

use chingu_kernels::Cpu;
use chingu_model::{Activation, Batch, Config, Model, NormPlacement};

fn tiny(norm: NormPlacement, activation: Activation, tied: bool, dropout: f32) -> Config {
    Config {
        vocab: 11,
        d_model: 8,
        heads: 2,
        d_ff: 12,
        encoder_layers: 2,
        decoder_layers: 2,
        max_len: 8,
        dropout,
        norm,
        activation,
        tied_embeddings: tied,
        label_smoothing: 0.1,
        pad_id: 0,
        positions: chingu_model::Positions::Sinusoidal,
    }
}

fn batch() -> Batch {
    Batch {
        batch: 2,
        src_len: 5,
        tgt_len: 4,
        src: vec![3, 4, 5, 6, 7, 8, 2, 0, 0, 0],
        src_lengths: vec![5, 2],
        tgt_in: vec![1, 5, 6, 7, 1, 9, 0, 0],
        tgt_out: vec![5, 6, 7, 2, 9, 2, 0, 0],
        tgt_lengths: vec![4, 2],
    }
}

fn check(config: Config) {
    let step = 1e-6;
    let batch = batch();
    let mut model = Model::new(Cpu::<f64>::new(), config.clone(), 42).unwrap();
    // Larger weights than the default init so every path carries signal.
    let values: Vec<Vec<f64>> = model
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.iter().enumerate().map(|(j, v)| v * 10.0 + 0.01 * ((i * 7 + j) % 5) as f64).collect()
        })
        .collect();
    model = Model::from_values(Cpu::<f64>::new(), config.clone(), values.clone()).unwrap();
    model.zero_grads();
    model.forward_backward(&batch, 5, 3).unwrap();
    let analytic = model.grads.clone();
    let loss_at = |values: &[Vec<f64>]| {
        let mut m = Model::from_values(Cpu::<f64>::new(), config.clone(), values.to_vec()).unwrap();
        m.forward_backward(&batch, 5, 3).unwrap().loss
    };
    let mut checked = 0;
    for (t, spec) in model.layout.specs.iter().enumerate() {
        let n = spec.numel();
        for j in [0, n / 3, n / 2, n - 1] {
            let mut plus = values.clone();
            plus[t][j] += step;
            let mut minus = values.clone();
            minus[t][j] -= step;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * step);
            let err = (numeric - analytic[t][j]).abs();
            assert!(
                err <= 1e-7 + 1e-6 * numeric.abs(),
                "{config:?}\n{}[{j}]: analytic {} vs numeric {numeric}",
                spec.name,
                analytic[t][j]
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * model.layout.specs.len());
}

#[test]
fn pre_norm_gelu_tied() {
    check(tiny(NormPlacement::Pre, Activation::Gelu, true, 0.0));
}

#[test]
fn post_norm_relu_untied() {
    check(tiny(NormPlacement::Post, Activation::Relu, false, 0.0));
}

#[test]
fn with_dropout() {
    check(tiny(NormPlacement::Pre, Activation::Gelu, true, 0.2));
}

#[test]
fn padding_never_matters() {
    // Changing padded source tokens or padded target positions changes neither loss nor grads.
    let config = tiny(NormPlacement::Pre, Activation::Gelu, true, 0.0);
    let mut a = Model::new(Cpu::<f64>::new(), config.clone(), 1).unwrap();
    let mut b = Model::new(Cpu::<f64>::new(), config, 1).unwrap();
    let first = batch();
    let mut second = batch();
    second.src[7] = 9;
    second.tgt_in[7] = 4;
    let la = a.forward_backward(&first, 0, 0).unwrap();
    let lb = b.forward_backward(&second, 0, 0).unwrap();
    assert_eq!(la.loss, lb.loss);
    assert_eq!(la.tokens, 6);
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        for (x, y) in ga.iter().zip(gb) {
            assert!((x - y).abs() < 1e-15);
        }
    }
}

#[test]
fn invalid_configs_and_batches_are_explained() {
    let mut c = tiny(NormPlacement::Pre, Activation::Gelu, true, 0.0);
    c.heads = 3;
    assert!(Model::new(Cpu::<f32>::new(), c, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("not divisible by heads 3"));
    let model =
        Model::new(Cpu::<f32>::new(), tiny(NormPlacement::Pre, Activation::Gelu, true, 0.0), 0)
            .unwrap();
    let mut long = batch();
    long.src_len = 9;
    long.src = vec![3; 18];
    assert!(model.loss(&long).unwrap_err().to_string().contains("exceeds the model's max_len 8"));
    let mut foreign = batch();
    foreign.tgt_out[0] = 11;
    assert!(model
        .loss(&foreign)
        .unwrap_err()
        .to_string()
        .contains("outside the model's vocabulary of 11"));
}

#[test]
fn learned_positions() {
    let mut config = tiny(NormPlacement::Pre, Activation::Gelu, true, 0.0);
    config.positions = chingu_model::Positions::Learned;
    check(config);
}
