//! The `chingu` command line: argument parsing, logging set-up, and one call into the crates
//! per subcommand. No logic of its own lives here.

mod allocator;
mod bench_cmd;
mod eval_cmd;
mod gpu_cmd;
mod launch_cmd;
mod logging;
mod prepare_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates large activation buffers every step; see [`allocator`] for why mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// chingu (친구): train a Korean question→answer chatbot across GPUs, then chat with it.
///
/// Run with no subcommand for the quick job: it prepares the embedded sample corpus into
/// `prepared/`, trains a small model into `runs/quickstart` and shows its answers.
#[derive(Parser, Debug)]
#[command(name = "chingu", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn a raw corpus into a trained tokenizer and token shards.
    ///
    /// INPUT may be files or directory trees, in any mix of formats:
    ///   AIHub 543 dialogue JSON (`info[].annotations.lines[].norm_text`; `TL_*`/`VL_*` folders give
    ///   the train/valid split), Q/A CSV (question and answer columns found by header: Q/A,
    ///   question/answer or 질문/답변), and JSONL (`{"question","answer"}` or `{"turns":[...]}`).
    /// With no INPUT the embedded sample corpus is used.
    ///
    /// Writes OUT/tokenizer.json, OUT/{train,valid}-NNNNN.shard and OUT/manifest.json. OUT appears
    /// only when everything is written; the same inputs and options give byte-identical output.
    #[command(verbatim_doc_comment)]
    Prepare(prepare_cmd::PrepareArgs),
    /// Train the chatbot on prepared data, in one process, on a CUDA GPU or the CPU.
    ///
    /// With no options this is the quick job: it prepares the embedded corpus if `prepared/` is
    /// missing, trains the tiny preset into runs/quickstart, and prints a few answers.
    /// Checkpoints go to RUN/checkpoints/step-NNNNNNNN with RUN/checkpoints/LATEST naming the
    /// newest; --resume continues bit-identically. Step metrics are JSON lines in
    /// RUN/logs/train.jsonl.
    Train(train_cmd::TrainArgs),
    /// Answer one question with a trained run.
    Ask {
        /// Run directory with checkpoints.
        #[arg(long, default_value = "runs/quickstart")]
        run: std::path::PathBuf,
        /// The question.
        question: String,
        #[command(flatten)]
        generation: eval_cmd::GenerationArgs,
    },
    /// Chat with a trained run (one answer per line; /quit leaves, /settings shows settings).
    Chat {
        /// Run directory with checkpoints.
        #[arg(long, default_value = "runs/quickstart")]
        run: std::path::PathBuf,
        #[command(flatten)]
        generation: eval_cmd::GenerationArgs,
    },
    /// Score a run: teacher-forced loss, perplexity and token accuracy on the valid split;
    /// exact match and chrF of generated answers on the valid split and on the held-out computed
    /// questions.
    Eval(eval_cmd::EvalArgs),
    /// Train data-parallel from a manifest: start a coordinator and the manifest's workers.
    ///
    /// Example: chingu launch deploy/quickstart.toml (see deploy/README.md for every key).
    /// The coordinator serves gRPC (loopback unless coordinator.address says otherwise),
    /// spawns `workers.count` worker processes, restarts them from LATEST when one fails (up to
    /// restart.max_restarts), and on Ctrl-C/SIGTERM checkpoints at the next step and stops.
    /// Logs: RUN/logs/{coordinator,worker-RANK}.jsonl; per-step metrics: RUN/metrics.jsonl.
    #[command(verbatim_doc_comment)]
    Launch(launch_cmd::LaunchArgs),
    /// Run only the coordinator of a manifest; workers join with `chingu worker` (clusters).
    Coordinator(launch_cmd::LaunchArgs),
    /// Run one worker that joins a coordinator (the job token comes from CHINGU_JOB_TOKEN).
    Worker(launch_cmd::WorkerCmdArgs),
    /// Show a job's ranks: step, loss, tokens/s, last heartbeat, restarts.
    Status(launch_cmd::StatusArgs),
    /// Check the GPU: CUDA support in this build, driver, devices, NVRTC, and that every
    /// kernel compiles and loads for each device (build with --features cuda); then list the
    /// environment variables that tune GPU work (CHINGU_ATTN, CHINGU_ATTN_SAVE_PROBS,
    /// CHINGU_ATTN_PIPELINE, CHINGU_ATTN_WARPS, CHINGU_ATTN_SCORES, CHINGU_ATTN_CAUSAL_BAND,
    /// CHINGU_LN_BACKWARD_BLOCKS, CHINGU_GELU_EPILOGUE, CHINGU_BIAS_GRAD_EPILOGUE,
    /// CHINGU_GEMM_TUNE, CHINGU_GEMM_TUNE_CANDIDATES, CHINGU_GEMM_TUNE_ARRAYS,
    /// CHINGU_GEMM_ARRAYS, CHINGU_GEMM_WEIGHT_GRAD_BATCH, CHINGU_PROFILE, CHINGU_KERNEL_CACHE)
    /// with their values.
    Gpu,
    /// Benchmark: time training steps on a synthetic batch (used by bench/train_bench.py).
    #[command(hide = true)]
    BenchTrain(bench_cmd::BenchArgs),
    /// Benchmark: time greedy decoding with and without the KV cache.
    #[command(hide = true)]
    BenchDecode(bench_cmd::BenchArgs),
}

