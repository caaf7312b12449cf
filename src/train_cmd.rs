//! `chingu train`: arguments, progress display, and the quick job's closing sample answers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chingu_kernels::Cpu;
use chingu_model::{OptimizerSettings, Schedule};
use chingu_worker::trainer::{train, TrainEvent, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `chingu train` (help text on `Command::Train`).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Prepared data (from chingu prepare). When the default is missing, the embedded sample
    /// corpus is prepared into it first.
    #[arg(long, default_value = "prepared")]
    pub data: PathBuf,
    /// Run directory: checkpoints in RUN/checkpoints, JSON logs in RUN/logs/train.jsonl.
    #[arg(long, default_value = "runs/quickstart")]
    pub run: PathBuf,
    /// Model preset: tiny, seed-256 or seed-768.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override the preset's dropout.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Position encoding: sinusoidal (fixed, default) or learned.
    #[arg(long, value_parser = ["sinusoidal", "learned"])]
    pub positions: Option<String>,
    /// Train until this many optimizer steps are done.
    #[arg(long, default_value_t = 8000)]
    pub steps: u64,
    /// Padded tokens (question + answer) per batch. Small batches suit small corpora: on the
    /// embedded corpus, 1,024-token batches reach a given loss in far less time than 4,096.
    #[arg(long, default_value_t = 1024)]
    pub batch_tokens: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Learning-rate schedule: constant (as the original) or cosine (linear warm-up, then
    /// cosine decay to 10% at the last step).
    #[arg(long, default_value = "cosine", value_parser = ["constant", "cosine"])]
    pub schedule: String,
    /// Warm-up steps for the cosine schedule.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Seed for initialisation, data order and dropout.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// Validation loss every this many steps (0: never).
    #[arg(long, default_value_t = 1000)]
    pub eval_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Continue from the run's latest good checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Device: auto (a CUDA GPU when built with --features cuda and one is found, else the
    /// CPU), cpu, or cuda (fail if no GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// Progress: a bar on a terminal and log lines otherwise (auto), log lines (log), or
    /// nothing (quiet).
    #[arg(long, default_value = "auto", value_parser = ["auto", "log", "quiet"])]
    pub progress: String,
    /// Sample questions to answer after training.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
}

impl TrainArgs {
    /// Defaults, as the quickstart uses them.
    pub fn quickstart() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        Wrapper::parse_from(["chingu"]).args
    }

    /// Where the JSON log goes.
    pub fn json_log(&self) -> PathBuf {
        self.run.join("logs").join("train.jsonl")
    }
}

pub(crate) fn ensure_data(data: &Path) -> anyhow::Result<()> {
    if data.join("manifest.json").exists() {
        return Ok(());
    }
    if data != Path::new("prepared") {
        anyhow::bail!(
            "{} holds no prepared data (no manifest.json); run chingu prepare --out {} first",
            data.display(),
            data.display()
        );
    }
    prepare_embedded(data)
}

/// Prepares the embedded sample corpus into `data` (the quick job's first step).
pub(crate) fn prepare_embedded(data: &Path) -> anyhow::Result<()> {
    if data.join("manifest.json").exists() {
        return Ok(());
    }
    eprintln!(
        "chingu: no prepared data yet; preparing the embedded sample corpus into {}",
        data.display()
    );
    let mut args = crate::prepare_cmd::PrepareArgs::quickstart();
    args.out = data.to_path_buf();
    crate::prepare_cmd::run(args)
}

