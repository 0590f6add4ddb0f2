//! `effir export`: a model directory in, a serving directory out —
//! `model.onnx` (or `onnx/model.onnx`) with the tokenizer, `config.json`
//! and sentence-transformers files beside it. The directory appears whole
//! or not at all.

use std::path::{Path, PathBuf};

use candle_onnx::onnx::ModelProto;
use effir_pipeline::data::calibration::CalibrationSet;
use effir_pipeline::io::atomic_file::StagedDir;
use effir_pipeline::io::model_files::{copy_model_files, is_backbone_weights};
use effir_pipeline::io::recorded_path::relative_to;
use effir_pipeline::model::text_encoder::ServingTokenizer;
use effir_pipeline::{EncoderSetup, LoadOptions};
use serde::Serialize;

use crate::activation_ranges::{self, Statistic};
use crate::cpu_features::CpuFeatures;
use crate::emit::{
    check_options, emit_model, emit_model_streamed, AttentionMask, EmitOptions, ATTENTION_MASK_KEY,
};
use crate::error::{Error, Result};
use crate::graph_file::{
    initializer_bytes, write_model, ExternalDataFile, GraphFile, EXTERNAL_DATA_THRESHOLD,
};
use crate::half_precision::{self, ProductRange, RangeCheck};
use crate::projection_products::projection_products;
use crate::qdq::{self, ActivationScale};
use crate::quantize::{Int8Kernel, MatmulPrecision};
use crate::smoothing::{self, SmoothingSummary};
use crate::tensorrt::TensorRtSupport;
use crate::triton::{model_config, Placement, TritonOptions};

/// Where the graph goes in the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `DIR/model.onnx`.
    Flat,
    /// `DIR/onnx/model.onnx` (the Hugging Face Hub layout that
    /// text-embeddings-inference and transformers.js read).
    OnnxSubdir,
    /// A Triton model repository: `DIR/NAME/1/model.onnx`,
    /// `DIR/NAME/config.pbtxt`, the model files in `DIR/NAME`
    /// ([`crate::triton`]).
    Triton,
}

impl Layout {
    /// The model's directory relative to the output directory (a Triton
    /// model is one directory of a repository), and the graph's relative to
    /// the model's directory, which holds the model files (tokenizer,
    /// configs, `effir_export.json`).
    fn dirs(self, triton: Option<&TritonOptions>) -> Result<(PathBuf, PathBuf)> {
        Ok(match self {
            Layout::Flat => (PathBuf::new(), PathBuf::new()),
            Layout::OnnxSubdir => (PathBuf::new(), PathBuf::from("onnx")),
            Layout::Triton => {
                let options = triton.ok_or_else(|| {
                    Error::InvalidArgument("the Triton layout needs a model name (--name)".into())
                })?;
                options.validate()?;
                (PathBuf::from(&options.name), PathBuf::from("1"))
            }
        })
    }
}

/// When weights go into a separate `model.onnx_data` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExternalData {
    /// When the weights exceed 1 GiB (protobuf cannot exceed 2 GiB).
    Auto,
    Always,
    Never,
}

/// The execution provider the graph must run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Any ONNX Runtime provider.
    Any,
    /// TensorRT: every operator must be one its ONNX parser supports.
    #[serde(rename = "tensorrt")]
    TensorRt,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub emit: EmitOptions,
    pub layout: Layout,
    pub external_data: ExternalData,
    pub target: Target,
    /// Replace an existing export in the output directory.
    pub overwrite: bool,
    /// Text to measure activation ranges on: required by fp16 (the range
    /// check) and QDQ int8 (the activation scales).
    pub calibration: Option<Calibration>,
    /// The model's name and batch size under [`Layout::Triton`].
    pub triton: Option<TritonOptions>,
    /// Read the model one tensor at a time and write each initializer into
    /// `model.onnx_data` as it is made ([`emit_model_streamed`]): models
    /// larger than memory.
    pub stream: bool,
}

/// Calibration text and how to use it.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub set: CalibrationSet,
    pub batch_size: usize,
    pub range_check: RangeCheck,
    /// QDQ int8: quantize the output projections too (see [`crate::qdq`]).
    pub qdq_all_products: bool,
}

