//! The model against PyTorch: `bench/golden/tiny-v1.safetensors` (written by
//! `bench/torch_ref.py golden`, float64) holds inputs, weights, logits, loss and every
//! gradient for a pre-norm/GELU/tied and a post-norm/ReLU/untied configuration.
//!
//! Tolerances, per tensor kind:
//! - f64 backend: 1e-12 absolute + 1e-10 relative on everything. Both sides compute in
//!   float64 and differ only in summation order (GEMM blocking, softmax), worth ~1e-16 per
//!   operation; the bound leaves room for the ~10² operations chained through the network.
//! - f32 backend: logits and loss 2e-4 absolute; gradients 2e-4 absolute + 1e-2 relative.
//!   f32 rounding (6e-8 relative) compounds through 4 layers, LayerNorm divisions and a
//!   softmax over 37 classes; measured worst errors are well inside these bounds, and a real
//!   bug (a missed mask, a transposed weight) shows up at 1e-2 or more.

use std::collections::HashMap;
use std::path::Path;

use chingu_kernels::{Backend, Cpu};
use chingu_model::{Activation, Batch, Config, Model, NormPlacement};
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/golden/tiny-v1.safetensors");

struct Golden {
    tensors: HashMap<String, Vec<f64>>,
    ints: HashMap<String, Vec<i64>>,
}

fn load() -> Golden {
    let bytes = std::fs::read(GOLDEN).unwrap_or_else(|e| {
        panic!("{GOLDEN}: {e}; regenerate with python3 bench/torch_ref.py golden")
    });
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("golden metadata");
    assert_eq!(meta.get("format").map(String::as_str), Some("chingu-golden"));
    assert_eq!(
        meta.get("version").map(String::as_str),
        Some("1"),
        "golden version changed: update this test"
    );
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut golden = Golden { tensors: HashMap::new(), ints: HashMap::new() };
    for (name, view) in st.tensors() {
        let data = view.data();
        match view.dtype() {
            Dtype::F64 => {
                golden.tensors.insert(
                    name,
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                );
            }
            Dtype::I64 => {
                golden.ints.insert(
                    name,
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                );
            }
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }
    golden
}

fn config(norm: NormPlacement) -> Config {
    let pre = norm == NormPlacement::Pre;
    Config {
        vocab: 37,
        d_model: 16,
        heads: 2,
        d_ff: 32,
        encoder_layers: 2,
        decoder_layers: 2,
        max_len: 16,
        dropout: 0.0,
        norm,
        activation: if pre { Activation::Gelu } else { Activation::Relu },
        tied_embeddings: pre,
        label_smoothing: 0.1,
        pad_id: 0,
        positions: chingu_model::Positions::Sinusoidal,
    }
}

fn batch(g: &Golden) -> Batch {
    let ids = |name: &str| g.ints[name].iter().map(|&v| v as u32).collect::<Vec<_>>();
    let lens = |name: &str| g.ints[name].iter().map(|&v| v as usize).collect::<Vec<_>>();
    Batch {
        batch: 3,
        src_len: 7,
        tgt_len: 6,
        src: ids("input.src"),
        src_lengths: lens("input.src_len"),
        tgt_in: ids("input.tgt_in"),
        tgt_out: ids("input.targets"),
        tgt_lengths: lens("input.tgt_len"),
    }
}

struct Tolerance {
    abs: f64,
    rel: f64,
}

fn compare(what: &str, got: &[f64], want: &[f64], tol: &Tolerance) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let allowed = tol.abs + tol.rel * w.abs();
        assert!(
            err <= allowed,
            "{what}[{i}]: got {g}, PyTorch {w} (error {err:e}, allowed {allowed:e})"
        );
        worst = worst.max(err / allowed);
    }
    worst
}

fn run<B: Backend>(
    backend: B,
    prefix: &str,
    norm: NormPlacement,
    values_tol: &Tolerance,
    grad_tol: &Tolerance,
) where
    B::Buf: Clone,
{
    let g = load();
    let config = config(norm);
    let layout = chingu_model::Layout::new(&config);
    let values: Vec<Vec<f64>> = layout
        .specs
        .iter()
        .map(|s| {
            g.tensors
                .get(&format!("{prefix}param.{}", s.name))
                .unwrap_or_else(|| panic!("golden lacks {prefix}param.{}", s.name))
                .clone()
        })
        .collect();
    let param_count =
        g.tensors.keys().filter(|k| k.starts_with(&format!("{prefix}param."))).count();
    assert_eq!(param_count, layout.specs.len(), "golden and model layouts differ in tensor count");
    let mut model = Model::from_values(backend, config, values).unwrap();
    let batch = batch(&g);
    let logits = model.logits(&batch).unwrap();
    let mut worst =
        compare("logits", &logits, &g.tensors[&format!("{prefix}out.logits")], values_tol);
    model.zero_grads();
    let stats = model.forward_backward(&batch, 0, 0).unwrap();
    worst = worst.max(compare(
        "loss",
        &[stats.loss],
        &g.tensors[&format!("{prefix}out.loss")],
        values_tol,
    ));
    for (spec, grad) in layout.specs.iter().zip(&model.grads) {
        let got = model.backend.to_f64(grad);
        worst = worst.max(compare(
            &format!("grad {}", spec.name),
            &got,
            &g.tensors[&format!("{prefix}grad.{}", spec.name)],
            grad_tol,
        ));
    }
    eprintln!("{} {prefix:?}: worst error / tolerance = {worst:.3}", model.backend.name());
}

#[test]
fn f64_matches_pytorch_pre_norm() {
    let tol = Tolerance { abs: 1e-12, rel: 1e-10 };
    run(Cpu::<f64>::new(), "", NormPlacement::Pre, &tol, &tol);
}

#[test]
fn f64_matches_pytorch_post_norm() {
    let tol = Tolerance { abs: 1e-12, rel: 1e-10 };
    run(Cpu::<f64>::new(), "post.", NormPlacement::Post, &tol, &tol);
}

#[test]
fn f32_matches_pytorch_within_f32_tolerances() {
    let values = Tolerance { abs: 2e-4, rel: 0.0 };
    let grads = Tolerance { abs: 2e-4, rel: 1e-2 };
    run(Cpu::<f32>::new(), "", NormPlacement::Pre, &values, &grads);
    run(Cpu::<f32>::new(), "post.", NormPlacement::Post, &values, &grads);
}

#[test]
fn golden_file_is_where_the_readme_says() {
    assert!(Path::new(GOLDEN).exists());
}