/// Runs `chingu train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    ensure_data(&args.data)?;
    let device = crate::gpu_cmd::select(&args.device, "training")?;
    let schedule = match args.schedule.as_str() {
        "constant" => Schedule::Constant,
        _ => Schedule::WarmupCosine { warmup: args.warmup, total: args.steps, min_ratio: 0.1 },
    };
    let options = TrainOptions {
        data: args.data.clone(),
        run: args.run.clone(),
        preset: args.preset.clone(),
        dropout: args.dropout,
        positions: args.positions.as_deref().map(|p| match p {
            "learned" => chingu_model::Positions::Learned,
            _ => chingu_model::Positions::Sinusoidal,
        }),
        steps: args.steps,
        batch_tokens: args.batch_tokens,
        optimizer: OptimizerSettings {
            lr: args.lr,
            weight_decay: args.weight_decay,
            clip_norm: (args.clip > 0.0).then_some(args.clip),
            schedule,
            ..OptimizerSettings::default()
        },
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        eval_every: args.eval_every,
        eval_batches: 20,
        keep: args.keep,
        resume: args.resume,
        resume_step: None,
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = (args.progress == "auto" && terminal).then(|| {
        let bar = ProgressBar::new(args.steps);
        bar.set_style(
            ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps {msg} ({eta} left)")
                .expect("template")
                .progress_chars("=> "),
        );
        bar
    });
    let log_lines = args.progress == "log" || (args.progress == "auto" && !terminal);
    let mut observer = |event: &TrainEvent| match event {
        TrainEvent::Started { step, parameters, resumed_from, records } => {
            match resumed_from {
                Some(dir) => eprintln!("chingu: resuming from {} (step {step})", dir.display()),
                None => eprintln!(
                    "chingu: training a {} model with {parameters} parameters on {records} pairs",
                    args.preset
                ),
            }
            if let Some(bar) = &bar {
                bar.set_position(*step);
            }
        }
        TrainEvent::Step(r) => {
            if let Some(bar) = &bar {
                bar.set_position(r.step);
                bar.set_message(format!("loss {:.3}, {:.0} tok/s", r.loss, r.tokens_per_s));
            } else if log_lines && (r.step % 50 == 0 || r.step == 1) {
                tracing::info!(
                    step = r.step,
                    loss = format!("{:.4}", r.loss),
                    tokens_per_s = format!("{:.0}", r.tokens_per_s),
                    grad_norm = format!("{:.3}", r.grad_norm),
                    lr = r.lr,
                    "train"
                );
            }
        }
        TrainEvent::Validation { step, loss } => {
            let line = format!("step {step}: validation loss {loss:.4}");
            match &bar {
                Some(bar) => bar.println(line),
                None if args.progress != "quiet" => eprintln!("chingu: {line}"),
                None => {}
            }
        }
        TrainEvent::Checkpoint { step, dir } => {
            let line = format!("step {step}: checkpoint {}", dir.display());
            match &bar {
                Some(bar) => bar.println(line),
                None if args.progress != "quiet" => eprintln!("chingu: {line}"),
                None => {}
            }
        }
    };
    match device {
        crate::gpu_cmd::Selected::Cpu => {
            let outcome = train(Cpu::<f32>::new(), &options, &mut observer);
            report(outcome, &args, bar.as_ref())
        }
        #[cfg(feature = "cuda")]
        crate::gpu_cmd::Selected::Cuda(dev) => {
            let backend = chingu_kernels::gpu::backend::GpuBackend::new(dev);
            let outcome = train(backend, &options, &mut observer);
            report(outcome, &args, bar.as_ref())
        }
    }
}

/// Prints the end of a training run and, when asked, sample answers.
fn report<B: chingu_kernels::Backend>(
    outcome: Result<chingu_worker::trainer::TrainOutcome<B>, chingu_worker::WorkerError>,
    args: &TrainArgs,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<()> {
    let outcome = outcome.context("chingu train failed")?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "trained to step {} (last loss {:.4}, {:.0} tokens/s)",
        outcome.step, outcome.last_loss, outcome.tokens_per_s
    );
    if args.samples > 0 {
        crate::eval_cmd::print_samples(&outcome.model, &args.data, args.samples)?;
    }
    println!("ask it: chingu ask --run {} \"3 더하기 4는?\"", args.run.display());
    Ok(())
}
