//! `effir`: make dense retrievers small and fast, and ship them as ONNX.

mod commands;
mod peak_memory;
mod stage_config;

use clap::{Parser, Subcommand};

/// Model inference allocates and frees tensors of tens of megabytes per
/// layer; glibc returns them to the kernel each time (page faults on every
/// reuse), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the kernel: a
/// forward pass frees and reallocates the same large buffers every layer,
/// and each return made the next use fault in freshly zeroed pages (9,400
/// page faults embedding 256 SciFact abstracts with MiniLM; 2,000 without
/// returns). Peak memory is unchanged.
fn keep_freed_memory() {
    // SAFETY: setting a documented mimalloc option; no allocation depends on it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(name = "effir", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Refuse a line of a text, JSONL or qrels file longer than this many MB.
    #[arg(long, global = true, default_value_t = 16)]
    max_line_mb: u64,
    /// Refuse a data file larger than this many GB (after decompression).
    #[arg(long, global = true, default_value_t = 16)]
    max_input_gb: u64,
    /// Refuse a tokenizer.json larger than this many MB.
    #[arg(long, global = true, default_value_t = 128)]
    max_tokenizer_mb: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Importance of every attention and MLP sub-layer (1 - cos of the residual stream).
    Analyze(commands::analyze::AnalyzeArgs),
    /// ONNX Runtime latency and throughput of graphs (original vs compressed).
    Bench(commands::bench::BenchArgs),
    /// Retrieval quality after dropping the k least important attention or MLP sub-layers.
    DropStudy(commands::drop_study::DropStudyArgs),
    /// Embed texts from a JSONL or plain-text file into .npy or JSONL.
    Embed(commands::embed::EmbedArgs),
    /// One shard of a BEIR corpus's document embeddings (--shard I/N), resumable; eval --embeddings merges the shards.
    Encode(commands::encode::EncodeArgs),
    /// Retrieval quality (nDCG, recall, MRR, MAP, P) on a BEIR dataset.
    Eval(commands::eval::EvalArgs),
    /// Export a model (pruned or not) as an ONNX graph with its tokenizer and configs.
    Export(commands::export::ExportArgs),
    /// Retrieval fine-tuning into a new model directory: contrastive (InfoNCE, hard negatives, score distillation), label-free embedding distillation, or both; full or LoRA.
    Finetune(commands::finetune::FinetuneArgs),
    /// Speed against quality of candidate graphs (and peers'): validated on every dataset, timed in one run; the fastest that passes the gates.
    Frontier(commands::frontier::FrontierArgs),
    /// Import a llama.cpp GGUF file (dequantized) as a Hugging Face model directory with config.json, model.safetensors and tokenizer.json.
    ImportGguf(commands::import_gguf::ImportGgufArgs),
    /// List the operators of an ONNX graph that TensorRT cannot parse.
    LintOnnx(commands::lint_onnx::LintOnnxArgs),
    /// Slim an existing ONNX export (Optimum, sentence-transformers) for a pruned or fine-tuned model, keeping its interface.
    Rewrite(commands::rewrite::RewriteArgs),
    /// Parity and quality gates of a candidate ONNX graph (non-zero exit on failure).
    Validate(commands::validate::ValidateArgs),
    /// Drop MLP sub-layers and narrow the rest into a new, smaller model directory.
    Prune(commands::prune::PruneArgs),
    /// Show a model's architecture, per-layer sizes and parameter counts.
    Inspect(commands::inspect::InspectArgs),
}

/// A closed output pipe (`effir export ... | head -1`) ends the process
/// quietly, as it ends `cat` or `grep`, instead of a panic in `println!`:
/// Rust ignores SIGPIPE by default, this restores the default action.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default, before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    end_quietly_on_closed_pipe();
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EFFIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Limits beyond what a u64 of bytes holds mean "no limit".
    effir_pipeline::io::input_limits::set(effir_pipeline::io::input_limits::InputLimits {
        max_line_bytes: usize::try_from(cli.max_line_mb.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        max_input_bytes: cli.max_input_gb.saturating_mul(1 << 30),
        max_tokenizer_bytes: cli.max_tokenizer_mb.saturating_mul(1 << 20),
    });
    let result = match cli.command {
        Command::Analyze(args) => commands::analyze::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
        Command::Frontier(args) => commands::frontier::run(args),
        Command::ImportGguf(args) => commands::import_gguf::run(args),
        Command::LintOnnx(args) => commands::lint_onnx::run(args),
        Command::Rewrite(args) => commands::rewrite::run(args),
        Command::Validate(args) => commands::validate::run(args),
        Command::DropStudy(args) => commands::drop_study::run(args),
        Command::Embed(args) => commands::embed::run(args),
        Command::Encode(args) => commands::encode::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Prune(args) => commands::prune::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
