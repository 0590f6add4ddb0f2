//! `effir export`: a model directory (unpruned, pruned or fine-tuned) to an
//! ONNX serving directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use effir_onnx::cpu_features::CpuFeatures;
use effir_onnx::emit::{AttentionMask, EmitOptions, Profile, DEFAULT_OPSET};
use effir_onnx::export::{export, Calibration, ExportOptions, ExternalData, Layout, Target};
use effir_onnx::graph::WeightStorage;
use effir_onnx::half_precision::RangeCheck;
use effir_onnx::quantize::{Int8Kernel, MatmulPrecision};
use effir_onnx::triton::TritonOptions;
use effir_pipeline::data::calibration::{CalibrationBudget, CalibrationSet};
use effir_pipeline::{EncoderSetup, LoadOptions, Prompt};
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
    /// A Triton model repository: OUT/NAME/1/model.onnx and OUT/NAME/config.pbtxt (needs --name)
    Triton,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionArg {
    /// float32 arithmetic.
    Fp32,
    /// int8 linear layers: dynamically quantized for the CPU; with --target tensorrt, static QDQ calibrated on --calib-data.
    Int8,
    /// float16 linear layers (GPU), range-checked on --calib-data; norms, softmax and the residual stream stay float32.
    Fp16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Int8KernelArg {
    /// u8s8 where this CPU's int8 products cannot saturate (VNNI, or not
    /// x86), reduce-range where they can: the fast kernel that is safe on
    /// the CPU that exports.
    Auto,
    /// uint8 activations x int8 weights: fastest; can saturate on x86 without VNNI.
    U8s8,
    /// uint8 x uint8: no saturation, slower.
    U8u8,
    /// uint8 x 7-bit int8 weights: the fast kernel with headroom.
    ReduceRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionMaskArg {
    /// scores + mask: the form TensorRT's attention fusion and the fp16 and QDQ conversions expect.
    Added,
    /// The padding mask folded into the score product: one (B, H, T, T) pass fewer per layer (BERT; fp32 and dynamic int8).
    Folded,
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
    /// Store weight matrices as bfloat16 (a bf16 checkpoint's own values;
    /// half the size; computed in float32).
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    /// Arithmetic of the transformer's linear layers [default: fp32]; the
    /// embedding tables and the pooling/Dense head stay float32.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// The ONNX Runtime integer kernel of --precision int8 [default: auto].
    #[arg(long, value_enum)]
    pub int8_kernel: Option<Int8KernelArg>,
    /// Dynamic int8: divide each product's input channels by SmoothQuant
    /// factors measured on --calib-data (strength in (0, 1]; 0.75 is a good
    /// start), folding them into the weights. Off by default.
    #[arg(long, value_name = "ALPHA")]
    pub int8_smoothing: Option<f32>,
    /// How a BERT graph's padding mask reaches the attention scores
    /// [default: folded for fp32 and dynamic int8, added for fp16, QDQ int8
    /// and --target tensorrt].
    #[arg(long, value_enum)]
    pub attention_mask: Option<AttentionMaskArg>,
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
    /// The model's name in a Triton repository (--layout triton).
    #[arg(long)]
    pub name: Option<String>,
    /// Triton's max_batch_size (--layout triton) [default: 32].
    #[arg(long)]
    pub max_batch_size: Option<u32>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// fp16: a product stays float16 only if its largest calibration value times this fits float16 [default: 4].
    #[arg(long)]
    pub fp16_headroom: Option<f32>,
    /// fp16: refuse the export when a product fails the range check, instead of keeping it float32.
    #[arg(long)]
    pub strict: bool,
    /// int8 for TensorRT: quantize the output projections (attention output, MLP down) too; by default they stay float.
    #[arg(long)]
    pub qdq_all_products: bool,
    /// Read the model one tensor at a time and write each weight into
    /// model.onnx_data as it is made (models larger than memory; fp32 and
    /// dynamic int8 products).
    #[arg(long)]
    pub stream: bool,
}

/// The text that fp16's range check, QDQ int8's scales and int8 smoothing
/// measure the graph on (`export`, `rewrite`).
#[derive(Debug, Args)]
pub struct CalibrationArgs {
    /// Calibration text the graph is measured on before conversion (fp16's range check, QDQ int8's scales, int8 smoothing): a BEIR dataset directory.
    #[arg(long)]
    pub calib_data: Option<PathBuf>,
    /// Calibration text from a file (JSONL with `text`, or lines) instead of --calib-data.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Token budget of the calibration text [default: 16384].
    #[arg(long)]
    pub calib_tokens: Option<usize>,
}

/// `configs/export.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub profile: Option<ProfileArg>,
    pub opset: Option<i64>,
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    pub precision: Option<PrecisionArg>,
    pub int8_kernel: Option<Int8KernelArg>,
    pub int8_smoothing: Option<f32>,
    pub attention_mask: Option<AttentionMaskArg>,
    pub target: Option<TargetArg>,
    pub layout: Option<LayoutArg>,
    pub external_data: Option<ExternalDataArg>,
    pub name: Option<String>,
    pub max_batch_size: Option<u32>,
    pub calib_data: Option<PathBuf>,
    pub calib_tokens: Option<usize>,
    pub fp16_headroom: Option<f32>,
    pub strict: Option<bool>,
    pub qdq_all_products: Option<bool>,
}

/// The calibration text of `--calib FILE` or `--calib-data DIR` (one of
/// them), cut to `tokens` [default: 16,384] as `model` tokenizes it; `needs`
/// names the flag that asked for it, for the error when neither is given.
pub(crate) fn calibration_set(
    model: &Path,
    file: Option<&Path>,
    dataset: Option<&Path>,
    tokens: Option<usize>,
    needs: &str,
) -> anyhow::Result<CalibrationSet> {
    let tokens = tokens.unwrap_or(16_384);
    let setup = EncoderSetup::load(model, &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    Ok(match (file, dataset) {
        (Some(file), None) => CalibrationSet::from_file(&setup, file, &Prompt::None, tokens)?,
        (None, Some(dir)) => CalibrationSet::from_dataset(
            &setup,
            dir,
            &CalibrationBudget {
                max_tokens: tokens,
                ..CalibrationBudget::default()
            },
        )?,
        (Some(_), Some(_)) => bail!("give calibration text with --calib or --calib-data, not both"),
        (None, None) => bail!(
            "{needs} needs calibration text: --calib-data DIR (a BEIR dataset) or --calib FILE"
        ),
    })
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
        Some(PrecisionArg::Fp16) => MatmulPrecision::Float16,
        Some(PrecisionArg::Int8) => MatmulPrecision::Int8(match kernel {
            // The summary line prints the kernel; effir_export.json records
            // the CPU it was chosen for.
            None | Some(Int8KernelArg::Auto) => Int8Kernel::for_cpu(&CpuFeatures::detect()),
            Some(Int8KernelArg::U8s8) => Int8Kernel::U8s8,
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
    let target = args.target.or(config.target).unwrap_or(TargetArg::Any);
    // int8 for TensorRT is the static QDQ form; the kernels are ONNX Runtime CPU's.
    let precision = match (target, precision) {
        (TargetArg::Tensorrt, MatmulPrecision::Int8(_)) => {
            if args.int8_kernel.or(config.int8_kernel).is_some() {
                bail!("--int8-kernel chooses ONNX Runtime's CPU kernel; int8 for --target tensorrt is QDQ, which has none");
            }
            MatmulPrecision::Int8Qdq
        }
        (_, p) => p,
    };
    let layout = args.layout.or(config.layout).unwrap_or(LayoutArg::Flat);
    let name = args.name.clone().or(config.name.clone());
    let max_batch_size = args.max_batch_size.or(config.max_batch_size);
    let triton = match (layout, name) {
        (LayoutArg::Triton, Some(name)) => Some(TritonOptions {
            name,
            max_batch_size: max_batch_size.unwrap_or(32),
        }),
        (LayoutArg::Triton, None) => {
            bail!("--layout triton needs --name, the model's name in the repository")
        }
        (_, Some(_)) => bail!("--name applies to --layout triton"),
        (_, None) if max_batch_size.is_some() => {
            bail!("--max-batch-size applies to --layout triton")
        }
        (_, None) => None,
    };
    let int8_smoothing = args.int8_smoothing.or(config.int8_smoothing);
    if int8_smoothing.is_some() && precision.int8_kernel().is_none() {
        bail!("--int8-smoothing applies to dynamic int8 (--precision int8, not for --target tensorrt)");
    }
    let calib_data = args
        .calibration
        .calib_data
        .clone()
        .or(config.calib_data.clone());
    let calibration = if precision.needs_calibration() || int8_smoothing.is_some() {
        let needs = if int8_smoothing.is_some() {
            "--int8-smoothing".to_string()
        } else {
            format!("--precision {}", precision.name())
        };
        let set = calibration_set(
            &args.model,
            args.calibration.calib.as_deref(),
            calib_data.as_deref(),
            args.calibration.calib_tokens.or(config.calib_tokens),
            &needs,
        )?;
        Some(Calibration {
            set,
            batch_size: 8,
            range_check: RangeCheck {
                headroom: args
                    .fp16_headroom
                    .or(config.fp16_headroom)
                    .unwrap_or(RangeCheck::default().headroom),
                strict: args.strict || config.strict.unwrap_or(false),
            },
            qdq_all_products: args.qdq_all_products || config.qdq_all_products.unwrap_or(false),
        })
    } else {
        if args.calibration.calib.is_some()
            || calib_data.is_some()
            || args.calibration.calib_tokens.is_some()
            || args.strict
            || args.fp16_headroom.is_some()
            || args.qdq_all_products
        {
            bail!("--calib, --calib-data, --calib-tokens, --strict, --fp16-headroom and --qdq-all-products apply to --precision fp16, to int8 for --target tensorrt and to --int8-smoothing");
        }
        None
    };
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
            storage: match (
                args.fp16 || config.fp16.unwrap_or(false),
                args.bf16 || config.bf16.unwrap_or(false),
            ) {
                (true, true) => {
                    bail!("--fp16 and --bf16 (or the config's fp16 and bf16) exclude each other")
                }
                (true, false) => WeightStorage::Float16,
                (false, true) => WeightStorage::BFloat16,
                (false, false) => WeightStorage::Float32,
            },
            precision,
            int8_smoothing,
            attention_mask: args
                .attention_mask
                .or(config.attention_mask)
                .map(|mask| match mask {
                    AttentionMaskArg::Added => AttentionMask::Added,
                    AttentionMaskArg::Folded => AttentionMask::Folded,
                }),
        },
        layout: match layout {
            LayoutArg::Flat => Layout::Flat,
            LayoutArg::OnnxSubdir => Layout::OnnxSubdir,
            LayoutArg::Triton => Layout::Triton,
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
        target: match target {
            TargetArg::Any => Target::Any,
            TargetArg::Tensorrt => Target::TensorRt,
        },
        overwrite: args.overwrite,
        stream: args.stream,
        calibration,
        triton,
    };
    let summary = export(&args.model, &args.out, &options)
        .with_context(|| format!("exporting {}", args.model.display()))?;
    // The summary's paths are relative to the model's directory.
    let triton_dir = options.triton.as_ref().map_or("", |t| t.name.as_str());
    println!(
        "wrote {} ({} profile, opset {}, {} weights, {}{}{}): {:.1} MB, {} nodes",
        args.out.join(triton_dir).join(&summary.graph).display(),
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
        summary.megabytes(),
        summary.nodes
    );
    if let Some(c) = &summary.calibration {
        println!(
            "  calibrated on {} texts ({} tokens) of {}",
            c.texts, c.tokens, c.source
        );
        if let Some(f) = &c.float16 {
            let peak = f
                .products
                .iter()
                .map(|p| p.input_max_abs.max(p.output_max_abs))
                .fold(0f32, f32::max);
            println!(
                "  float16 products: {} of {} (largest value {peak:.0}); kept float32: {}",
                f.products.len() - f.kept_float32.len(),
                f.products.len(),
                if f.kept_float32.is_empty() {
                    "none".to_string()
                } else {
                    f.kept_float32.join(", ")
                }
            );
        }
        if let Some(smoothing) = &c.smoothing {
            let (before, after) = smoothing.products.iter().fold((0f32, 0f32), |(b, a), p| {
                (b.max(p.input_max_abs), a.max(p.smoothed_input_max_abs))
            });
            println!(
                "  int8 inputs smoothed (strength {}): largest input value {before:.1} -> {after:.2}",
                smoothing.alpha
            );
        }
    }
    println!("  inputs  {}", summary.inputs.join(", "));
    println!("  outputs {}", summary.outputs.join(", "));
    if summary.int8_kernel == Some(Int8Kernel::U8s8) && summary.cpu_features.u8s8_may_saturate() {
        tracing::warn!(
            "this CPU has no VNNI: ONNX Runtime's u8s8 int8 products can saturate here; \
             validate the graph, or export with --int8-kernel u8u8 or reduce-range"
        );
    }
    crate::peak_memory::report("export");
    Ok(())
}
