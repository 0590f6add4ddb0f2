//! `effir export`: a model directory in, a serving directory out —
//! `model.onnx` (or `onnx/model.onnx`) with the tokenizer, `config.json`
//! and sentence-transformers files beside it. The directory appears whole
//! or not at all.

use std::path::{Path, PathBuf};

use effir_pipeline::io::atomic_file::StagedDir;
use effir_pipeline::io::model_files::{copy_model_files, is_backbone_weights};
use serde::Serialize;

use crate::cpu_features::CpuFeatures;
use crate::emit::{emit_model, EmitOptions};
use crate::error::{Error, Result};
use crate::graph_file::{initializer_bytes, write_model, GraphFile, EXTERNAL_DATA_THRESHOLD};
use crate::quantize::{Int8Kernel, MatmulPrecision};
use crate::tensorrt::TensorRtSupport;

/// Where the graph goes in the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `DIR/model.onnx`.
    Flat,
    /// `DIR/onnx/model.onnx` (the Hugging Face Hub layout that
    /// text-embeddings-inference and transformers.js read).
    OnnxSubdir,
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
}

/// What was written, also saved as `effir_export.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
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
    /// `fp32` or `int8`: the arithmetic of the transformer's linear layers.
    pub precision: &'static str,
    pub int8_kernel: Option<Int8Kernel>,
    /// The CPU the graph was exported on.
    pub cpu_features: CpuFeatures,
}

/// The file recording an export.
pub const SUMMARY_FILE: &str = "effir_export.json";

pub fn export(model_dir: &Path, out: &Path, options: &ExportOptions) -> Result<ExportSummary> {
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
    if options.target == Target::TensorRt && options.emit.precision != MatmulPrecision::Float32 {
        return Err(Error::InvalidArgument(
            "int8 for TensorRT needs a QDQ graph, which effir does not emit yet; \
             export fp32 for TensorRT, or int8 for the CPU"
                .into(),
        ));
    }
    let model = emit_model(model_dir, &options.emit)?;
    let weight_bytes = initializer_bytes(&model);
    let external = match options.external_data {
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

    let staging = StagedDir::beside_existing(out)?;
    copy_model_files(model_dir, staging.path(), &|name| {
        is_backbone_weights(name)
            || name == "onnx"
            || name == SUMMARY_FILE
            || name.ends_with(".onnx")
            || name.ends_with(".onnx_data")
    })?;
    let graph_dir = match options.layout {
        Layout::Flat => staging.path().to_path_buf(),
        Layout::OnnxSubdir => staging.path().join("onnx"),
    };
    std::fs::create_dir_all(&graph_dir).map_err(|e| Error::io(&graph_dir, e))?;
    let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
    write_model(model, &graph_dir, "model.onnx", external)?;

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
    let relative_graph = match options.layout {
        Layout::Flat => PathBuf::from("model.onnx"),
        Layout::OnnxSubdir => PathBuf::from("onnx/model.onnx"),
    };
    let summary = ExportSummary {
        source_model: model_dir.to_path_buf(),
        graph: out.join(&relative_graph),
        profile: options.emit.profile.name(),
        opset: options.emit.opset,
        weights: match options.emit.storage {
            crate::graph::WeightStorage::Float32 => "float32",
            crate::graph::WeightStorage::Float16 => "float16",
        },
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
        cpu_features: CpuFeatures::detect(),
    };
    let summary_path = staging.path().join(SUMMARY_FILE);
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Export(e.to_string()))?;
    std::fs::write(&summary_path, json + "\n").map_err(|e| Error::io(&summary_path, e))?;

    staging.replace(out)?;
    tracing::info!(graph = %summary.graph.display(), bytes = summary.graph_bytes, external, "export written");
    Ok(summary)
}
