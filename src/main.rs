//! The `chingu` command line: argument parsing, logging set-up, and one call into the crates
//! per subcommand. No logic of its own lives here.

mod bench_cmd;
mod eval_cmd;
mod prepare_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates large activation buffers every step; the system allocator returns them
/// to the kernel and gets zeroed pages back each time (page faults were ~10% of a step),
/// while mimalloc keeps and reuses them.
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
    /// Train the chatbot on prepared data (CPU today; the GPU backend is on its way).
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
    /// Benchmark: time training steps on a synthetic batch (used by bench/train_bench.py).
    #[command(hide = true)]
    BenchTrain(bench_cmd::BenchArgs),
    /// Benchmark: time greedy decoding with and without the KV cache.
    #[command(hide = true)]
    BenchDecode(bench_cmd::BenchArgs),
}

/// Readable logs on stderr (`CHINGU_LOG` filters them; per-step training events are hidden
/// there by default) and, for training, every event as a JSON line in `json_log`.
fn init_logging(json_log: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, EnvFilter};
    let stderr_filter = EnvFilter::try_from_env("CHINGU_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,chingu::train::step=warn"));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(stderr_filter);
    let json = match json_log {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            Some(
                fmt::layer()
                    .json()
                    .with_writer(std::sync::Mutex::new(file))
                    .with_filter(EnvFilter::new("info")),
            )
        }
        None => None,
    };
    tracing_subscriber::registry().with(stderr).with(json).init();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_log = match &cli.command {
        Some(Command::Train(args)) => Some(args.json_log()),
        None => Some(train_cmd::TrainArgs::quickstart().json_log()),
        _ => None,
    };
    if let Err(err) = init_logging(json_log.as_deref()) {
        eprintln!("error: cannot set up logging: {err:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Some(Command::Prepare(args)) => prepare_cmd::run(args),
        Some(Command::Train(args)) => train_cmd::run(args),
        Some(Command::Ask { run, question, generation }) => {
            eval_cmd::ask(&run, &question, &generation)
        }
        Some(Command::Chat { run, generation }) => eval_cmd::chat(&run, &generation),
        Some(Command::Eval(args)) => eval_cmd::evaluate(&args),
        Some(Command::BenchTrain(args)) => bench_cmd::train(&args),
        Some(Command::BenchDecode(args)) => bench_cmd::decode(&args),
        None => {
            eprintln!("chingu: no subcommand given; running the quick job (chingu train with its defaults). See chingu --help.");
            train_cmd::run(train_cmd::TrainArgs::quickstart())
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
