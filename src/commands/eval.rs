//! `effir eval`: retrieval quality of a model on a BEIR dataset.

use super::document_sample::DocumentSampleArgs;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::data::text_format::DocumentTemplate;
use effir_pipeline::data::text_format::TextFormat;
use effir_pipeline::eval::corpus_shards::merge_shards;
use effir_pipeline::eval::embedding_cache::EmbeddingCache;
use effir_pipeline::eval::evaluation::{
    evaluate_model, evaluate_with_corpus_embeddings, mean_table, stage_report, write_staged_report,
    EvalSettings, Phase,
};
use effir_pipeline::Prompt;
use serde::Deserialize;

use super::model_options::{load_text_embedder, ModelArgs};
use super::provider_options::ProviderArgs;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; plain or .gz).
    #[arg(long, env = "EFFIR_DATA")]
    pub data: PathBuf,
    /// Stage config (YAML); flags override it.
    #[arg(long, env = "EFFIR_EVAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Qrels split [default: test].
    #[arg(long)]
    pub split: Option<String>,
    /// Metric cut-offs, comma-separated [default: 10,100].
    #[arg(long, value_delimiter = ',')]
    pub k: Option<Vec<usize>>,
    /// Directory for metrics.json and run.trec.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fail when qrels name unknown documents or queries (default: warn and ignore them).
    #[arg(long)]
    pub strict: bool,
    /// Texts per forward pass [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Never return a document whose id equals the query id (BEIR's ignore_identical_ids).
    #[arg(long)]
    pub ignore_identical_ids: bool,
    /// Corpus-embedding cache [default: $EFFIR_CACHE_DIR or ~/.cache/effir].
    #[arg(long, env = "EFFIR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the corpus-embedding cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Document text template: {title}, {text}, {title_or_none}, {prompt} [default: the model's].
    #[arg(long)]
    pub document_template: Option<String>,
    /// Prompt name for queries [default: the model's `query` prompt, if any].
    #[arg(long)]
    pub query_prompt: Option<String>,
    #[command(flatten)]
    pub sample: DocumentSampleArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// --model is an ONNX export (directory or graph), run by ONNX Runtime.
    #[arg(long)]
    pub onnx: bool,
    #[command(flatten)]
    pub providers: ProviderArgs,
    /// Corpus embeddings from `effir encode` shards (repeatable, e.g. runs/enc/shard-*): every
    /// shard of one encoding by this model, merged; only the queries are encoded here.
    #[arg(long)]
    pub embeddings: Vec<PathBuf>,
}

/// `configs/eval.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub split: Option<String>,
    pub k: Option<Vec<usize>>,
    pub batch_size: Option<usize>,
    pub run_depth: Option<usize>,
    pub ignore_identical_ids: Option<bool>,
    pub document_template: Option<String>,
    pub query_prompt: Option<String>,
    pub strict: Option<bool>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let config: EvalConfig = crate::stage_config::load(args.config.as_deref())?;
    let split = args.split.or(config.split).unwrap_or_else(|| "test".into());
    let ks = args.k.or(config.k).unwrap_or_else(|| vec![10, 100]);
    if ks.is_empty() || ks.contains(&0) {
        bail!("--k takes cut-offs of at least 1, e.g. --k 10,100");
    }
    let batch_size = args.batch_size.or(config.batch_size).unwrap_or(32);
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let run_depth = config.run_depth.unwrap_or(1000);
    if run_depth == 0 {
        bail!("run_depth must be at least 1");
    }
    let strict = args.strict || config.strict.unwrap_or(false);
    let settings = EvalSettings {
        ks: ks.clone(),
        run_depth,
        batch_size,
        ignore_identical_ids: args.ignore_identical_ids
            || config.ignore_identical_ids.unwrap_or(false),
        document_template: args
            .document_template
            .or(config.document_template)
            .map(DocumentTemplate),
        query_prompt: args.query_prompt.or(config.query_prompt).map(Prompt::Named),
        cache: (!args.no_cache).then(|| args.cache_dir.unwrap_or_else(EmbeddingCache::default_dir)),
        run_tag: "effir".into(),
    };

    // Data first: a bad dataset fails before the model loads.
    let policy = if strict {
        DanglingPolicy::Strict
    } else {
        DanglingPolicy::Warn
    };
    args.sample.check()?;
    let dataset = Dataset::load(&args.data, &split, policy)?;
    let full = dataset.corpus.len();
    let dataset = args.sample.apply(dataset);
    if dataset.corpus.len() < full {
        eprintln!(
            "evaluating on {}",
            args.sample.describe(dataset.corpus.len(), full)
        );
    }
    if !dataset.dangling.is_empty() {
        eprintln!(
            "warning: ignored {} judgement(s) of unknown documents and {} of unknown queries (--strict to fail)",
            dataset.dangling.unknown_documents, dataset.dangling.unknown_queries
        );
    }
    let embedder = load_text_embedder(&args.model, args.onnx, &args.providers)?;
    let embedder = embedder.as_ref();
    // Merged shards are checked before any query is encoded.
    let corpus_embeddings = if args.embeddings.is_empty() {
        None
    } else {
        let format = TextFormat::for_model(
            embedder.setup(),
            settings.document_template.clone(),
            settings.query_prompt.clone(),
        )?;
        Some(
            merge_shards(
                &args.embeddings,
                embedder,
                &dataset,
                &format,
                settings.batch_size,
            )
            .context("merging the corpus shards")?,
        )
    };
    // The output is claimed before the work, so a clash shows at once.
    let staged = args.out.as_deref().map(stage_report).transpose()?;

    let bar = super::progress::progress_bar(
        args.quiet,
        0,
        "{spinner} {msg} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
    );
    let mut progress = |phase, done, total| {
        bar.set_message(match phase {
            Phase::Corpus => "encoding corpus",
            Phase::Queries => "encoding queries",
        });
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let report = match corpus_embeddings {
        Some(corpus) => {
            evaluate_with_corpus_embeddings(embedder, &dataset, &settings, corpus, &mut progress)?
        }
        None => evaluate_model(embedder, &dataset, &settings, &mut progress)?,
    };
    bar.finish_and_clear();

    if let Some((staged, out)) = staged {
        write_staged_report(staged, &report, &out, run_depth, &settings.run_tag)?;
    }
    println!(
        "{} on {} ({split}): {} queries, {} documents, max length {}",
        args.model.model.display(),
        args.data.display(),
        report.num_queries,
        report.num_documents,
        report.max_length
    );
    for (name, value) in mean_table(&report.evaluation, &ks) {
        println!("  {name:<12} {value:.4}");
    }
    let t = &report.timings;
    match t.corpus_docs_per_second {
        Some(rate) => println!(
            "  corpus encoding {:.1}s ({rate:.1} docs/s)",
            t.corpus_encode_seconds
        ),
        None if !args.embeddings.is_empty() => println!(
            "  corpus embeddings merged from {} shards",
            args.embeddings.len()
        ),
        None => println!(
            "  corpus embeddings from cache ({:.2}s)",
            t.corpus_encode_seconds
        ),
    }
    println!(
        "  query encoding {:.1}s, exact search {:.3}s",
        t.query_encode_seconds, t.search_seconds
    );
    if let Some(out) = &args.out {
        println!(
            "  wrote {0}/metrics.json, {0}/run.trec and {0}/timings.json",
            out.display()
        );
    }
    Ok(())
}
