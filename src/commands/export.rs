//! `effir export`: a model directory (unpruned, pruned or fine-tuned) to an
//! ONNX serving directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use effir_onnx::emit::{EmitOptions, Profile, DEFAULT_OPSET};
use effir_onnx::export::{export, ExportOptions, ExternalData, Layout, Target};
use effir_onnx::graph::WeightStorage;
use effir_onnx::quantize::{Int8Kernel, MatmulPrecision};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileArg {
    /// input_ids, attention_mask (+ token_type_ids) -> last_hidden_state (Optimum, Vespa, fastembed).
    Optimum,
    /// Adds sentence_embedding: pooling, Dense and Normalize inside the graph (text-embeddings-inference).
    SentenceTransformers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetArg {
    Any,
    /// Emit only operators TensorRT's ONNX parser supports (checked; fails otherwise).
    Tensorrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutArg {
    /// OUT/model.onnx
    Flat,
    /// OUT/onnx/model.onnx (Hugging Face Hub layout)
    OnnxSubdir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionArg {
    /// float32 arithmetic.
    Fp32,
    /// Dynamically quantized int8 linear layers (CPU): int8 weights per output channel.
    Int8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Int8KernelArg {
    /// uint8 activations x int8 weights: fastest; can saturate on x86 without VNNI.
    U8s8,
    /// uint8 x uint8: no saturation, slower.
    U8u8,
    /// uint8 x 7-bit int8 weights: the fast kernel with headroom.
    ReduceRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExternalDataArg {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model directory (Hugging Face / sentence-transformers layout, pruned or not).
    #[arg(long, env = "EFFIR_MODEL")]
    pub model: PathBuf,
    /// Output directory (must not exist, unless --overwrite replaces an earlier export).
    #[arg(long)]
    pub out: PathBuf,
    /// Stage config (YAML); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface profile [default: optimum].
    #[arg(long, value_enum)]
    pub profile: Option<ProfileArg>,
    /// ONNX opset, 17 to 21 [default: 17].
    #[arg(long)]
    pub opset: Option<i64>,
    /// Store weight matrices as float16 (half the size; computed in float32).
    #[arg(long)]
    pub fp16: bool,
    /// Arithmetic of the transformer's linear layers [default: fp32]; the
    /// embedding tables and the pooling/Dense head stay float32.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// The ONNX Runtime integer kernel of --precision int8 [default: u8s8].
    #[arg(long, value_enum)]
    pub int8_kernel: Option<Int8KernelArg>,
    /// Execution provider the graph must parse under [default: any].
    #[arg(long, value_enum)]
    pub target: Option<TargetArg>,
    /// Where model.onnx goes [default: flat].
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
    /// Weights in model.onnx_data [default: auto, above 1 GiB].
    #[arg(long, value_enum)]
    pub external_data: Option<ExternalDataArg>,
    /// Replace an earlier export in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// `configs/export.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub profile: Option<ProfileArg>,
    pub opset: Option<i64>,
    pub fp16: Option<bool>,
    pub precision: Option<PrecisionArg>,
    pub int8_kernel: Option<Int8KernelArg>,
    pub target: Option<TargetArg>,
    pub layout: Option<LayoutArg>,
    pub external_data: Option<ExternalDataArg>,
}

/// The matrix-product arithmetic `--precision` and `--int8-kernel` ask for
/// (`kernel_flag`: an --int8-kernel flag was given, which needs int8).
pub(crate) fn matmul_precision(
    precision: Option<PrecisionArg>,
    kernel_flag: bool,
    kernel: Option<Int8KernelArg>,
) -> anyhow::Result<MatmulPrecision> {
    if kernel_flag && precision != Some(PrecisionArg::Int8) {
        anyhow::bail!("--int8-kernel applies to --precision int8 only");
    }
    Ok(match precision {
        None | Some(PrecisionArg::Fp32) => MatmulPrecision::Float32,
        Some(PrecisionArg::Int8) => MatmulPrecision::Int8(match kernel {
            None | Some(Int8KernelArg::U8s8) => Int8Kernel::U8s8,
            Some(Int8KernelArg::U8u8) => Int8Kernel::U8u8,
            Some(Int8KernelArg::ReduceRange) => Int8Kernel::ReduceRange,
        }),
    })
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let config: ExportConfig = crate::stage_config::load(args.config.as_deref())?;
    // Flags override the config file; an --int8-kernel flag needs int8.
    let precision = matmul_precision(
        args.precision.or(config.precision),
        args.int8_kernel.is_some(),
        args.int8_kernel.or(config.int8_kernel),
    )?;
    let options = ExportOptions {
        emit: EmitOptions {
            profile: match args
                .profile
                .or(config.profile)
                .unwrap_or(ProfileArg::Optimum)
            {
                ProfileArg::Optimum => Profile::Optimum,
                ProfileArg::SentenceTransformers => Profile::SentenceTransformers,
            },
            opset: args.opset.or(config.opset).unwrap_or(DEFAULT_OPSET),
            storage: if args.fp16 || config.fp16.unwrap_or(false) {
                WeightStorage::Float16
            } else {
                WeightStorage::Float32
            },
            precision,
        },
        layout: match args.layout.or(config.layout).unwrap_or(LayoutArg::Flat) {
            LayoutArg::Flat => Layout::Flat,
            LayoutArg::OnnxSubdir => Layout::OnnxSubdir,
        },
        external_data: match args
            .external_data
            .or(config.external_data)
            .unwrap_or(ExternalDataArg::Auto)
        {
            ExternalDataArg::Auto => ExternalData::Auto,
            ExternalDataArg::Always => ExternalData::Always,
            ExternalDataArg::Never => ExternalData::Never,
        },
        target: match args.target.or(config.target).unwrap_or(TargetArg::Any) {
            TargetArg::Any => Target::Any,
            TargetArg::Tensorrt => Target::TensorRt,
        },
        overwrite: args.overwrite,
    };
    let summary = export(&args.model, &args.out, &options)
        .with_context(|| format!("exporting {}", args.model.display()))?;
    println!(
        "wrote {} ({} profile, opset {}, {} weights, {}{}{}): {:.1} MB, {} nodes",
        summary.graph.display(),
        summary.profile,
        summary.opset,
        summary.weights,
        summary.precision,
        summary
            .int8_kernel
            .map_or(String::new(), |k| format!(" {}", k.name())),
        if summary.external_data {
            ", external data"
        } else {
            ""
        },
        (summary.graph_bytes as f64
            + if summary.external_data {
                summary.initializer_bytes as f64
            } else {
                0.0
            })
            / 1e6,
        summary.nodes
    );
    println!("  inputs  {}", summary.inputs.join(", "));
    println!("  outputs {}", summary.outputs.join(", "));
    if summary.int8_kernel == Some(Int8Kernel::U8s8) && summary.cpu_features.u8s8_may_saturate() {
        tracing::warn!(
            "this CPU has no VNNI: ONNX Runtime's u8s8 int8 products can saturate here; \
             validate the graph, or export with --int8-kernel u8u8 or reduce-range"
        );
    }
    Ok(())
}