/// What calibration measured and decided, in `effir_export.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationSummary {
    pub source: String,
    pub texts: usize,
    pub tokens: usize,
    /// fp16: each product's ranges and whether it stayed float32.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float16: Option<Float16Summary>,
    /// QDQ int8: each product's activation scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_scales: Option<Vec<ActivationScale>>,
    /// Smoothed dynamic int8: the strength and each product's factors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoothing: Option<SmoothingSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Float16Summary {
    pub range_check: RangeCheck,
    /// Modules the range check kept in float32.
    pub kept_float32: Vec<String>,
    pub products: Vec<ProductRange>,
}

/// What was written, also saved as `effir_export.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// Relative to the export directory, as `graph` is.
    pub source_model: PathBuf,
    pub graph: PathBuf,
    pub profile: &'static str,
    pub opset: i64,
    pub weights: &'static str,
    pub external_data: bool,
    pub graph_bytes: u64,
    pub initializer_bytes: usize,
    pub nodes: usize,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub ops: std::collections::BTreeMap<String, usize>,
    pub layout: Layout,
    pub target: Target,
    /// `fp32`, `int8` or `fp16`: the arithmetic of the transformer's linear layers.
    pub precision: &'static str,
    pub int8_kernel: Option<Int8Kernel>,
    /// `dynamic` (CPU) or `qdq` (TensorRT), for int8.
    pub int8_form: Option<&'static str>,
    /// How the padding mask reaches the attention scores (BERT graphs fold
    /// it into the score product unless asked not to).
    pub attention_mask: AttentionMask,
    /// fp16 and QDQ int8: the calibration behind the conversion.
    pub calibration: Option<CalibrationSummary>,
    /// The CPU the graph was exported on.
    pub cpu_features: CpuFeatures,
    /// How the written `tokenizer.json` encodes (effir's encoding settings,
    /// not the source file's).
    pub tokenizer: ServingTokenizer,
}

impl ExportSummary {
    /// The graph's size on disk in MB, its external weights included.
    pub fn megabytes(&self) -> f64 {
        let external = if self.external_data {
            self.initializer_bytes as f64
        } else {
            0.0
        };
        (self.graph_bytes as f64 + external) / 1e6
    }
}

/// The file recording an export.
pub const SUMMARY_FILE: &str = "effir_export.json";

/// The graph metadata naming the model a graph computes, relative to the
/// graph's directory (`validate` compares the graph with it).
pub const SOURCE_MODEL_KEY: &str = "effir.source_model";

/// Sets (or adds) the graph metadata entry `key`.
pub fn set_metadata(model: &mut ModelProto, key: &str, value: &str) {
    match model.metadata_props.iter_mut().find(|p| p.key == key) {
        Some(entry) => entry.value = value.to_string(),
        None => model
            .metadata_props
            .push(candle_onnx::onnx::StringStringEntryProto {
                key: key.to_string(),
                value: value.to_string(),
            }),
    }
}

