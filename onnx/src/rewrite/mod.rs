//! `effir rewrite`: slim an existing ONNX export (Optimum,
//! sentence-transformers, `torch.onnx.export`) in place, keeping its exact
//! interface. Weights are found by value, never by name: every float
//! initializer (or `Constant`) is hashed and matched against the original
//! model's tensors, as stored or transposed; ambiguous ones (identical
//! values, such as fresh LayerNorm weights) are resolved by the graph's
//! structure. Each layer's MLP is located from its down projection; a
//! dropped MLP's sub-graph is cut out and its residual stream rewired,
//! narrowed MLPs get the pruned model's matrices, and every weight gets the
//! new model's values. Whatever cannot be matched is refused.
//!
//! The passes, in order: [`external_data`], [`weight_matching`],
//! [`mlp_surgery`], [`weight_replacement`], and with int8 precision
//! [`int8_products`]; [`graph_index`] is how they read the graph.

mod external_data;
mod graph_index;
mod int8_products;
mod mlp_surgery;
mod weight_matching;
mod weight_replacement;

use std::path::{Path, PathBuf};

use candle_onnx::onnx::tensor_proto::DataType;
use effir_pipeline::compress::prune::PruneRecord;
use effir_pipeline::finetune::FinetuneRecord;
use effir_pipeline::model::arch::ModelConfig;
use effir_pipeline::ModelShape;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph_file::{write_model, GraphFile, EXTERNAL_DATA_THRESHOLD};
use crate::quantize::{Int8Kernel, MatmulPrecision};
use crate::smoothing::SmoothingSummary;
use effir_pipeline::data::calibration::CalibrationSet;
use external_data::inline_external_data;
use int8_products::{projection_sites, quantize_projections};
use mlp_surgery::{cut_out_mlps, locate_dropped_mlps};
pub use weight_matching::Orientation;
use weight_matching::{match_weights, Checkpoint};
use weight_replacement::{remove_dead, replace_weights};

/// The first opset with `DynamicQuantizeLinear` and `MatMulInteger`.
const INT8_MIN_OPSET: i64 = 11;

/// What `rewrite` did.
#[derive(Debug, Clone, Serialize)]
pub struct RewriteSummary {
    pub original_graph: PathBuf,
    pub graph: PathBuf,
    pub matched_weights: usize,
    pub replaced_weights: usize,
    pub dropped_mlps: Vec<usize>,
    pub narrowed_mlps: Vec<usize>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// `fp32` or `int8`.
    pub precision: &'static str,
    pub int8_kernel: Option<Int8Kernel>,
    /// Projection `MatMul`s turned into int8 products.
    pub quantized_products: usize,
    /// The smoothing of those products, when asked for.
    pub int8_smoothing: Option<SmoothingSummary>,
}

/// `--int8-smoothing`: the strength and the text its factors are measured on.
#[derive(Debug, Clone, Copy)]
pub struct RewriteSmoothing<'a> {
    pub alpha: f32,
    pub calibration: &'a CalibrationSet,
}

/// The root model a pruned or fine-tuned directory descends from, following
/// the `source_model` records of `effir prune` and `effir finetune`.
pub fn original_model(dir: &Path) -> Option<PathBuf> {
    let mut current = dir.to_path_buf();
    let mut found = None;
    for _ in 0..8 {
        let pruned = PruneRecord::read(&current).ok().flatten();
        let source = match pruned {
            Some(record) => record.source_model,
            None => match FinetuneRecord::read(&current).ok().flatten() {
                Some(record) => record.source_model,
                None => break,
            },
        };
        if !source.join("config.json").is_file() {
            return found;
        }
        found = Some(source.clone());
        current = source;
    }
    found
}

/// Rewrites `graph_path` for the model in `model_dir` into `out` (a
/// directory that must not exist), with the transformer's projections in
/// `precision`.
pub fn rewrite(
    graph_path: &Path,
    model_dir: &Path,
    original_dir: Option<&Path>,
    out: &Path,
    precision: MatmulPrecision,
    smoothing: Option<RewriteSmoothing>,
) -> Result<RewriteSummary> {
    stage_rewrite(
        graph_path,
        model_dir,
        original_dir,
        out,
        precision,
        smoothing,
    )?
    .publish(out)
}