/// Runs a command's compute on a worker of its own rayon pool (sized like the global one):
/// every parallel op then starts from a pool thread, which works on it too, instead of
/// handing it over from the main thread and sleeping until it is done — a thread wake-up
/// each way for each of the ~1,700 ops of a training step (measured 5% of a seed-256 step).
fn on_compute_pool<R: Send>(work: impl FnOnce() -> anyhow::Result<R> + Send) -> anyhow::Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("chingu-compute-{i}"))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the compute threads: {e}"))?;
    pool.install(work)
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let manifest = match &cli.command {
        Some(Command::Launch(args) | Command::Coordinator(args)) => {
            match launch_cmd::load_manifest(&args.manifest) {
                Ok(m) => Some(m),
                Err(err) => {
                    eprintln!("error: {err:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let worker_log = logging::DeferredLog::default();
    let json_log = match (&cli.command, &manifest) {
        (Some(Command::Train(args)), _) => logging::JsonLog::File(args.json_log()),
        (None, _) => logging::JsonLog::File(train_cmd::TrainArgs::quickstart().json_log()),
        (_, Some(m)) => logging::JsonLog::File(m.job.run.join("logs").join("coordinator.jsonl")),
        (Some(Command::Worker(_)), _) => logging::JsonLog::Deferred(worker_log.clone()),
        _ => logging::JsonLog::None,
    };
    if let Err(err) = logging::init(json_log) {
        eprintln!("error: cannot set up logging: {err:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Some(Command::Prepare(args)) => prepare_cmd::run(args),
        Some(Command::Train(args)) => on_compute_pool(|| train_cmd::run(args)),
        Some(Command::Ask { run, question, generation }) => {
            on_compute_pool(|| eval_cmd::ask(&run, &question, &generation))
        }
        Some(Command::Chat { run, generation }) => {
            on_compute_pool(|| eval_cmd::chat(&run, &generation))
        }
        Some(Command::Eval(args)) => on_compute_pool(|| eval_cmd::evaluate(&args)),
        Some(Command::Launch(args)) => {
            launch_cmd::run(manifest.expect("loaded above"), &args, true)
        }
        Some(Command::Coordinator(args)) => {
            launch_cmd::run(manifest.expect("loaded above"), &args, false)
        }
        Some(Command::Worker(args)) => launch_cmd::worker(&args, &worker_log),
        Some(Command::Status(args)) => launch_cmd::status(&args),
        Some(Command::Gpu) => gpu_cmd::run(),
        Some(Command::BenchTrain(args)) => on_compute_pool(|| bench_cmd::train(&args)),
        Some(Command::BenchDecode(args)) => on_compute_pool(|| bench_cmd::decode(&args)),
        None => {
            eprintln!("chingu: no subcommand given; running the quick job (chingu train with its defaults). See chingu --help.");
            on_compute_pool(|| train_cmd::run(train_cmd::TrainArgs::quickstart()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