pub fn export(model_dir: &Path, out: &Path, options: &ExportOptions) -> Result<ExportSummary> {
    if options.triton.is_some() && options.layout != Layout::Triton {
        return Err(Error::InvalidArgument(
            "a Triton model name applies to the Triton layout (--layout triton)".into(),
        ));
    }
    let (model_rel, graph_rel) = options.layout.dirs(options.triton.as_ref())?;
    // A Triton model is one directory of a repository that may hold others:
    // that directory (`OUT/NAME`) is what is written, checked and replaced.
    let model_out = out.join(&model_rel);
    let out = model_out.as_path();
    if out.exists() {
        let previous = out.join(SUMMARY_FILE).is_file();
        if !(options.overwrite && previous) {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists; choose a new output directory{}",
                out.display(),
                if previous {
                    " or pass --overwrite to replace this export"
                } else {
                    ""
                }
            )));
        }
    }
    let precision = options.emit.precision;
    if options.target == Target::TensorRt && matches!(precision, MatmulPrecision::Int8(_)) {
        return Err(Error::InvalidArgument(
            "dynamic int8 (DynamicQuantizeLinear, MatMulInteger) does not parse in TensorRT; \
             int8 for TensorRT is the QDQ form (`--target tensorrt --precision int8`)"
                .into(),
        ));
    }
    // TensorRT's attention fusion matches the added mask.
    let mut emit_options = options.emit.clone();
    if options.target == Target::TensorRt {
        if emit_options.attention_mask == Some(AttentionMask::Folded) {
            return Err(Error::InvalidArgument(
                "--attention-mask folded is for ONNX Runtime's CPU provider; TensorRT's attention \
                 fusion matches the added mask (--attention-mask added, the default with \
                 --target tensorrt)"
                    .into(),
            ));
        }
        emit_options.attention_mask = Some(AttentionMask::Added);
    }
    // The emission's own checks, before calibration asks for text.
    check_options(&emit_options)?;
    let smoothing = options.emit.int8_smoothing;
    // What measures the graph on calibration text first, if anything does.
    let calibrated = match smoothing {
        Some(_) => Some("smoothed int8"),
        None => precision.needs_calibration().then(|| precision.name()),
    };
    if let Some(what) = calibrated {
        if options.calibration.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{what} needs calibration text (--calib-data DIR or --calib FILE): {}",
                if precision == MatmulPrecision::Float16 {
                    "the range check runs it through the model"
                } else if smoothing.is_some() {
                    "each input channel's range is measured on it"
                } else {
                    "the activation scales are measured on it"
                }
            )));
        }
        if options.emit.storage != crate::graph::WeightStorage::Float32 {
            return Err(Error::InvalidArgument(format!(
                "--fp16/--bf16 (half-precision weight storage) does not combine with {} products; drop it",
                precision.name()
            )));
        }
    }
    if options.stream {
        if let Some(what) = calibrated {
            return Err(Error::InvalidArgument(format!(
                "{what} products are calibrated on the whole model in memory; they do not combine \
                 with --stream (fp32 and unsmoothed dynamic int8 do)"
            )));
        }
        if options.external_data == ExternalData::Never {
            return Err(Error::InvalidArgument(
                "a streamed export writes its weights into model.onnx_data as it goes; \
                 --external-data never contradicts --stream"
                    .into(),
            ));
        }
    }
    // A streamed graph's weights go straight into the staged directory;
    // otherwise the graph is emitted first and staged once it exists.
    let (staging, mut model, streamed_bytes) = if options.stream {
        let staging = StagedDir::beside_existing(out)?;
        let data =
            ExternalDataFile::create(&staged_graph_dir(&staging, &graph_rel)?, "model.onnx")?;
        let (model, bytes) = emit_model_streamed(model_dir, &emit_options, data)?;
        (staging, model, Some(bytes))
    } else {
        let model = emit_model(model_dir, &emit_options)?;
        let staging = StagedDir::beside_existing(out)?;
        staged_graph_dir(&staging, &graph_rel)?;
        (staging, model, None)
    };
    let graph_dir = staging.path().join(&graph_rel);
    // Where the graph came from, relative to the graph's directory.
    let graph_dir_final = out.join(&graph_rel);
    set_metadata(
        &mut model,
        SOURCE_MODEL_KEY,
        &relative_to(&graph_dir_final, model_dir).to_string_lossy(),
    );
    let setup = EncoderSetup::load(model_dir, &LoadOptions::default())?;
    let calibration = match &options.calibration {
        Some(c) if calibrated.is_some() => Some(convert_products(
            &mut model,
            &setup,
            options.emit.opset,
            precision,
            smoothing,
            c,
        )?),
        _ => None,
    };
    let weight_bytes = streamed_bytes.unwrap_or_else(|| initializer_bytes(&model));
    let external = match options.external_data {
        _ if streamed_bytes.is_some() => true,
        ExternalData::Always => true,
        ExternalData::Never => {
            if weight_bytes >= 2 * EXTERNAL_DATA_THRESHOLD {
                return Err(Error::Export(format!(
                    "{weight_bytes} bytes of weights exceed protobuf's 2 GiB limit; allow external data"
                )));
            }
            false
        }
        ExternalData::Auto => weight_bytes > EXTERNAL_DATA_THRESHOLD,
    };

    let files_dir = staging.path();
    copy_model_files(model_dir, files_dir, &|name| {
        is_backbone_weights(name)
            || name == "onnx"
            || name == SUMMARY_FILE
            || name.ends_with(".onnx")
            || name.ends_with(".onnx_data")
    })?;
    let tokenizer = setup
        .text
        .save_serving_tokenizer(&files_dir.join("tokenizer.json"))?;
    let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
    // A streamed graph's weights are in model.onnx_data already.
    write_model(
        model,
        &graph_dir,
        "model.onnx",
        external && streamed_bytes.is_none(),
    )?;

    // Read the file back: what is checked is what was written.
    let staged_graph = graph_dir.join("model.onnx");
    let file = GraphFile::read(&staged_graph)?;
    if options.target == Target::TensorRt {
        let support = TensorRtSupport::bundled();
        let findings = support.lint(&file);
        if !findings.is_empty() {
            return Err(Error::Export(format!(
                "the graph would not parse in TensorRT {}:\n  {}",
                support.tensorrt_version,
                findings
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )));
        }
    }
    // Paths in the summary are relative to its own directory.
    let relative_graph = graph_rel.join("model.onnx");
    if let Some(triton) = &options.triton {
        let placement = match (options.target, precision) {
            (Target::TensorRt, MatmulPrecision::Float16) => Placement::TensorRt("FP16"),
            (Target::TensorRt, MatmulPrecision::Int8Qdq) => Placement::TensorRt("INT8"),
            (Target::TensorRt, _) => Placement::TensorRt("FP32"),
            (Target::Any, MatmulPrecision::Float16) => Placement::Gpu,
            (Target::Any, _) => Placement::Cpu,
        };
        let config = model_config(triton, &file.inputs(), &file.outputs(), placement)?;
        let path = files_dir.join("config.pbtxt");
        std::fs::write(&path, config).map_err(|e| Error::io(&path, e))?;
    }
    let summary = ExportSummary {
        source_model: relative_to(out, model_dir),
        graph: relative_graph,
        profile: options.emit.profile.name(),
        opset: options.emit.opset,
        weights: options.emit.storage.name(),
        external_data: external,
        graph_bytes: std::fs::metadata(&staged_graph)
            .map_err(|e| Error::io(&staged_graph, e))?
            .len(),
        initializer_bytes: weight_bytes,
        nodes,
        inputs: file.inputs().into_iter().map(|i| i.name).collect(),
        outputs: file.outputs().into_iter().map(|o| o.name).collect(),
        ops: file.op_counts(),
        layout: options.layout,
        target: options.target,
        precision: options.emit.precision.name(),
        int8_kernel: options.emit.precision.int8_kernel(),
        int8_form: options.emit.precision.int8_form(),
        attention_mask: file
            .metadata(ATTENTION_MASK_KEY)
            .and_then(AttentionMask::from_name)
            .expect("emitted graphs record their attention mask"),
        // The calibration text's path, relative to the summary like the source model's.
        calibration: calibration.map(|c| CalibrationSummary {
            source: relative_to(out, Path::new(&c.source)).display().to_string(),
            ..c
        }),
        cpu_features: CpuFeatures::detect(),
        tokenizer,
    };
    write_card(files_dir, model_dir, out, &summary)?;
    let summary_path = files_dir.join(SUMMARY_FILE);
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Export(e.to_string()))?;
    std::fs::write(&summary_path, json + "\n").map_err(|e| Error::io(&summary_path, e))?;

    staging.replace(out)?;
    tracing::info!(graph = %summary.graph.display(), bytes = summary.graph_bytes, external, "export written");
    Ok(summary)
}

