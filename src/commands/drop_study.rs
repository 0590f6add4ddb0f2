//! `effir drop-study`: retrieval quality after dropping the least important
//! attention or MLP sub-layers (no fine-tuning).

use super::document_sample::DocumentSampleArgs;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use effir_pipeline::compress::analysis::{
    measure_importance, measure_importance_streamed, ImportanceReport,
};
use effir_pipeline::compress::drop_study::drop_study;
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::data::calibration::{CalibrationBudget, CalibrationSet};
use effir_pipeline::eval::embedding_cache::EmbeddingCache;
use effir_pipeline::eval::evaluation::{EvalSettings, Phase};
use effir_pipeline::io::atomic_file::write_bytes_atomically;
use effir_pipeline::model::layer_stream::LayerStream;
use effir_pipeline::Embedder;

use super::model_options::ModelArgs;

#[derive(Debug, Args)]
pub struct DropStudyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// BEIR dataset: calibration text and evaluation.
    #[arg(long, env = "EFFIR_DATA")]
    pub data: PathBuf,
    /// Qrels split to evaluate [default: test].
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Numbers of sub-layers to drop, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub k: Vec<usize>,
    /// `--seed` also seeds the calibration sample.
    #[command(flatten)]
    pub sample: DocumentSampleArgs,
    /// Token budget of the calibration text.
    #[arg(long, default_value_t = 65_536)]
    pub calib_tokens: usize,
    /// Rank sub-layers by this importance.json (of `effir analyze` or an
    /// earlier drop study, e.g. on another dataset) instead of measuring
    /// importance on --data.
    #[arg(long, conflicts_with = "calib_tokens")]
    pub importance: Option<PathBuf>,
    /// Output directory: drop_study.json, drop_study.md, drop_study.svg,
    /// importance.json, importance.md, importance.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Corpus-embedding cache [default: $EFFIR_CACHE_DIR or ~/.cache/effir].
    #[arg(long, env = "EFFIR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Measure importance one layer at a time from the memory-mapped
    /// weights (decoders), before the model is loaded whole for the
    /// retrieval runs. Same report, bit for bit.
    #[arg(long, conflicts_with = "importance")]
    pub stream: bool,
}

/// The calibration budget of the importance measurement.
fn calibration_budget(args: &DropStudyArgs) -> CalibrationBudget {
    CalibrationBudget {
        max_tokens: args.calib_tokens,
        seed: args.sample.seed,
        ..Default::default()
    }
}

