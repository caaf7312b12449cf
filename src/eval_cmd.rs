//! `chingu ask`, `chingu chat` and `chingu eval`: load a run's latest checkpoint onto the CPU
//! or a GPU (`--device`) and answer or score.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chingu_corpus::manifest::SpecialIdsEntry;
use chingu_corpus::tokenizer::{self, Tokenizer};
use chingu_corpus::Manifest;
use chingu_kernels::{Backend, Cpu};
use chingu_model::generate::{GenerateOptions, Strategy};
use chingu_model::Model;
use chingu_worker::checkpoint::{self, LoadedModel, TrainState};
use chingu_worker::data::Prepared;
use chingu_worker::eval;

/// Generation flags shared by ask and chat.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerationArgs {
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only within the top-p probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalise tokens already generated (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams (1: off). Takes precedence over sampling.
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    /// Beam search length-penalty exponent (0: none; larger favours longer answers).
    #[arg(long, default_value_t = 0.6)]
    pub length_penalty: f32,
    /// Device: cpu (the default: one answer at a time needs no GPU, and starts at once),
    /// cuda (fail if no GPU), or auto (a CUDA GPU when built with --features cuda and one is
    /// found, else the CPU).
    #[arg(long, default_value = "cpu", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
}

impl GenerationArgs {
    fn options(&self) -> GenerateOptions {
        let strategy = if self.beam > 1 {
            Strategy::Beam { width: self.beam, length_penalty: self.length_penalty }
        } else if self.temperature > 0.0 {
            Strategy::Sample {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            }
        } else {
            Strategy::Greedy
        };
        GenerateOptions {
            strategy,
            max_new_tokens: self.max_new_tokens,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// A run's latest good checkpoint on a backend, ready to answer.
pub struct Chatbot<B: Backend> {
    model: Model<B>,
    tokenizer: Tokenizer,
    specials: SpecialIdsEntry,
    /// The checkpoint directory.
    dir: PathBuf,
    /// Its training state.
    state: TrainState,
}

fn load<B: Backend + Clone>(backend: B, run: &Path) -> anyhow::Result<Chatbot<B>> {
    let LoadedModel { dir, state, model } = checkpoint::load_latest_model(backend, run)?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no checkpoint yet: train first with chingu train --run {}",
                run.display(),
                run.display()
            )
        })?;
    let tokenizer = tokenizer::load(&dir.join("tokenizer.json"))?;
    let specials = tokenizer::special_ids(&tokenizer)?.into();
    Ok(Chatbot { model, tokenizer, specials, dir, state })
}

/// Loads `$run`'s latest checkpoint onto the backend `$device` (`--device`) selects, for
/// `$work` ("answering", "evaluating"), and evaluates `$body` with it bound to `$bot`.
macro_rules! with_chatbot {
    ($device:expr, $work:expr, $run:expr, |$bot:ident| $body:expr) => {
        match crate::gpu_cmd::select($device, $work)? {
            crate::gpu_cmd::Selected::Cpu => {
                let $bot = load(Cpu::<f32>::new(), $run)?;
                $body
            }
            #[cfg(feature = "cuda")]
            crate::gpu_cmd::Selected::Cuda(dev) => {
                let $bot = load(chingu_kernels::gpu::backend::GpuBackend::new(dev), $run)?;
                $body
            }
        }
    };
}

/// `chingu ask`.
pub fn ask(run: &Path, question: &str, gen: &GenerationArgs) -> anyhow::Result<()> {
    with_chatbot!(&gen.device, "answering", run, |bot| ask_with(&bot, question, gen))
}

fn ask_with<B: Backend>(
    bot: &Chatbot<B>,
    question: &str,
    gen: &GenerationArgs,
) -> anyhow::Result<()> {
    println!(
        "{}",
        eval::answer(&bot.model, &bot.tokenizer, bot.specials, question, gen.options())?
    );
    Ok(())
}

/// `chingu chat`: a read-answer loop with line editing and history (kept in
/// `RUN/chat_history.txt`); `/quit` leaves, `/settings` shows the generation settings.
pub fn chat(run: &Path, gen: &GenerationArgs) -> anyhow::Result<()> {
    with_chatbot!(&gen.device, "answering", run, |bot| chat_with(&bot, run, gen))
}

fn chat_with<B: Backend>(bot: &Chatbot<B>, run: &Path, gen: &GenerationArgs) -> anyhow::Result<()> {
    eprintln!(
        "chingu chat — {} (step {}). Type a message; /settings shows settings, /quit leaves.",
        bot.dir.display(),
        bot.state.step
    );
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = run.join("chat_history.txt");
    let _ = editor.load_history(&history); // absent on the first chat
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(
                rustyline::error::ReadlineError::Eof | rustyline::error::ReadlineError::Interrupted,
            ) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        match line {
            "/quit" | "/exit" => break,
            "/settings" => println!("{:?}", gen.options()),
            question => {
                println!(
                    "{}",
                    eval::answer(
                        &bot.model,
                        &bot.tokenizer,
                        bot.specials,
                        question,
                        gen.options()
                    )?
                )
            }
        }
    }
    editor.save_history(&history).with_context(|| history.display().to_string())?;
    Ok(())
}

