//! A checkpoint written by the GPU backend (fp16 mixed precision, here on the emulated device)
//! loads on the CPU backend and the other way round: the files hold the fp32 master weights
//! and fp32 moments in the CPU layout, so both backends read back exactly the same numbers,
//! and the GPU run's loss-scaling state survives a GPU → GPU resume.

use std::sync::Arc;

use chingu_corpus::batching::Cursor;
use chingu_kernels::gpu::backend::GpuBackend;
use chingu_kernels::gpu::emu::EmuDevice;
use chingu_kernels::{Backend, Cpu};
use chingu_model::{Batch, Config, LossScaler, Model, Optimizer, OptimizerSettings};
use chingu_worker::checkpoint::{self, TrainState, CHECKPOINT_VERSION};

fn config() -> Config {
    let mut c = Config::preset("tiny", 40).unwrap();
    c.d_model = 32;
    c.heads = 2;
    c.d_ff = 48;
    c.encoder_layers = 1;
    c.decoder_layers = 1;
    c.max_len = 16;
    c
}

fn batch() -> Batch {
    Batch {
        batch: 2,
        src_len: 5,
        tgt_len: 4,
        src: vec![3, 4, 5, 6, 7, 8, 9, 0, 0, 0],
        src_lengths: vec![5, 2],
        tgt_in: vec![1, 5, 6, 7, 1, 9, 0, 0],
        tgt_out: vec![5, 6, 7, 2, 9, 2, 0, 0],
        tgt_lengths: vec![4, 2],
    }
}

fn state(step: u64, config: &Config, scaler: Option<LossScaler>) -> TrainState {
    TrainState {
        version: CHECKPOINT_VERSION,
        step,
        cursor: Cursor::default(),
        seed: 1,
        batch_tokens: 64,
        config: config.clone(),
        optimizer: OptimizerSettings::default(),
        tokenizer_sha256: "test".into(),
        files: Default::default(),
        loss_scaler: scaler,
    }
}

fn values<B: Backend>(model: &Model<B>, optimizer: &Optimizer<B>) -> Vec<Vec<f32>> {
    let b = &model.backend;
    let mut all: Vec<Vec<f32>> = model.params.iter().map(|p| b.to_f32(p)).collect();
    all.extend(optimizer.exp_avg.iter().chain(&optimizer.exp_avg_sq).map(|m| b.to_f32(m)));
    all
}

#[test]
fn gpu_checkpoints_load_on_the_cpu_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, "{}").unwrap();
    let gpu = GpuBackend::new(Arc::new(EmuDevice::new()));
    let config = config();

    // Two GPU steps, a non-default loss scale, then a checkpoint.
    let mut model = Model::new(gpu.clone(), config.clone(), 3).unwrap();
    let mut optimizer = Optimizer::new(&model, OptimizerSettings::default());
    let scaler = LossScaler { scale: 4096.0, clean_steps: 7, growth_interval: 2000 };
    optimizer.set_scaler(&model, scaler);
    for step in 1..=2 {
        model.zero_grads();
        model.forward_backward(&batch(), 1, step).unwrap();
        assert!(!optimizer.update(&mut model).unwrap().skipped);
    }
    let written = values(&model, &optimizer);
    let run = dir.path().join("gpu-run");
    let saved_scaler = optimizer.scaler;
    checkpoint::save(&run, &model, &optimizer, state(2, &config, saved_scaler), &tokenizer, 2)
        .unwrap();

    // The CPU reads exactly the GPU's master weights and moments, and ignores the scaler.
    let on_cpu = checkpoint::load_latest(Cpu::<f32>::new(), &run).unwrap().unwrap();
    assert_eq!(values(&on_cpu.model, &on_cpu.optimizer), written, "GPU → CPU");
    assert_eq!((on_cpu.optimizer.step, on_cpu.optimizer.scaler), (2, None));

    // GPU → GPU keeps the loss-scaling state; CPU → GPU reads the same numbers back.
    let on_gpu = checkpoint::load_latest(gpu.clone(), &run).unwrap().unwrap();
    assert_eq!(values(&on_gpu.model, &on_gpu.optimizer), written, "GPU → GPU");
    assert_eq!(on_gpu.optimizer.scaler, saved_scaler);
    let cpu_run = dir.path().join("cpu-run");
    let cpu_state = state(2, &config, None);
    checkpoint::save(&cpu_run, &on_cpu.model, &on_cpu.optimizer, cpu_state, &tokenizer, 2).unwrap();
    let back = checkpoint::load_latest(gpu, &cpu_run).unwrap().unwrap();
    assert_eq!(values(&back.model, &back.optimizer), written, "CPU → GPU");
    assert_eq!(
        back.optimizer.scaler,
        Some(LossScaler::default()),
        "a CPU checkpoint starts the default scale"
    );

    // And the GPU model reloaded computes the same loss as the one that wrote it.
    let (mut a, mut b) = (model, on_gpu.model);
    a.zero_grads();
    b.zero_grads();
    let la = a.forward_backward(&batch(), 1, 3).unwrap().loss;
    let lb = b.forward_backward(&batch(), 1, 3).unwrap().loss;
    assert_eq!(la.to_bits(), lb.to_bits());
}

/// Answering and scoring load the model alone: the optimizer file is neither verified nor
/// read, and its moments never reach the device.
#[test]
fn the_model_alone_loads_without_the_optimizer_moments() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, "{}").unwrap();
    let config = config();
    let model = Model::new(Cpu::<f32>::new(), config.clone(), 5).unwrap();
    let optimizer = Optimizer::new(&model, OptimizerSettings::default());
    let run = dir.path().join("run");
    checkpoint::save(&run, &model, &optimizer, state(1, &config, None), &tokenizer, 2).unwrap();
    fn params<B: Backend>(m: &Model<B>) -> Vec<Vec<f32>> {
        m.params.iter().map(|p| m.backend.to_f32(p)).collect()
    }
    let written = params(&model);

    // On the (emulated) GPU: the model-only load holds less than the full one by the two
    // moments, 8 bytes a parameter at least.
    let peak = |model_only: bool| {
        let emu = Arc::new(EmuDevice::new().with_memory_limit(usize::MAX));
        let gpu = GpuBackend::new(emu.clone());
        if model_only {
            let loaded = checkpoint::load_latest_model(gpu, &run).unwrap().unwrap();
            assert_eq!(params(&loaded.model), written);
        } else {
            checkpoint::load_latest(gpu, &run).unwrap().unwrap();
        }
        emu.peak_allocated()
    };
    let parameters: usize = written.iter().map(Vec::len).sum();
    let (alone, full) = (peak(true), peak(false));
    assert!(full - alone >= 8 * parameters, "model alone {alone} bytes, with moments {full}");

    // A damaged optimizer file stops a resume, not an answer.
    let step = checkpoint::step_dir(&run, 1);
    std::fs::write(step.join("optimizer.safetensors"), b"damaged").unwrap();
    assert!(checkpoint::load_latest(Cpu::<f32>::new(), &run).is_err());
    let loaded = checkpoint::load_latest_model(Cpu::<f32>::new(), &run).unwrap().unwrap();
    assert_eq!(params(&loaded.model), written);
}