/// Importance measured layer by layer (`--stream`).
fn streamed_importance(args: &DropStudyArgs) -> anyhow::Result<ImportanceReport> {
    let stream = LayerStream::open(&args.model.model, &args.model.load_options())
        .with_context(|| format!("opening model {}", args.model.model.display()))?;
    let calibration =
        CalibrationSet::from_dataset(stream.setup(), &args.data, &calibration_budget(args))?;
    let bar = super::progress::progress_bar(
        args.quiet,
        stream.shape().layers.len() as u64,
        "{spinner} analyzing layer {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    );
    let report =
        measure_importance_streamed(&stream, &calibration.texts, args.batch_size, &mut |d| {
            bar.set_position(d as u64)
        })?;
    bar.finish_and_clear();
    Ok(report)
}

pub fn run(args: DropStudyArgs) -> anyhow::Result<()> {
    if args.k.is_empty() || args.k.contains(&0) {
        bail!("--k takes counts of at least 1, e.g. --k 1,2,4");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    args.sample.check()?;
    let dataset = Dataset::load(&args.data, &args.split, DanglingPolicy::Warn)?;
    let full = dataset.corpus.len();
    let dataset = args.sample.apply(dataset);
    let streamed = args
        .stream
        .then(|| streamed_importance(&args))
        .transpose()?;
    let mut embedder = Embedder::load(&args.model.model, &args.model.load_options())
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let layers = embedder.shape().layers.len();
    if let Some(k) = args.k.iter().find(|k| **k > layers) {
        bail!("--k {k}: the model has {layers} layers");
    }
    let importance = match (&args.importance, streamed) {
        (_, Some(report)) => report,
        (Some(path), None) => {
            let report = ImportanceReport::read(path)?;
            if report.layers.len() != layers {
                bail!(
                    "{}: importance of {} layers; {} has {layers}",
                    path.display(),
                    report.layers.len(),
                    args.model.model.display()
                );
            }
            // The report must rank exactly the MLPs this model has (one
            // measured on the unpruned model does not fit a pruned one).
            let shape = embedder.shape();
            if let Some(l) = report
                .layers
                .iter()
                .find(|l| l.mlp.is_some() != shape.layers[l.layer].mlp.is_some())
            {
                bail!(
                    "{}: layer {}'s MLP is {} in the report but {} in {}",
                    path.display(),
                    l.layer,
                    if l.mlp.is_some() { "ranked" } else { "absent" },
                    if shape.layers[l.layer].mlp.is_some() {
                        "present"
                    } else {
                        "absent"
                    },
                    args.model.model.display()
                );
            }
            report
        }
        (None, None) => {
            let calibration = CalibrationSet::from_dataset(
                embedder.setup(),
                &args.data,
                &calibration_budget(&args),
            )?;
            let bar = super::progress::progress_bar(args.quiet, 0, super::progress::PHASE_TEMPLATE);
            bar.set_message("analyzing");
            bar.set_length(calibration.texts.len() as u64);
            let report =
                measure_importance(&embedder, &calibration.texts, args.batch_size, &mut |d| {
                    bar.set_position(d as u64)
                })?;
            bar.finish_and_clear();
            report
        }
    };
    let importance_source = match &args.importance {
        Some(path) => path.display().to_string(),
        None => args.data.display().to_string(),
    };
    let settings = EvalSettings {
        batch_size: args.batch_size,
        cache: Some(
            args.cache_dir
                .clone()
                .unwrap_or_else(EmbeddingCache::default_dir),
        ),
        ..Default::default()
    };
    let bar = super::progress::progress_bar(args.quiet, 0, super::progress::PHASE_TEMPLATE);
    let study = drop_study(
        &mut embedder,
        &importance,
        &dataset,
        &args.k,
        &settings,
        &mut |label, phase, done, total| {
            bar.set_message(format!(
                "{label}: {}",
                match phase {
                    Phase::Corpus => "corpus",
                    Phase::Queries => "queries",
                }
            ));
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();

    let name = args
        .model
        .model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let subset = args.sample.describe(dataset.corpus.len(), full);
    let title = format!("Drop study of {name} on {}", args.data.display());
    let json = serde_json::json!({
        "model": args.model.model,
        "data": args.data,
        "split": args.split,
        "documents": subset,
        "max_length": embedder.text_encoder().max_length(),
        "importance_from": importance_source,
        "calibration_tokens": importance.tokens,
        "importance": importance.layers,
        "study": study,
    });
    let mut md = study.markdown(&title);
    md.push_str(&format!(
        "\nEvaluation set: {subset}, split `{}`. Sub-layers ranked by importance measured on {importance_source} ({} calibration tokens).\n",
        args.split, importance.tokens
    ));
    let write =
        |file: &str, body: String| write_bytes_atomically(&args.out.join(file), body.as_bytes());
    write(
        "drop_study.json",
        format!("{}\n", serde_json::to_string_pretty(&json)?),
    )?;
    write("drop_study.md", md.clone())?;
    let importance_json = serde_json::json!({
        "model": args.model.model,
        "calibration": { "source": importance_source, "texts": importance.texts, "tokens": importance.tokens, "pooled_positions": importance.pooled_positions },
        "layers": importance.layers,
    });
    write(
        "importance.json",
        format!("{}\n", serde_json::to_string_pretty(&importance_json)?),
    )?;
    write("drop_study.svg", study.svg(&title))?;
    write(
        "importance.md",
        importance.markdown(&format!("Sub-layer importance of {name}")),
    )?;
    write(
        "importance.svg",
        importance.svg(&format!("Sub-layer importance of {name}")),
    )?;
    print!("{md}");
    println!("wrote {}/drop_study.{{json,md,svg}}", args.out.display());
    Ok(())
}
