//! The backward stages a data-parallel trainer all-reduces early: they cover every parameter
//! once, the hook runs once per stage in order, and a stage's gradients are already final
//! when it runs (they equal the gradients at the end of the backward pass).

use chingu_kernels::Cpu;
use chingu_model::{Activation, Batch, Config, Model, NormPlacement, Positions};

fn config(norm: NormPlacement, tied: bool, positions: Positions) -> Config {
    Config {
        vocab: 13,
        d_model: 8,
        heads: 2,
        d_ff: 16,
        encoder_layers: 2,
        decoder_layers: 3,
        max_len: 10,
        dropout: 0.1,
        norm,
        activation: Activation::Gelu,
        tied_embeddings: tied,
        label_smoothing: 0.1,
        pad_id: 0,
        positions,
    }
}

fn check(config: Config) {
    let mut model = Model::new(Cpu::<f64>::new(), config.clone(), 5).unwrap();
    let batch = Batch {
        batch: 2,
        src_len: 4,
        tgt_len: 5,
        src: vec![5, 6, 7, 2, 8, 9, 2, 0],
        src_lengths: vec![4, 3],
        tgt_in: vec![1, 9, 4, 11, 3, 1, 10, 12, 0, 0],
        tgt_out: vec![9, 4, 11, 3, 2, 10, 12, 2, 0, 0],
        tgt_lengths: vec![5, 3],
    };
    let stages = model.backward_stages();
    let mut seen: Vec<usize> = stages.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..model.params.len()).collect::<Vec<_>>(), "{config:?}");
    assert!(stages.len() >= 2 + config.encoder_layers + config.decoder_layers);

    let mut snapshots: Vec<(usize, Vec<Vec<f64>>)> = Vec::new();
    let stage_list = stages.clone();
    model
        .forward_backward_staged(&batch, 3, 1, &mut |stage, _, grads| {
            let values = stage_list[stage].iter().map(|&i| grads[i].clone()).collect();
            snapshots.push((stage, values));
        })
        .unwrap();
    assert_eq!(
        snapshots.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..stages.len()).collect::<Vec<_>>()
    );
    let mut nonzero = 0;
    for (stage, values) in &snapshots {
        for (&i, early) in stages[*stage].iter().zip(values) {
            assert!(
                early == &model.grads[i],
                "{}: gradient changed after stage {stage}",
                model.layout.specs[i].name
            );
            nonzero += usize::from(early.iter().any(|&g| g != 0.0));
        }
    }
    assert!(
        nonzero > model.params.len() / 2,
        "the gradients are mostly zero: the check would be vacuous"
    );
}

#[test]
fn stages_cover_every_parameter_and_are_final_when_reported() {
    check(config(NormPlacement::Pre, true, Positions::Sinusoidal));
    check(config(NormPlacement::Post, false, Positions::Learned));
    check(config(NormPlacement::Pre, false, Positions::Learned));
}
