//! `chingu bench-train` and `chingu bench-decode` (hidden): fixed synthetic workloads timed
//! for `bench/train_bench.py`, which runs them beside the PyTorch reference and prints the
//! table. Each prints one JSON line.

use std::time::Instant;

use chingu_kernels::Cpu;
use chingu_model::{Batch, Config, Model, Optimizer, OptimizerSettings};

/// Arguments of the training benchmark.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model preset.
    #[arg(long, default_value = "seed-256")]
    pub preset: String,
    /// Vocabulary size.
    #[arg(long, default_value_t = 16_000)]
    pub vocab: usize,
    /// Pairs per batch.
    #[arg(long, default_value_t = 18)]
    pub batch: usize,
    /// Source tokens per pair.
    #[arg(long, default_value_t = 64)]
    pub src_len: usize,
    /// Target tokens per pair.
    #[arg(long, default_value_t = 64)]
    pub tgt_len: usize,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// cpu, or cuda (GPU 0, fp16 mixed precision; needs a --features cuda build).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
}

fn synthetic_batch(args: &BenchArgs) -> Batch {
    let token = |i: usize| 5 + (i.wrapping_mul(2_654_435_761) % (args.vocab - 5)) as u32;
    let (b, s, t) = (args.batch, args.src_len, args.tgt_len);
    Batch {
        batch: b,
        src_len: s,
        tgt_len: t,
        src: (0..b * s).map(token).collect(),
        src_lengths: vec![s; b],
        tgt_in: (0..b * t).map(|i| token(i + 7)).collect(),
        tgt_out: (0..b * t).map(|i| token(i + 8)).collect(),
        tgt_lengths: vec![t; b],
    }
}

/// Times full training steps (forward, backward, AdamW).
pub fn train(args: &BenchArgs) -> anyhow::Result<()> {
    match crate::gpu_cmd::select(&args.device, "training")? {
        crate::gpu_cmd::Selected::Cpu => {
            train_on(Cpu::<f32>::new(), "chingu-cpu", &|| {}, &|| None, args)
        }
        #[cfg(feature = "cuda")]
        crate::gpu_cmd::Selected::Cuda(dev) => {
            let (sync, mem) = (dev.clone(), dev.clone());
            let backend = chingu_kernels::gpu::backend::GpuBackend::new(dev);
            let sync = move || sync.synchronize().expect("synchronize");
            let run = || {
                train_on(
                    backend,
                    "chingu-cuda",
                    &sync,
                    &move || mem.memory().map(|(in_use, _)| in_use),
                    args,
                )
            };
            chingu_kernels::catch_device_failure(run)?
        }
    }
}

/// [`train`] on one backend; `sync` waits for the device before a clock is read, `memory`
/// reports device memory in use.
fn train_on<B: chingu_kernels::Backend>(
    backend: B,
    name: &str,
    sync: &dyn Fn(),
    memory: &dyn Fn() -> Option<usize>,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    let config = Config::preset(&args.preset, args.vocab)?;
    let mut model = Model::new(backend, config, 1)?;
    let mut optimizer =
        Optimizer::new(&model, OptimizerSettings { lr: 1e-4, ..OptimizerSettings::default() });
    let batch = synthetic_batch(args);
    // One training step; true when fp16 overflow skipped its update.
    let mut train_step = |step: usize| -> anyhow::Result<bool> {
        model.zero_grads();
        model.forward_backward(&batch, 1, step as u64 + 1)?;
        Ok(optimizer.update(&mut model)?.skipped)
    };
    let mut timed = 0.0;
    let mut skipped = 0;
    for step in 0..args.warmup + args.steps {
        sync();
        let started = Instant::now();
        skipped += usize::from(train_step(step)?);
        sync();
        if step >= args.warmup {
            timed += started.elapsed().as_secs_f64();
        }
    }
    if chingu_kernels::profile::enabled() {
        // A few more steps with every op timed on its own (see chingu_kernels::profile).
        const PROFILED: usize = 3;
        chingu_kernels::profile::reset();
        let started = Instant::now();
        for step in 0..PROFILED {
            train_step(args.warmup + args.steps + step)?;
        }
        sync();
        let wall_ms = 1e3 * started.elapsed().as_secs_f64() / PROFILED as f64;
        let how = match chingu_kernels::profile::mode() {
            chingu_kernels::profile::Mode::Events => "GPU launches timed by device events",
            _ => "every op timed alone",
        };
        eprintln!(
            "{name} {} {} x ({}+{}), {PROFILED} steps ({wall_ms:.1} ms per step wall), {how}:\n{}",
            args.preset,
            args.batch,
            args.src_len,
            args.tgt_len,
            chingu_kernels::profile::report(PROFILED)
        );
    }
    let tokens = args.batch * (args.src_len + args.tgt_len);
    let step_ms = 1000.0 * timed / args.steps as f64;
    let json = serde_json::json!({
        "impl": name,
        "preset": args.preset,
        "batch": [args.batch, args.src_len, args.tgt_len],
        "skipped_steps": skipped,
        "device_memory_gib": memory().map(|b| b as f64 / (1u64 << 30) as f64),
        "threads": rayon_threads(),
        "tokens_per_step": tokens,
        "step_ms": step_ms,
        "tokens_per_s": tokens as f64 / (step_ms / 1000.0),
        "params": model.parameter_count(),
    });
    println!("{json}");
    Ok(())
}

/// Times greedy decoding of `tgt_len` tokens for one question, with the KV cache and by full
/// recomputation of the prefix at every step.
pub fn decode(args: &BenchArgs) -> anyhow::Result<()> {
    let config = Config::preset(&args.preset, args.vocab)?;
    let model = Model::new(Cpu::<f32>::new(), config, 1)?;
    let src: Vec<u32> = (0..args.src_len).map(|i| 5 + (i * 31 % (args.vocab - 5)) as u32).collect();
    let n = args.tgt_len;
    let started = Instant::now();
    let encoded = model.encode(&src, &[src.len()], src.len())?;
    let mut state = model.start_decode(encoded, n)?;
    let mut token = 1;
    for _ in 0..n {
        let logits = model.decode_step(&mut state, &[token])?;
        token = logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32;
    }
    let cached = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut prefix = vec![1u32];
    for t in 1..=n {
        let batch = Batch {
            batch: 1,
            src_len: src.len(),
            tgt_len: t,
            src: src.clone(),
            src_lengths: vec![src.len()],
            tgt_in: prefix.clone(),
            tgt_out: vec![2; t],
            tgt_lengths: vec![t],
        };
        let logits = model.logits(&batch)?;
        let last = &logits[(t - 1) * args.vocab..t * args.vocab];
        prefix.push(
            last.iter()
                .enumerate()
                .fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0 as u32,
        );
    }
    let full = started.elapsed().as_secs_f64();
    let json = serde_json::json!({
        "impl": "chingu-cpu",
        "tokens": n,
        "kv_cache_tokens_per_s": n as f64 / cached,
        "recompute_tokens_per_s": n as f64 / full,
    });
    println!("{json}");
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
