//! `effir validate`: parity of a candidate ONNX graph with its source model
//! in candle, and its retrieval quality against a reference model, judged
//! by the gates of a YAML file. Exits non-zero, naming the gates, when any
//! fails: this is what a CI job runs.

use super::document_sample::DocumentSampleArgs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use effir_onnx::export::SOURCE_MODEL_KEY;
use effir_onnx::validate::{
    apply_gates, check_parity, check_quality, parity_texts, Gates, Provenance, ValidationReport,
};
use effir_onnx::{GraphLocation, OnnxEncoder};
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::data::text_format::TextFormat;
use effir_pipeline::eval::embedding_cache::EmbeddingCache;
use effir_pipeline::eval::evaluation::{EvalSettings, Phase};
use effir_pipeline::io::atomic_file::write_bytes_atomically;
use effir_pipeline::io::model_card::{command_line, update_section};
use effir_pipeline::io::recorded_path::resolve;
use effir_pipeline::model::layer_stream::LayerStream;
use effir_pipeline::{Embedder, LoadOptions, TextEmbedder};

use super::provider_options::ProviderArgs;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Reference model directory (the unpruned model), run in candle.
    #[arg(long)]
    pub reference: PathBuf,
    /// Candidate graph: a .onnx file, or a directory with model.onnx or onnx/model.onnx.
    #[arg(long)]
    pub candidate: PathBuf,
    /// The candidate's source model in candle, for parity [default: the graph's
    /// effir.source_model metadata, else the reference].
    #[arg(long)]
    pub candidate_model: Option<PathBuf>,
    /// BEIR dataset directory; repeat for several (quality is gated on
    /// each, so the worst retention decides; parity texts come from the first).
    #[arg(long, env = "EFFIR_DATA", required = true)]
    pub data: Vec<PathBuf>,
    /// Gates (YAML): parity.{min_cosine,min_mean_cosine,max_abs_diff},
    /// quality.{min_ndcg_retention,min_recall_retention,min_ndcg}.
    #[arg(long)]
    pub gates: PathBuf,
    /// Qrels split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Texts (queries and documents from the dataset) for the parity check.
    #[arg(long, default_value_t = 64)]
    pub parity_texts: usize,
    #[command(flatten)]
    pub sample: DocumentSampleArgs,
    /// Maximum tokens per text [default: the model's own].
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Directory for validation.json and validation.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Leave the candidate's model card as it is (by default its
    /// "Validation" section gets this run's figures, when the candidate's
    /// directory has a card effir wrote).
    #[arg(long)]
    pub no_card: bool,
    /// Corpus-embedding cache [default: $EFFIR_CACHE_DIR or ~/.cache/effir].
    #[arg(long, env = "EFFIR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub providers: ProviderArgs,
    #[arg(long)]
    pub quiet: bool,
    /// Run the candle side one layer at a time from the memory-mapped
    /// weights (decoders; models larger than memory). Same embeddings.
    #[arg(long)]
    pub stream: bool,
}

