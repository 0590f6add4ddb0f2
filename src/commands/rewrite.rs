//! `effir rewrite`: slim an existing ONNX export of a model (Optimum,
//! sentence-transformers, torch.onnx) for its pruned or fine-tuned version,
//! keeping the graph's interface, then check the result against the model
//! in candle before keeping it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use effir_onnx::providers::ProviderSettings;
use effir_onnx::quantize::MatmulPrecision;
use effir_onnx::rewrite::{stage_rewrite, RewriteSmoothing};
use effir_onnx::validate::compare_embeddings;
use effir_onnx::{GraphLocation, OnnxEncoder};
use effir_pipeline::io::model_files::{copy_model_files, is_backbone_weights};
use effir_pipeline::{Embedder, LoadOptions, TextEmbedder};

use super::export::{
    calibration_set, matmul_precision, CalibrationArgs, Int8KernelArg, PrecisionArg,
};

#[derive(Debug, Args)]
pub struct RewriteArgs {
    /// The existing export (.onnx file).
    #[arg(long)]
    pub onnx: PathBuf,
    /// The pruned or fine-tuned model directory whose weights the graph gets.
    #[arg(long)]
    pub model: PathBuf,
    /// The model the export was made from [default: the source_model records of --model].
    #[arg(long)]
    pub original: Option<PathBuf>,
    /// Output directory (must not exist): the graph under its original file name, plus the model's tokenizer and configs.
    #[arg(long)]
    pub out: PathBuf,
    /// Skip the parity check of the result against the model in candle.
    #[arg(long)]
    pub no_check: bool,
    /// Arithmetic of the transformer's projections: fp32 (as the export
    /// has it) or int8 (dynamic quantization, standard operators).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// The ONNX Runtime integer kernel of --precision int8 [default: auto].
    #[arg(long, value_enum)]
    pub int8_kernel: Option<Int8KernelArg>,
    /// int8: smooth each product's input channels as `effir export
    /// --int8-smoothing` does (strength in (0, 1]), measured on --calib-data.
    #[arg(long, value_name = "ALPHA")]
    pub int8_smoothing: Option<f32>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// Lowest cosine to the model in candle a rewritten graph must reach: the
/// float graph computes the same model, an int8 one within validate's
/// int8 parity gate.
fn required_cosine(precision: MatmulPrecision) -> f64 {
    match precision {
        MatmulPrecision::Float32 => 0.9999,
        MatmulPrecision::Int8(_) | MatmulPrecision::Int8Qdq => 0.99,
        MatmulPrecision::Float16 => 0.9995,
    }
}

const CHECK_TEXTS: [&str; 6] = [
    "What is dense retrieval?",
    "Pruned MLP sub-layers keep attention intact in retrievers.",
    "hello world",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "0-dimensional biomaterials show inductive properties.",
    "Numbers 12 345 and symbols % & $.",
];

pub fn run(args: RewriteArgs) -> anyhow::Result<()> {
    let precision = matmul_precision(args.precision, args.int8_kernel.is_some(), args.int8_kernel)?;
    let calibration = match args.int8_smoothing {
        Some(_) => {
            if precision.int8_kernel().is_none() {
                bail!("--int8-smoothing applies to --precision int8");
            }
            Some(calibration_set(
                &args.model,
                args.calibration.calib.as_deref(),
                args.calibration.calib_data.as_deref(),
                args.calibration.calib_tokens,
                "--int8-smoothing",
            )?)
        }
        None => {
            let c = &args.calibration;
            if c.calib.is_some() || c.calib_data.is_some() || c.calib_tokens.is_some() {
                bail!("--calib, --calib-data and --calib-tokens apply to --int8-smoothing");
            }
            None
        }
    };
    let smoothing = args
        .int8_smoothing
        .zip(calibration.as_ref())
        .map(|(alpha, calibration)| RewriteSmoothing { alpha, calibration });
    // The graph, the model files and the parity check all happen in a
    // staging directory that becomes `--out` only when they succeed.
    let staged = stage_rewrite(
        &args.onnx,
        &args.model,
        args.original.as_deref(),
        &args.out,
        precision,
        smoothing,
    )
    .with_context(|| format!("rewriting {}", args.onnx.display()))?;
    let summary = &staged.summary;
    copy_model_files(&args.model, staged.dir.path(), &|name| {
        is_backbone_weights(name)
            || name.ends_with(".onnx")
            || name.ends_with(".onnx_data")
            || name == "onnx"
    })?;
    if !args.no_check {
        let check = || -> anyhow::Result<(f64, f64)> {
            let location = GraphLocation::resolve(&summary.graph)?;
            let onnx = OnnxEncoder::load(
                location,
                &LoadOptions::default(),
                &ProviderSettings::default(),
            )?;
            let candle = Embedder::load(&args.model, &LoadOptions::default())?;
            let a = onnx.embed_texts(&CHECK_TEXTS, "", 3, &mut |_| {})?;
            let b = candle.embed_texts(&CHECK_TEXTS, "", 3, &mut |_| {})?;
            let (min, _, diff) = compare_embeddings(&a, &b)?;
            Ok((min, diff))
        };
        let (min, diff) = check()?;
        if min < required_cosine(precision) {
            bail!(
                "the rewritten graph does not compute {} (min cosine {min:.6}, max |diff| {diff:.2e}); nothing written",
                args.model.display()
            );
        }
        println!(
            "parity with {} in candle: min cosine {min:.7}, max |diff| {diff:.2e}",
            args.model.display()
        );
    }
    let summary = staged.publish(&args.out)?;
    let arithmetic = match summary.int8_kernel {
        Some(kernel) => format!(
            "; {} projection products in int8 ({}{})",
            summary.quantized_products,
            kernel.name(),
            summary
                .int8_smoothing
                .as_ref()
                .map_or(String::new(), |s| format!(
                    ", smoothed, strength {}",
                    s.alpha
                ))
        ),
        None => String::new(),
    };
    println!(
        "wrote {}: {} weights matched by value, {} replaced; MLPs dropped {:?}, narrowed {:?}{arithmetic}; {} -> {} nodes, {:.1} -> {:.1} MB",
        summary.graph.display(),
        summary.matched_weights,
        summary.replaced_weights,
        summary.dropped_mlps,
        summary.narrowed_mlps,
        summary.nodes_before,
        summary.nodes_after,
        summary.bytes_before as f64 / 1e6,
        summary.bytes_after as f64 / 1e6
    );
    Ok(())
}
