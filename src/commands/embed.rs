//! `effir embed`: texts in, embeddings out.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use effir_pipeline::io::npy;
use effir_pipeline::io::text_input::{read_texts, InputFormat};
use effir_pipeline::{Embedder, Prompt};
use serde::Deserialize;

use super::model_options::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormatArg {
    /// By extension: .jsonl/.json/.ndjson are JSONL, anything else plain lines.
    Auto,
    Jsonl,
    Lines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormatArg {
    /// By extension: .npy is NumPy, anything else JSONL.
    Auto,
    Npy,
    Jsonl,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Texts: JSONL with a `text` field per line, or one text per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write embeddings (.npy: float32 N×D; else JSONL).
    #[arg(long)]
    pub output: PathBuf,
    /// Stage config (YAML); flags override it.
    #[arg(long, env = "EFFIR_EMBED_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub input_format: InputFormatArg,
    #[arg(long, value_enum, default_value = "auto")]
    pub output_format: OutputFormatArg,
    /// Texts per forward pass [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Prepend the model's prompt of this name (e.g. `query`, `document`).
    #[arg(long, conflicts_with = "prefix")]
    pub prompt: Option<String>,
    /// Prepend this literal text to every input.
    #[arg(long)]
    pub prefix: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `configs/embed.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    pub batch_size: Option<usize>,
    pub prompt: Option<String>,
    pub prefix: Option<String>,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let config: EmbedConfig = crate::stage_config::load(args.config.as_deref())?;
    let batch_size = args.batch_size.or(config.batch_size).unwrap_or(32);
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prompt = match (args.prompt.or(config.prompt), args.prefix.or(config.prefix)) {
        (Some(_), Some(_)) => bail!("give either a prompt name or a prefix, not both"),
        (Some(name), None) => Prompt::Named(name),
        (None, Some(prefix)) => Prompt::Prefix(prefix),
        (None, None) => Prompt::Default,
    };
    let input_format = match args.input_format {
        InputFormatArg::Auto => InputFormat::from_extension(&args.input),
        InputFormatArg::Jsonl => InputFormat::Jsonl,
        InputFormatArg::Lines => InputFormat::Lines,
    };
    let npy_output = match args.output_format {
        OutputFormatArg::Auto => args.output.extension().is_some_and(|e| e == "npy"),
        OutputFormatArg::Npy => true,
        OutputFormatArg::Jsonl => false,
    };
    // Cheap checks first: a bad input file fails before the model loads.
    let texts = read_texts(&args.input, input_format)?;
    let embedder = Embedder::load(&args.model.model, &args.model.load_options())
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let prefix = embedder.prefix(&prompt)?;

    let bar = super::progress::progress_bar(
        args.quiet,
        texts.len() as u64,
        "{spinner} embedding {pos}/{len} texts [{elapsed_precise}<{eta_precise}] {per_sec}",
    );
    let start = Instant::now();
    let embeddings = embedder.embed(&texts, &prefix, batch_size, &mut |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    if npy_output {
        npy::write_npy(&args.output, &embeddings)?;
    } else {
        npy::write_jsonl(&args.output, &embeddings)?;
    }
    eprintln!(
        "embedded {} texts ({} dims) in {:.2}s ({:.1} texts/s) -> {}",
        texts.len(),
        embeddings.ncols(),
        seconds,
        texts.len() as f64 / seconds,
        args.output.display()
    );
    Ok(())
}
