//! `effir analyze`: importance of every attention and MLP sub-layer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::{Args, ValueEnum};
use effir_pipeline::compress::analysis::{
    measure_importance_at, measure_importance_streamed_at, MeasuredPositions,
};
use effir_pipeline::data::calibration::{CalibrationBudget, CalibrationSet};
use effir_pipeline::io::atomic_file::write_bytes_atomically;
use effir_pipeline::Prompt;
use serde::Deserialize;

use super::model_options::{ModelArgs, OpenedModel};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration texts: JSONL with `text`, or one text per line.
    #[arg(long, conflicts_with = "data")]
    pub calib: Option<PathBuf>,
    /// Or a BEIR dataset to sample queries and documents from.
    #[arg(long, env = "EFFIR_DATA")]
    pub data: Option<PathBuf>,
    /// Output directory: importance.json, importance.md, importance.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Stage config (YAML); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Queries sampled from --data [default: 256].
    #[arg(long)]
    pub calib_queries: Option<usize>,
    /// Documents sampled from --data [default: 256].
    #[arg(long)]
    pub calib_docs: Option<usize>,
    /// Token budget of the calibration text [default: 65536].
    #[arg(long)]
    pub calib_tokens: Option<usize>,
    /// Sampling seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Texts per forward pass [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Stream the model one layer at a time from its memory-mapped files
    /// (decoders; models larger than memory). Same report, bit for bit.
    #[arg(long)]
    pub stream: bool,
    /// Positions the importance averages over: every real token (the
    /// paper's measure, which drop-study and prune use) or only those the
    /// model's pooling reads (a last-token retriever: the last token) [default: all].
    #[arg(long, value_enum)]
    pub positions: Option<Positions>,
}

/// `--positions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    All,
    Pooled,
}

/// `configs/analyze.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeConfig {
    pub calib_queries: Option<usize>,
    pub calib_docs: Option<usize>,
    pub calib_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub batch_size: Option<usize>,
    pub positions: Option<Positions>,
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<()> {
    let config: AnalyzeConfig = crate::stage_config::load(args.config.as_deref())?;
    let budget = CalibrationBudget {
        queries: args.calib_queries.or(config.calib_queries).unwrap_or(256),
        documents: args.calib_docs.or(config.calib_docs).unwrap_or(256),
        max_tokens: args.calib_tokens.or(config.calib_tokens).unwrap_or(65_536),
        seed: args.seed.or(config.seed).unwrap_or(0),
    };
    let batch_size = args.batch_size.or(config.batch_size).unwrap_or(16);
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = OpenedModel::open(&args.model, args.stream)?;
    let setup = model.setup();
    let positions = match args
        .positions
        .or(config.positions)
        .unwrap_or(Positions::All)
    {
        Positions::All => MeasuredPositions::AllTokens,
        Positions::Pooled => MeasuredPositions::ReadBy(setup.pooling),
    };
    let calibration = match (&args.calib, &args.data) {
        (Some(file), None) => {
            CalibrationSet::from_file(setup, file, &Prompt::None, budget.max_tokens)?
        }
        (None, Some(dir)) => CalibrationSet::from_dataset(setup, dir, &budget)?,
        _ => bail!("give calibration text with --calib FILE or --data DIR"),
    };
    let start = Instant::now();
    let report = match &model {
        OpenedModel::Loaded(embedder) => {
            let bar = super::progress::progress_bar(
                args.quiet,
                calibration.texts.len() as u64,
                "{spinner} analyzing {pos}/{len} texts [{elapsed_precise}<{eta_precise}]",
            );
            let report = measure_importance_at(
                embedder,
                &calibration.texts,
                batch_size,
                positions,
                &mut |d| bar.set_position(d as u64),
            )?;
            bar.finish_and_clear();
            report
        }
        OpenedModel::Streamed(stream) => {
            let bar = super::progress::progress_bar(
                args.quiet,
                stream.shape().layers.len() as u64,
                "{spinner} analyzing layer {pos}/{len} [{elapsed_precise}<{eta_precise}]",
            );
            let report = measure_importance_streamed_at(
                stream,
                &calibration.texts,
                batch_size,
                positions,
                &mut |d| bar.set_position(d as u64),
            )?;
            bar.finish_and_clear();
            report
        }
    };
    let seconds = start.elapsed().as_secs_f64();

    let name = args
        .model
        .model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let title = format!("Sub-layer importance of {name}");
    // The speed is per token run through the model: every calibration token,
    // whichever positions the importance averages over.
    let tokens_run = match positions {
        MeasuredPositions::AllTokens => report.tokens,
        MeasuredPositions::ReadBy(_) => calibration.tokens,
    };
    let json = serde_json::json!({
        "model": args.model.model,
        "calibration": { "source": calibration.source, "texts": report.texts, "tokens": report.tokens, "seed": budget.seed, "pooled_positions": report.pooled_positions, "tokens_run": tokens_run },
        "seconds": seconds,
        "seconds_per_1000_tokens": seconds * 1000.0 / tokens_run as f64,
        "layers": report.layers,
        "mlps_least_important_first": report.mlps_by_importance().iter().map(|(l, _)| *l).collect::<Vec<_>>(),
    });
    let write = |file: &str, body: &[u8]| write_bytes_atomically(&args.out.join(file), body);
    write(
        "importance.json",
        format!("{}\n", serde_json::to_string_pretty(&json)?).as_bytes(),
    )?;
    write("importance.md", report.markdown(&title).as_bytes())?;
    write("importance.svg", report.svg(&title).as_bytes())?;
    print!("{}", report.markdown(&title));
    println!(
        "\n{:.1}s for {} texts, {} tokens ({:.3}s per 1,000 tokens), importance over {} positions; wrote {}/importance.{{json,md,svg}}",
        seconds,
        report.texts,
        tokens_run,
        seconds * 1000.0 / tokens_run as f64,
        report.tokens,
        args.out.display()
    );
    crate::peak_memory::report("analyze");
    Ok(())
}
