//! `effir encode`: one shard of a corpus's document embeddings, so corpus
//! encoding can run as many processes (a Slurm array, a Kubernetes
//! Indexed Job, Ray tasks); `effir eval --embeddings` merges the shards.

use super::document_sample::DocumentSampleArgs;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::data::text_format::{DocumentTemplate, TextFormat};
use effir_pipeline::eval::corpus_shards::{encode_shard, ShardSpec};
use effir_pipeline::Prompt;

use super::model_options::{load_text_embedder, ModelArgs};
use super::provider_options::ProviderArgs;

#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// --model is an ONNX export (directory or graph), run by ONNX Runtime.
    #[arg(long)]
    pub onnx: bool,
    #[command(flatten)]
    pub providers: ProviderArgs,
    /// BEIR dataset directory whose corpus is encoded.
    #[arg(long, env = "EFFIR_DATA")]
    pub data: PathBuf,
    /// Qrels split (chooses the judged documents of a --doc-sample).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Shard I of N (0-based), e.g. 0/3: the blocks of 1,024 documents whose index is I modulo N.
    #[arg(long, default_value = "0/1")]
    pub shard: ShardSpec,
    /// New directory for the shard (embeddings.npy, ids.txt, shard.json); OUT.partial holds finished blocks until then.
    #[arg(long)]
    pub out: PathBuf,
    /// Texts per forward pass (every shard of a corpus must use the same).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Document text template: {title}, {text}, {title_or_none}, {prompt} [default: the model's].
    #[arg(long)]
    pub document_template: Option<String>,
    #[command(flatten)]
    pub sample: DocumentSampleArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: EncodeArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    args.sample.check()?;
    let dataset = args.sample.apply(Dataset::load(
        &args.data,
        &args.split,
        DanglingPolicy::Warn,
    )?);
    let embedder = load_text_embedder(&args.model, args.onnx, &args.providers)?;
    let format = TextFormat::for_model(
        embedder.setup(),
        args.document_template.map(DocumentTemplate),
        Some(Prompt::None),
    )?;
    let bar = super::progress::progress_bar(
        args.quiet,
        0,
        "{spinner} encoding shard {msg} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
    );
    bar.set_message(format!("{}/{}", args.shard.index, args.shard.count));
    let started = std::time::Instant::now();
    let (manifest, resumed) = encode_shard(
        embedder.as_ref(),
        &dataset,
        &format,
        args.shard,
        args.batch_size,
        &args.out,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "{}: shard {}/{} of {} ({} of {} documents in {} blocks, {resumed} of them from an interrupted run) in {:.1}s",
        args.out.display(),
        manifest.shard,
        manifest.shards,
        args.data.display(),
        manifest.rows,
        manifest.documents,
        manifest.blocks.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