/// The candle side of the comparison: loaded whole, or streamed.
fn open_candle(
    dir: &Path,
    options: &LoadOptions,
    stream: bool,
) -> anyhow::Result<Box<dyn TextEmbedder>> {
    Ok(if stream {
        Box::new(
            LayerStream::open(dir, options)
                .with_context(|| format!("opening {}", dir.display()))?,
        )
    } else {
        Box::new(
            Embedder::load(dir, options).with_context(|| format!("loading {}", dir.display()))?,
        )
    })
}

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let report = validate(&args)?;
    if let Some(out) = &args.out {
        write_report(&report, out)?;
    }
    if !args.no_card {
        record_in_card(&report, &args.candidate);
    }
    print!("{}", report.to_markdown());
    let failed = report.failed_gates();
    if !failed.is_empty() {
        bail!(
            "{} gate(s) failed: {}",
            failed.len(),
            failed
                .iter()
                .map(|g| format!(
                    "{} ({:.6} {} {} is false{})",
                    g.gate,
                    g.value,
                    g.rule,
                    g.threshold,
                    g.detail
                        .as_deref()
                        .map_or(String::new(), |d| format!("; {d}"))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Parity and quality of `args.candidate`, judged by the gates; an error
/// only when something cannot be measured (a failed gate is in the report).
pub fn validate(args: &ValidateArgs) -> anyhow::Result<ValidationReport> {
    // Cheap checks first: gates, dataset, graph.
    let gates = Gates::load(&args.gates)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    args.sample.check()?;
    let datasets = args
        .data
        .iter()
        .map(|dir| {
            Ok(args
                .sample
                .apply(Dataset::load(dir, &args.split, DanglingPolicy::Warn)?))
        })
        .collect::<anyhow::Result<Vec<Dataset>>>()?;
    let settings = args.providers.settings()?;
    let location = GraphLocation::resolve(&args.candidate)?;
    let options = LoadOptions {
        max_length: args.max_length,
        ..Default::default()
    };
    let candidate = OnnxEncoder::load(location, &options, &settings)
        .with_context(|| format!("opening candidate {}", args.candidate.display()))?;
    // The candidate's own source model, when the graph records one that exists.
    let candle_model = match &args.candidate_model {
        Some(dir) => dir.clone(),
        None => candidate
            .metadata(SOURCE_MODEL_KEY)
            .map(|recorded| {
                let graph_dir = candidate.graph().parent().unwrap_or(Path::new("."));
                resolve(graph_dir, Path::new(recorded))
            })
            .filter(|p| p.join("config.json").is_file())
            .unwrap_or_else(|| args.reference.clone()),
    };
    // Read before any work, so a malformed record fails first.
    let provenance = Provenance::read(&candle_model)
        .with_context(|| format!("reading the records of {}", candle_model.display()))?;
    let providers: Vec<String> = candidate
        .providers()
        .iter()
        .map(|p| p.to_string())
        .collect();
    eprintln!(
        "candidate {} under {}; parity against {}",
        candidate.graph().display(),
        providers.join(", "),
        candle_model.display()
    );

    let bar = super::progress::progress_bar(args.quiet, 0, super::progress::PHASE_TEMPLATE);

    // Parity: the same texts through the graph and through candle.
    bar.set_message("parity");
    let candle = open_candle(&candle_model, &options, args.stream)?;
    let format = TextFormat::for_model(candle.setup(), None, None)?;
    let texts = parity_texts(&datasets[0], &format, args.parity_texts);
    let parity = check_parity(&candidate, candle.as_ref(), &texts, args.batch_size)?;

    // Quality: the candidate through ONNX Runtime vs the reference in candle.
    let quality = if gates.wants_quality() {
        let reference = if candle_model == args.reference {
            candle
        } else {
            drop(candle);
            open_candle(&args.reference, &options, args.stream).context("the reference model")?
        };
        let eval = EvalSettings {
            batch_size: args.batch_size,
            cache: (!args.no_cache).then(|| {
                args.cache_dir
                    .clone()
                    .unwrap_or_else(EmbeddingCache::default_dir)
            }),
            ..Default::default()
        };
        datasets
            .iter()
            .map(|dataset| {
                check_quality(
                    reference.as_ref(),
                    &candidate,
                    dataset,
                    &eval,
                    &mut |which, phase, done, total| {
                        bar.set_message(format!(
                            "{}, {which}: {}",
                            dataset.dir.display(),
                            match phase {
                                Phase::Corpus => "encoding corpus",
                                Phase::Queries => "encoding queries",
                            }
                        ));
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    bar.finish_and_clear();

    // From effir's metadata, or the graph's operators for a third-party
    // quantized export: its parity is judged by the int8 gates.
    let precision = match candidate.metadata("effir.precision") {
        Some(p) => p.to_string(),
        None => effir_onnx::graph_file::GraphFile::read(candidate.graph())?.precision(),
    };
    let results = apply_gates(&gates, &precision, Some(&parity), &quality);
    Ok(ValidationReport {
        reference: args.reference.clone(),
        candidate: candidate.graph().to_path_buf(),
        providers,
        graph_optimization: settings.graph_optimization,
        precision,
        int8_kernel: candidate.metadata("effir.int8_kernel").map(str::to_string),
        cpu_features: effir_onnx::cpu_features::CpuFeatures::detect(),
        provenance,
        passed: results.iter().all(|g| g.passed),
        parity: Some(parity),
        quality,
        gates: results,
    })
}

/// Writes the figures into the candidate's model card ("Validation"), with
/// the command that measured them; a card that cannot be written (a
/// read-only artifact) is a warning, not a failed validation.
fn record_in_card(report: &ValidationReport, candidate: &Path) {
    let Ok(location) = GraphLocation::resolve(candidate) else {
        return;
    };
    let dir = location.model_dir;
    let body = format!(
        "The latest `effir validate` of this graph:\n\n{}\n```sh\n{}\n```",
        report.card_section(),
        command_line(&dir)
    );
    match update_section(&dir, "Validation", &body) {
        Ok(true) => tracing::info!(
            "validation figures written into {}/README.md",
            dir.display()
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!("could not write the validation figures into the model card: {e}"),
    }
}

pub fn write_report(report: &ValidationReport, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)? + "\n";
    write_bytes_atomically(&out.join("validation.json"), json.as_bytes())?;
    write_bytes_atomically(&out.join("validation.md"), report.to_markdown().as_bytes())?;
    Ok(())
}