/// A rewritten graph staged beside its output, not yet published.
pub struct StagedRewrite {
    /// The staging directory (add files here before publishing).
    pub dir: effir_pipeline::io::atomic_file::StagedDir,
    /// What was done; its graph is the staged one until published.
    pub summary: RewriteSummary,
}

impl StagedRewrite {
    /// Moves the staged directory to `out`; the summary's graph follows.
    pub fn publish(self, out: &Path) -> Result<RewriteSummary> {
        let Self { dir, mut summary } = self;
        dir.publish(out)?;
        summary.graph = out.join(summary.graph.file_name().unwrap_or_default());
        Ok(summary)
    }
}

/// [`rewrite`], staged beside `out` and not yet published: the summary's
/// graph is the staged one. The caller adds files and checks, then
/// publishes, so `out` appears whole or not at all.
pub fn stage_rewrite(
    graph_path: &Path,
    model_dir: &Path,
    original_dir: Option<&Path>,
    out: &Path,
    precision: MatmulPrecision,
    smoothing: Option<RewriteSmoothing>,
) -> Result<StagedRewrite> {
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{}: already exists; choose a new output directory",
            out.display()
        )));
    }
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let arch = config.architecture();
    let shape = ModelShape::load_or(model_dir, config.described_shape())?;
    let original_dir = match original_dir {
        Some(d) => d.to_path_buf(),
        None => original_model(model_dir).unwrap_or_else(|| model_dir.to_path_buf()),
    };
    let original_config = ModelConfig::from_file(&original_dir.join("config.json"))?;
    if original_config.architecture() != arch {
        return Err(Error::InvalidArgument(format!(
            "{} is a {} model, {} a {}",
            original_dir.display(),
            original_config.architecture(),
            model_dir.display(),
            arch
        )));
    }
    if precision.needs_calibration() {
        return Err(Error::InvalidArgument(format!(
            "rewrite writes fp32 or int8 products (dynamic int8, for the CPU), not {0}; for {0}, export the model with `effir export`",
            match precision {
                MatmulPrecision::Int8Qdq => "QDQ int8",
                other => other.name(),
            }
        )));
    }
    if let Some(smoothing) = smoothing {
        crate::precision::check_int8_smoothing(precision, smoothing.alpha)?;
    }
    let mut file = GraphFile::read(graph_path)?;
    // Weights are found by their values; a quantized graph no longer holds
    // the float values to find (nor would re-quantizing it be lossless).
    if file.precision() != "fp32" {
        return Err(Error::graph(
            graph_path,
            format!(
                "the graph computes in {}: rewrite slims float32 graphs, whose weights it finds by value; \
                 rewrite the float export and add --precision int8 instead; nothing written",
                file.precision()
            ),
        ));
    }
    let opset = file.opset().unwrap_or(0);
    if precision.int8_kernel().is_some() && opset < INT8_MIN_OPSET {
        return Err(Error::graph(
            graph_path,
            format!("int8 needs opset {INT8_MIN_OPSET} (DynamicQuantizeLinear, MatMulInteger); this graph is opset {opset}; nothing written"),
        ));
    }
    let base = graph_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let bytes_before = crate::graph_file::graph_bytes(graph_path)?;
    let graph = file.model.graph.as_mut().expect("checked on read");
    let used_external = inline_external_data(graph, graph_path, &base)?;
    let original = Checkpoint::load(&original_dir, arch)?;
    let target = Checkpoint::load(model_dir, arch)?;
    let nodes_before = graph.node.len();

    let idx = crate::node_index::NodeIndex::new(&graph.node);
    let weights = match_weights(graph, &idx, &base, arch, &original, &target)?;
    let (mlp_blocks, missing) = locate_dropped_mlps(graph, &idx, arch, &shape, &weights);
    if !missing.is_empty() || !weights.unresolved.is_empty() {
        let float_matrices = graph
            .initializer
            .iter()
            .filter(|t| t.data_type == DataType::Float as i32 && t.dims.len() == 2)
            .count();
        return Err(Error::graph(
            graph_path,
            format!(
                "cannot map this graph onto {} ({} float matrices in the graph, {} weights matched by value):\n  {}",
                original_dir.display(),
                float_matrices,
                weights.assigned.len(),
                missing
                    .into_iter()
                    .chain(weights.unresolved.iter().map(|u| format!("ambiguous weight {u}")))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
        ));
    }

    let dropped: Vec<usize> = mlp_blocks.keys().copied().collect();
    cut_out_mlps(graph, &idx, &mlp_blocks);
    let replaced = replace_weights(graph, &weights.assigned, &target, arch, &dropped, model_dir)?;
    let integer_products = |g: &candle_onnx::onnx::GraphProto| {
        g.node
            .iter()
            .filter(|n| n.op_type == "MatMulInteger")
            .count()
    };
    let integer_before = integer_products(graph);
    let mut int8_smoothing = None;
    if let Some(kernel) = precision.int8_kernel() {
        let n = match smoothing {
            None => quantize_projections(graph, opset, &weights.assigned, arch, kernel, &base)?,
            Some(smoothing) => {
                let products = projection_sites(graph, &weights.assigned, arch);
                let setup = effir_pipeline::EncoderSetup::load(
                    model_dir,
                    &effir_pipeline::LoadOptions::default(),
                )?;
                let summary = crate::smoothing::smooth_products(
                    &mut file.model,
                    &setup,
                    opset,
                    &products,
                    smoothing.alpha,
                    kernel,
                    smoothing.calibration,
                    8,
                )?;
                int8_smoothing = Some(summary);
                products.len()
            }
        };
        if n == 0 {
            return Err(Error::graph(
                    graph_path,
                    "int8 was asked for, but no MatMul of this graph multiplies by a transformer \
                     projection held in an initializer (Gemm or Constant weights are not quantized); nothing written"
                    .to_string(),
            ));
        }
    }
    let graph = file.model.graph.as_mut().expect("checked on read");
    // Dead nodes and initializers go; shape hints of changed tensors too.
    remove_dead(graph);
    graph.value_info.clear();
    // Those of a dropped MLP went with it.
    let quantized_products = integer_products(graph) - integer_before;
    let narrowed: Vec<usize> = shape
        .layers
        .iter()
        .enumerate()
        .filter(|(l, s)| {
            s.mlp.is_some_and(|m| {
                original
                    .tensors
                    .get(&arch.checkpoint().mlp_tensors("", *l).down)
                    .is_some_and(|(d, _)| d[1] != m.intermediate_size)
            })
        })
        .map(|(l, _)| l)
        .collect();
    let nodes_after = graph.node.len();
    let weight_bytes = crate::graph_file::initializer_bytes(&file.model);
    let external = used_external || weight_bytes > EXTERNAL_DATA_THRESHOLD;

    // The model this graph now computes, for `validate`.
    crate::export::set_metadata(
        &mut file.model,
        crate::export::SOURCE_MODEL_KEY,
        &effir_pipeline::io::recorded_path::relative_to(out, model_dir).to_string_lossy(),
    );
    let staging = effir_pipeline::io::atomic_file::StagedDir::beside(out)?;
    let file_name = graph_path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.onnx")
        .to_string();
    write_model(file.model, staging.path(), &file_name, external)?;
    let staged_graph = staging.path().join(&file_name);
    GraphFile::read(&staged_graph)?;
    let bytes_after = std::fs::metadata(&staged_graph)
        .map_err(|e| Error::io(&staged_graph, e))?
        .len()
        + std::fs::metadata(staging.path().join(format!("{file_name}_data")))
            .map_or(0, |m| m.len());
    Ok(StagedRewrite {
        dir: staging,
        summary: RewriteSummary {
            original_graph: graph_path.to_path_buf(),
            graph: staged_graph,
            matched_weights: weights.assigned.len(),
            replaced_weights: replaced,
            dropped_mlps: dropped,
            narrowed_mlps: narrowed,
            nodes_before,
            nodes_after,
            bytes_before,
            bytes_after,
            precision: precision.name(),
            int8_kernel: precision.int8_kernel(),
            quantized_products,
            int8_smoothing,
        },
    })
}
