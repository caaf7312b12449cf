//! The `chingu` command line: argument parsing, logging set-up, and one call into the crates
//! per subcommand. No logic of its own lives here.

mod prepare_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// chingu (친구): train a Korean question→answer chatbot across GPUs, then chat with it.
///
/// Run with no subcommand for the quickstart: it prepares the embedded sample corpus into
/// `prepared/`.
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
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CHINGU_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Some(Command::Prepare(args)) => prepare_cmd::run(args),
        None => {
            eprintln!("chingu: no subcommand given; running the quickstart (chingu prepare on the embedded sample corpus). See chingu --help.");
            prepare_cmd::run(prepare_cmd::PrepareArgs::quickstart())
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
