//! The whole model on the GPU backend (fp16 mixed precision: fp16 activations, fp32 master
//! weights, gradients and moments) against the CPU backend (f32): loss, every parameter
//! gradient, and the weights after two AdamW steps, for pre- and post-norm, GELU and ReLU,
//! tied and untied embeddings, sinusoidal and learned positions, with dropout (the GPU drops
//! exactly the CPU's elements), with the GELU and the linear layers' bias gradients fused into
//! cuBLASLt's products and in kernels of their own, and with attention's projections' weight
//! and bias gradients batched. Runs on the emulated device always (CI) and also on a real GPU
//! with `CHINGU_GPU_TESTS=1`.
//!
//! Loss scaling is on (as in training): without it, activation gradients of ~1e-7 are fp16
//! subnormals and the first layers' gradients lose most of their bits (seen here: ‖Δ‖ of 30% on
//! the first encoder layer at scale 1).
//!
//! Tolerances: fp16 activations carry a relative rounding of 2⁻¹¹ per op, and the errors add
//! up through 2 + 2 layers and the backward pass, so gradients are compared as whole tensors:
//! ‖g_gpu − g_cpu‖ ≤ 5% of ‖g_cpu‖ + 1e-5 of the whole gradient's norm, the loss to
//! 0.5% relative. The weights' change over two AdamW steps likewise: ‖Δ_gpu − Δ_cpu‖ ≤ 10% of
//! ‖Δ_cpu‖, with Adam's epsilon at 1e-2 so the update is linear in the gradient (see
//! `compare`); a wrong update — sign, missing decay, bias correction, a stale fp16 copy — is
//! off by 100% or more.

use chingu_kernels::gpu::backend::GpuBackend;
use chingu_kernels::gpu::Gpu;
use chingu_kernels::{Backend, Cpu};
use chingu_model::{
    Activation, Batch, Config, LossScaler, Model, NormPlacement, Optimizer, OptimizerSettings,
    Positions,
};

fn devices() -> Vec<Gpu> {
    chingu_kernels::gpu::test_devices()
}

fn config(norm: NormPlacement, activation: Activation, tied: bool, positions: Positions) -> Config {
    Config {
        vocab: 53,
        d_model: 32,
        heads: 2,
        d_ff: 64,
        encoder_layers: 2,
        decoder_layers: 2,
        max_len: 24,
        dropout: 0.1,
        norm,
        activation,
        tied_embeddings: tied,
        label_smoothing: 0.1,
        pad_id: 0,
        positions,
    }
}

/// Three rows of different lengths, padded; enough tokens that every path carries signal.
fn batch() -> Batch {
    let (b, s, t) = (3usize, 19usize, 17usize);
    let src_lengths = vec![19, 7, 1];
    let tgt_lengths = vec![17, 9, 3];
    let mut src = vec![0u32; b * s];
    let mut tgt_in = vec![0u32; b * t];
    let mut tgt_out = vec![0u32; b * t];
    for r in 0..b {
        for i in 0..src_lengths[r] {
            src[r * s + i] = 3 + ((r * 31 + i * 7) % 50) as u32;
        }
        for i in 0..tgt_lengths[r] {
            tgt_in[r * t + i] = if i == 0 { 1 } else { 3 + ((r * 13 + i * 11) % 50) as u32 };
            tgt_out[r * t + i] =
                if i + 1 == tgt_lengths[r] { 2 } else { 3 + ((r * 13 + (i + 1) * 11) % 50) as u32 };
        }
    }
    Batch { batch: b, src_len: s, tgt_len: t, src, src_lengths, tgt_in, tgt_out, tgt_lengths }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

fn diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>().sqrt()
}

/// Which ops the GPU backend fuses into cuBLASLt's products (the GELU by default, the bias
/// gradient not), and whether it batches attention's projections' weight and bias gradients
/// (not by default).
#[derive(Clone, Copy)]
struct Fused {
    gelu: bool,
    bias_grad: bool,
    weight_grad_batch: bool,
}