/// Reads `heldout.jsonl` of a prepared directory: (question, answer) pairs.
fn heldout(data: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let path = data.join(chingu_corpus::prepare::HELDOUT_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let field = |k: &str| {
                v[k].as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{}:{}: no {k}", path.display(), i + 1))
            };
            Ok((field("question")?, field("answer")?))
        })
        .collect()
}

/// Prints a few held-out questions with the model's answers (the quick job's ending).
pub fn print_samples<B: Backend>(
    model: &Model<B>,
    data: &Path,
    count: usize,
) -> anyhow::Result<()> {
    // Only the tokenizer is needed: no reason to re-verify every shard after training.
    let manifest = Manifest::load(data)?;
    let tok = tokenizer::load(&data.join(&manifest.tokenizer.file))?;
    // Evenly spaced held-out questions (scored), then a few everyday ones (no single right
    // answer). Appending the everyday ones to the held-out list and striding over both would
    // never reach them.
    let heldout = heldout(data)?;
    let step = (heldout.len() / count.max(1)).max(1);
    let everyday =
        ["배고파", "오늘 너무 피곤해", "주말에 뭐 하지?"].map(|q| (q.to_string(), String::new()));
    let pairs = heldout.into_iter().step_by(step).take(count).chain(everyday);
    println!("\nsample answers:");
    for (q, a) in pairs {
        let got = eval::answer(
            model,
            &tok,
            manifest.tokenizer.special_ids,
            &q,
            GenerateOptions::default(),
        )?;
        let mark = if a.is_empty() {
            ""
        } else if got == a {
            "  ✓"
        } else {
            "  ✗"
        };
        println!("  Q: {q}\n  A: {got}{mark}");
    }
    Ok(())
}

/// Arguments of `chingu eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Run directory with checkpoints.
    #[arg(long, default_value = "runs/quickstart")]
    pub run: PathBuf,
    /// Prepared data to score on (valid split, and heldout.jsonl when present).
    #[arg(long, default_value = "prepared")]
    pub data: PathBuf,
    /// Generate answers for at most this many held-out questions and this many valid pairs
    /// (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Device: auto (a CUDA GPU when built with --features cuda and one is found, else the
    /// CPU), cpu, or cuda (fail if no GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
}

/// `chingu eval`.
pub fn evaluate(args: &EvalArgs) -> anyhow::Result<()> {
    with_chatbot!(&args.device, "evaluating", &args.run, |bot| evaluate_with(&bot, args))
}

fn evaluate_with<B: Backend>(bot: &Chatbot<B>, args: &EvalArgs) -> anyhow::Result<()> {
    let prepared = Prepared::open(&args.data)?;
    if prepared.manifest.tokenizer.sha256 != bot.state.tokenizer_sha256 {
        anyhow::bail!(
            "{} uses another tokenizer than the checkpoint; pass the --data it was trained on",
            args.data.display()
        );
    }
    let specials = prepared.specials();
    let teacher = if prepared.valid.is_empty() {
        None
    } else {
        let (records, _) =
            chingu_corpus::batching::index_records(&prepared.valid, bot.model.config.max_len)?;
        Some(eval::teacher_forced(
            &bot.model,
            &prepared.valid,
            &records,
            specials,
            4096,
            usize::MAX,
        )?)
    };
    let subset = |pairs: Vec<(String, String)>| match pairs.len().checked_div(args.limit) {
        Some(step) => pairs.into_iter().step_by(step.max(1)).take(args.limit).collect(),
        None => pairs,
    };
    let score = |pairs: Vec<(String, String)>| -> anyhow::Result<_> {
        let pairs = subset(pairs);
        Ok(if pairs.is_empty() {
            None
        } else {
            Some(eval::score_generation(&bot.model, &bot.tokenizer, specials, &pairs)?)
        })
    };
    let generation = score(heldout(&args.data)?)?;
    // The valid split as text, back from its shards.
    let mut valid_pairs = Vec::new();
    for shard in &prepared.valid {
        for record in shard.iter() {
            let q = tokenizer::decode(&prepared.tokenizer, &record.question.to_vec())?;
            let a = tokenizer::decode(&prepared.tokenizer, &record.answer.to_vec())?;
            valid_pairs.push((q, a));
        }
    }
    let valid_generation = score(valid_pairs)?;
    if args.json {
        let out = serde_json::json!({
            "checkpoint": bot.dir,
            "step": bot.state.step,
            "valid": teacher,
            "valid_generation": valid_generation,
            "heldout": generation,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("checkpoint      {} (step {})", bot.dir.display(), bot.state.step);
    if let Some(t) = teacher {
        println!(
            "valid loss      {:.4} (perplexity {:.2}, token accuracy {:.1}%, {} tokens)",
            t.loss,
            t.perplexity,
            100.0 * t.token_accuracy,
            t.tokens
        );
    }
    if let Some(g) = valid_generation {
        println!(
            "valid answers   exact match {:.1}% ({}/{}), chrF {:.1}",
            100.0 * g.exact_match,
            g.exact,
            g.questions,
            g.chrf
        );
    }
    if let Some(g) = generation {
        println!(
            "held-out        exact match {:.1}% ({}/{}), chrF {:.1}",
            100.0 * g.exact_match,
            g.exact,
            g.questions,
            g.chrf
        );
    }
    Ok(())
}
