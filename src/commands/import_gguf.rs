//! `effir import-gguf`: a llama.cpp GGUF file as a Hugging Face model
//! directory every other stage reads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use effir_pipeline::import::{import_gguf, ImportOptions, WeightDType};
use effir_pipeline::io::model_card::command_line;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Args)]
pub struct ImportGgufArgs {
    /// The GGUF file (llama, qwen2 or qwen3; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K tensors).
    #[arg(long)]
    pub gguf: PathBuf,
    /// New directory for the model (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage type of the dequantized weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

pub fn run(args: ImportGgufArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let options = ImportOptions {
        dtype: match args.dtype {
            DTypeArg::F32 => WeightDType::F32,
            DTypeArg::Bf16 => WeightDType::Bf16,
            DTypeArg::F16 => WeightDType::F16,
        },
        command: command_line(&args.out),
    };
    let record = import_gguf(&args.gguf, &args.out, &options)
        .with_context(|| format!("importing {}", args.gguf.display()))?;
    let types: Vec<String> = record
        .source_types
        .iter()
        .map(|(ty, n)| format!("{n} {ty}"))
        .collect();
    println!(
        "{}: {} ({} tensors: {}; {} query/key projections unpermuted), stored as {}, tokenizer pre-tokenizer `{}`, in {:.1} s",
        args.out.display(),
        record.architecture,
        record.tensors,
        types.join(", "),
        record.unpermuted,
        options.dtype.torch_name(),
        record.pre_tokenizer,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