/// Compares two steps on `dev` with the CPU's; returns the pointer-array batches `dev` ran
/// meanwhile (where it counts them).
fn compare(config: Config, dev: &Gpu, loss_scale: f32, fused: Fused) -> Option<usize> {
    let Fused { gelu: fused_gelu, bias_grad: fused_bias_grad, weight_grad_batch } = fused;
    let what = format!(
        "{:?}/{:?}/tied {}/{:?}/fused GELU {fused_gelu}, bias gradient {fused_bias_grad}, \
         projections' gradients batched {weight_grad_batch} on {}",
        config.norm,
        config.activation,
        config.tied_embeddings,
        config.positions,
        dev.name()
    );
    let batch = batch();
    let mut cpu = Model::new(Cpu::<f32>::new(), config.clone(), 9).unwrap();
    let backend = GpuBackend::new(dev.clone())
        .with_fused_gelu(fused_gelu)
        .with_fused_bias_grad(fused_bias_grad)
        .with_batched_weight_grads(weight_grad_batch);
    let mut gpu = Model::new(backend, config.clone(), 9).unwrap();
    // A large Adam epsilon keeps the update linear in the gradient (√v̂ ≪ eps for most
    // weights): with the default 1e-8, step 1 moves every weight by ±lr, the sign of its
    // gradient, so a weight whose gradient is small next to fp16 rounding may go either way.
    let settings = OptimizerSettings { clip_norm: None, eps: 1e-2, ..OptimizerSettings::default() };
    let (mut opt_cpu, mut opt_gpu) =
        (Optimizer::new(&cpu, settings), Optimizer::new(&gpu, settings));
    // A scale that never grows within the test, so both steps carry `loss_scale`.
    let scaler = LossScaler { scale: loss_scale, clean_steps: 0, growth_interval: 1_000 };
    opt_gpu.set_scaler(&gpu, scaler);
    let initial: Vec<Vec<f32>> = cpu.params.iter().map(|p| cpu.backend.to_f32(p)).collect();
    let batches_before = dev.pointer_array_batches();
    for step in 1..=2u64 {
        cpu.zero_grads();
        gpu.zero_grads();
        let lc = cpu.forward_backward(&batch, 5, step).unwrap();
        let lg = gpu.forward_backward(&batch, 5, step).unwrap();
        assert_eq!(lc.tokens, lg.tokens, "{what}");
        assert!(
            (lc.loss - lg.loss).abs() <= 5e-3 * lc.loss,
            "{what}, step {step}: loss {} vs CPU {}",
            lg.loss,
            lc.loss
        );
        // Tensors whose true gradient is zero (a key bias: softmax ignores a per-row constant)
        // are held to a floor relative to the whole gradient instead.
        let total =
            cpu.grads.iter().map(|g| norm(&cpu.backend.to_f32(g)).powi(2)).sum::<f64>().sqrt();
        for (i, spec) in cpu.layout.specs.iter().enumerate() {
            let want = cpu.backend.to_f32(&cpu.grads[i]);
            let got: Vec<f32> =
                gpu.backend.to_f32(&gpu.grads[i]).iter().map(|g| g / loss_scale).collect();
            let (err, size) = (diff(&got, &want), norm(&want));
            if std::env::var_os("CHINGU_SHOW_ERRORS").is_some() {
                eprintln!("{}: gradient error {err:.3e}, norm {size:.3e}", spec.name);
            }
            assert!(
                err <= 0.05 * size + 1e-5 * total,
                "{what}, step {step}: gradient of {} off by {err:.3e} (norm {size:.3e})",
                spec.name
            );
        }
        // A weight whose true gradient is zero (the key biases) moves by rounding noise on
        // either backend: only weights with a real gradient are compared.
        let live: Vec<bool> =
            cpu.grads.iter().map(|g| norm(&cpu.backend.to_f32(g)) > 1e-5 * total).collect();
        opt_cpu.update(&mut cpu).unwrap();
        let info = opt_gpu.update(&mut gpu).unwrap();
        assert_eq!((info.loss_scale, info.skipped), (Some(loss_scale), false), "{what}");
        for (i, spec) in cpu.layout.specs.iter().enumerate().filter(|(i, _)| live[*i]) {
            let moved = |p: Vec<f32>| -> Vec<f32> {
                p.iter().zip(&initial[i]).map(|(a, b)| a - b).collect()
            };
            let want = moved(cpu.backend.to_f32(&cpu.params[i]));
            let got = moved(gpu.backend.to_f32(&gpu.params[i]));
            let (err, size) = (diff(&got, &want), norm(&want));
            assert!(
                err <= 0.1 * size + 1e-7,
                "{what}, step {step}: {} moved {err:.3e} off the CPU's update (norm {size:.3e})",
                spec.name
            );
        }
    }
    dev.pointer_array_batches().zip(batches_before).map(|(after, before)| after - before)
}