/// Measures the float32 graph's projection products on the calibration
/// text and converts them to `precision` (fp16 or QDQ int8).
fn convert_products(
    model: &mut ModelProto,
    setup: &EncoderSetup,
    opset: i64,
    precision: MatmulPrecision,
    smoothing: Option<f32>,
    calibration: &Calibration,
) -> Result<CalibrationSummary> {
    let graph = model.graph.as_ref().expect("emitted with a graph");
    let products = projection_products(graph, setup.architecture());
    if products.is_empty() {
        return Err(Error::Export(
            "the graph has no projection products to convert".into(),
        ));
    }
    let set = &calibration.set;
    let mut summary = CalibrationSummary {
        source: set.source.clone(),
        texts: set.texts.len(),
        tokens: set.tokens,
        float16: None,
        activation_scales: None,
        smoothing: None,
    };
    if let (Some(alpha), Some(kernel)) = (smoothing, precision.int8_kernel()) {
        summary.smoothing = Some(smoothing::smooth_products(
            model,
            setup,
            opset,
            &products,
            alpha,
            kernel,
            set,
            calibration.batch_size,
        )?);
        return Ok(summary);
    }
    let fp16 = precision == MatmulPrecision::Float16;
    let tensors: Vec<(String, Statistic)> = products
        .iter()
        .flat_map(|p| {
            let output = fp16.then(|| (p.output.clone(), Statistic::Range));
            std::iter::once((p.input.clone(), Statistic::Range)).chain(output)
        })
        .collect();
    let started = std::time::Instant::now();
    let measured = activation_ranges::measure(
        model,
        None,
        &tensors,
        setup,
        &set.texts,
        calibration.batch_size,
        &mut |_| {},
    )?;
    tracing::info!(
        texts = set.texts.len(),
        tokens = set.tokens,
        seconds = started.elapsed().as_secs_f64(),
        "activation ranges measured"
    );
    let graph = model.graph.as_mut().expect("emitted with a graph");
    if fp16 {
        let pairs: Vec<_> = measured.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        let products = half_precision::convert_products(
            graph,
            opset,
            &products,
            &pairs,
            calibration.range_check,
        )?;
        summary.float16 = Some(Float16Summary {
            range_check: calibration.range_check,
            kept_float32: products
                .iter()
                .filter(|p| p.precision == "fp32")
                .map(|p| p.module.clone())
                .collect(),
            products,
        });
    } else {
        summary.activation_scales = Some(qdq::quantize_products(
            graph,
            opset,
            &products,
            &measured,
            calibration.qdq_all_products,
        )?);
    }
    Ok(summary)
}