/// An overflowing gradient skips the update, leaves every weight and moment as it was, and
/// halves the scale; a clean step at the new scale then updates.
#[test]
fn overflow_skips_the_update_and_halves_the_scale() {
    let config = config(NormPlacement::Pre, Activation::Gelu, true, Positions::Sinusoidal);
    let mut gpu = Model::new(GpuBackend::new(devices()[0].clone()), config, 9).unwrap();
    let mut opt = Optimizer::new(&gpu, OptimizerSettings::default());
    assert_eq!(opt.scaler.map(|s| s.scale), Some(65_536.0));
    gpu.zero_grads();
    gpu.forward_backward(&batch(), 5, 1).unwrap();
    let before: Vec<Vec<f32>> = gpu.params.iter().map(|p| gpu.backend.to_f32(p)).collect();
    let last = gpu.grads.len() - 1;
    let n = gpu.backend.len(&gpu.grads[last]);
    let mut poisoned = gpu.backend.to_f32(&gpu.grads[last]);
    poisoned[n / 2] = f32::INFINITY;
    gpu.grads[last] = gpu.backend.upload_f32_as(&poisoned, chingu_kernels::BufRole::Gradient);
    let info = opt.update(&mut gpu).unwrap();
    assert!(info.skipped && info.loss_scale == Some(65_536.0), "{info:?}");
    assert_eq!(opt.step, 0, "a skipped update is not a step");
    assert_eq!(opt.scaler.map(|s| s.scale), Some(32_768.0));
    let after: Vec<Vec<f32>> = gpu.params.iter().map(|p| gpu.backend.to_f32(p)).collect();
    assert_eq!(before, after, "weights unchanged by a skipped step");
    gpu.zero_grads();
    gpu.forward_backward(&batch(), 5, 1).unwrap();
    let info = opt.update(&mut gpu).unwrap();
    assert!(
        !info.skipped && info.loss_scale == Some(32_768.0) && info.grad_norm.is_finite(),
        "{info:?}"
    );
    assert_eq!(opt.step, 1);
}

#[test]
fn pre_norm_gelu_tied_matches_the_cpu() {
    for dev in devices() {
        // GELU fused into the feed-forward products (the default), and the GELU kernels;
        // bias gradients in the weight gradients' products (the default).
        for gelu in [true, false] {
            let _ = compare(
                config(NormPlacement::Pre, Activation::Gelu, true, Positions::Sinusoidal),
                &dev,
                1024.0,
                Fused { gelu, bias_grad: true, weight_grad_batch: false },
            );
        }
    }
}

#[test]
fn post_norm_relu_untied_learned_positions_matches_the_cpu() {
    use chingu_kernels::gpu::emu::{EmuDevice, Schedule};
    // The emulated device one of its own (so its counts are this test's alone), under the
    // tests' schedule; a GPU where one is asked for.
    let own: Gpu =
        std::sync::Arc::new(EmuDevice::with_schedule(Schedule::from_env(Schedule::TESTS).unwrap()));
    let gpus = devices().into_iter().filter(|d| !d.name().starts_with("emu"));
    for dev in std::iter::once(own.clone()).chain(gpus) {
        // No GELU here; bias gradients by the bias-gradient kernels (their path), one layer at
        // a time and with attention's projections batched (one pointer-array batch of weight
        // gradients, one launch of bias gradients; the cross-attention's keys and values too).
        let batches = [false, true].map(|weight_grad_batch| {
            compare(
                config(NormPlacement::Post, Activation::Relu, false, Positions::Learned),
                &dev,
                4096.0,
                Fused { gelu: true, bias_grad: false, weight_grad_batch },
            )
        });
        if std::sync::Arc::ptr_eq(&dev, &own) {
            // Two steps, each with 2 encoder and 2 decoder self-attention triples and 2
            // cross-attention pairs batched (any attention batches count alike both ways).
            let want = 12 * usize::from(chingu_kernels::gpu::gemm::pointer_arrays());
            let [Some(each), Some(batched)] = batches else { panic!("uncounted: {batches:?}") };
            assert_eq!(batched - each, want, "the projections' pointer-array batches");
        }
    }
}