/// The export's model card: how the model was pruned and recovered (from
/// the records its directory carries) and what the graph computes.
fn write_card(dir: &Path, model_dir: &Path, out: &Path, summary: &ExportSummary) -> Result<()> {
    use effir_pipeline::compress::prune::PruneRecord;
    use effir_pipeline::finetune::FinetuneRecord;
    use effir_pipeline::io::model_card::{command_line, ModelCard};
    let name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut card = ModelCard::new(format!(
        "{name}: ONNX export by effir ({}{})",
        summary.precision,
        summary
            .int8_form
            .map_or(String::new(), |f| format!(", {f}"))
    ));
    if let Some(pruned) = PruneRecord::read(model_dir)? {
        card = card.section("Pruning", pruned.card_section());
    }
    if dir.join("prune_report.md").is_file() {
        card = card.section(
            "Parameters and FLOPs",
            "Before and after pruning: `prune_report.md`.",
        );
    }
    card = card.section(
        "Recovery",
        match FinetuneRecord::read(model_dir)? {
            Some(record) => record.card_section(out),
            None => "None: not fine-tuned.".into(),
        },
    );
    let mut export = format!(
        "- graph: `{}` ({} profile, opset {}, {:.1} MB{}); inputs {}; outputs {}\n- precision: {}{}{}\n- target: {:?}\n- tokenizer.json: truncation at {} tokens, padding per batch ({} side){}\n",
        summary.graph.display(),
        summary.profile,
        summary.opset,
        summary.megabytes(),
        if summary.external_data { ", weights in model.onnx_data" } else { "" },
        summary.inputs.join(", "),
        summary.outputs.join(", "),
        summary.precision,
        summary.int8_kernel.map_or(String::new(), |k| format!(", ONNX Runtime kernel {}", k.name())),
        summary.int8_form.map_or(String::new(), |f| format!(", {f} quantization")),
        summary.target,
        summary.tokenizer.max_length,
        summary.tokenizer.padding_side,
        summary.tokenizer.append_eos.map_or(String::new(), |id| format!(
            "; clients must append token {id} (EOS) when a text does not end with it"
        )),
    );
    if let Some(c) = &summary.calibration {
        export += &format!(
            "- calibrated on {} texts ({} tokens) of `{}`\n",
            c.texts,
            c.tokens,
            effir_pipeline::io::recorded_path::relative_to(out, Path::new(&c.source)).display()
        );
        if let Some(smoothing) = &c.smoothing {
            export += &format!(
                "- int8 inputs smoothed per channel (SmoothQuant, strength {}); \
                 clients need nothing extra: the division is in the graph\n",
                smoothing.alpha
            );
        }
    }
    export += "\nValidate it against its source model with `effir validate`.";
    card.section("ONNX export", export)
        .section("Made with", format!("```sh\n{}\n```", command_line(out)))
        .write(dir, model_dir, out)
        .map_err(Error::from)
}

/// The graph's directory (`graph_rel`) inside the staged export, created.
fn staged_graph_dir(staging: &StagedDir, graph_rel: &Path) -> Result<PathBuf> {
    let dir = staging.path().join(graph_rel);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}
