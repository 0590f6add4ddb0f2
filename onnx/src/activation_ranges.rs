//! What a graph's intermediate values look like on real text, measured in
//! ONNX Runtime on the graph itself: for each chosen tensor, its largest
//! magnitude and how many of its elements are NaN or infinite.
//!
//! The graph is extended with a small reduction per tensor, every one
//! computed in float32 whatever the tensor's type:
//!
//! ```text
//! t ─ Cast(float) ─┬─ Abs ─ ReduceMax            → largest magnitude
//!                  └─ IsNaN ∨ IsInf ─ Cast ─ ReduceSum → non-finite count
//! ```
//!
//! and those scalars become its only outputs, so a batch costs one run of
//! the graph and returns a few numbers per tensor, never the tensors.
//! [`channel_maxima`] reduces over every axis but the last instead: one
//! largest magnitude per channel.
//! Used for fp16's range check, QDQ int8's activation scales and smoothed
//! int8's channel factors (export)
//! and to name the first node that produces a NaN or Inf (validate).

use std::path::Path;

use candle_core::Device;
use candle_onnx::onnx::{
    tensor_proto::DataType, type_proto, ModelProto, TypeProto, ValueInfoProto,
};
use effir_pipeline::EncoderSetup;
use ort::session::Session;
use prost::Message;

use crate::error::{Error, Result};
use crate::graph::{attr_int, GraphBuilder};
use crate::session::{into_pipeline, token_feeds};

/// One tensor's values over every text measured.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct TensorRange {
    /// Largest `|x|` of the finite and infinite elements (NaN is ignored by
    /// the maximum; see `non_finite`).
    pub max_abs: f32,
    /// Elements that were NaN or ±Inf.
    pub non_finite: u64,
}

/// What to measure of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    /// Largest magnitude and non-finite count.
    Range,
    /// Non-finite count only (safe for tensors that may be empty, such
    /// as shapes).
    NonFinite,
}

/// Extends `model` with the reductions of `tensors` and makes them its only
/// outputs: `(max_abs output or None, non_finite output)` per tensor.
fn probe_model(
    model: &ModelProto,
    tensors: &[(String, Statistic)],
) -> (ModelProto, Vec<(Option<String>, String)>) {
    let mut probe = model.clone();
    let opset = crate::graph_file::default_opset(&probe).unwrap_or(crate::emit::DEFAULT_OPSET);
    let graph = probe.graph.as_mut().expect("a model with a graph");
    let mut g = GraphBuilder::editing(graph, opset);
    let keep_dims = || vec![attr_int("keepdims", 0)];
    let mut outputs = Vec::with_capacity(tensors.len());
    for (tensor, statistic) in tensors {
        let x = g.cast(tensor, DataType::Float);
        let max = (*statistic == Statistic::Range).then(|| {
            let abs = g.unary("Abs", &x);
            g.node("ReduceMax", &[&abs], keep_dims())
        });
        let nan = g.unary("IsNaN", &x);
        let inf = g.unary("IsInf", &x);
        let bad = g.node("Or", &[&nan, &inf], vec![]);
        let bad = g.cast(&bad, DataType::Float);
        let count = g.node("ReduceSum", &[&bad], keep_dims());
        outputs.push((max, count));
    }
    let (nodes, initializers) = g.take_built();
    graph.node.extend(nodes);
    graph.initializer.extend(initializers);
    graph.output = outputs
        .iter()
        .flat_map(|(max, count)| max.iter().chain([count]))
        .map(|name| scalar_output(name))
        .collect();
    (probe, outputs)
}

fn scalar_output(name: &str) -> ValueInfoProto {
    float_output(name, Default::default())
}

fn vector_output(name: &str) -> ValueInfoProto {
    use candle_onnx::onnx::{tensor_shape_proto::Dimension, TensorShapeProto};
    float_output(
        name,
        TensorShapeProto {
            dim: vec![Dimension::default()],
        },
    )
}

fn float_output(name: &str, shape: candle_onnx::onnx::TensorShapeProto) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs `model` over `texts` (already formatted, tokenized by `setup`) in
/// batches of `batch_size` and returns each tensor's range, in the order of
/// `tensors`. `weights_dir` is where the graph's external data lives, if it
/// has any. Runs on the CPU provider with ONNX Runtime's default
/// optimisations, as the graph is served.
pub fn measure(
    model: &ModelProto,
    weights_dir: Option<&Path>,
    tensors: &[(String, Statistic)],
    setup: &EncoderSetup,
    texts: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<TensorRange>> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument(
            "no texts to measure activation ranges on".into(),
        ));
    }
    let mut ranges = vec![TensorRange::default(); tensors.len()];
    if tensors.is_empty() {
        return Ok(ranges);
    }
    let (probe, outputs) = probe_model(model, tensors);
    let names: Vec<String> = outputs
        .iter()
        .flat_map(|(max, count)| max.iter().chain([count]).cloned())
        .collect();
    run_probe(
        probe,
        weights_dir,
        &names,
        setup,
        texts,
        batch_size,
        progress,
        &mut |values| {
            let mut values = values.iter().map(|v| v.first().copied().unwrap_or(0.0));
            for (range, (max, _)) in ranges.iter_mut().zip(&outputs) {
                if max.is_some() {
                    let m = values.next().expect("one value per probe output");
                    // ReduceMax of an all-NaN tensor is NaN: that is counted below.
                    if m > range.max_abs {
                        range.max_abs = m;
                    }
                }
                range.non_finite += values.next().expect("one value per probe output") as u64;
            }
        },
    )?;
    Ok(ranges)
}

/// Runs `model` over `texts` as [`measure`] does and returns, for each
/// `(tensor, channels)`, the largest magnitude of each of its `channels`
/// last-axis channels (over every other axis: batch, position). The
/// per-channel ranges behind smoothed int8 ([`crate::smoothing`]).
pub fn channel_maxima(
    model: &ModelProto,
    weights_dir: Option<&Path>,
    tensors: &[(String, usize)],
    setup: &EncoderSetup,
    texts: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument(
            "no texts to measure activation ranges on".into(),
        ));
    }
    let mut maxima: Vec<Vec<f32>> = tensors.iter().map(|(_, c)| vec![0.0; *c]).collect();
    if tensors.is_empty() {
        return Ok(maxima);
    }
    let mut probe = model.clone();
    let opset = crate::graph_file::default_opset(&probe).unwrap_or(crate::emit::DEFAULT_OPSET);
    let graph = probe.graph.as_mut().expect("a model with a graph");
    let mut g = GraphBuilder::editing(graph, opset);
    let names: Vec<String> = tensors
        .iter()
        .map(|(tensor, channels)| {
            let x = g.cast(tensor, DataType::Float);
            let abs = g.unary("Abs", &x);
            let rows = g.reshape(&abs, &[-1, *channels as i64]);
            g.reduce("ReduceMax", &rows, &[0], false)
        })
        .collect();
    let (nodes, initializers) = g.take_built();
    graph.node.extend(nodes);
    graph.initializer.extend(initializers);
    graph.output = names.iter().map(|name| vector_output(name)).collect();
    let mut non_finite = None;
    run_probe(
        probe,
        weights_dir,
        &names,
        setup,
        texts,
        batch_size,
        progress,
        &mut |values| {
            for (i, (maximum, batch)) in maxima.iter_mut().zip(values).enumerate() {
                for (m, &v) in maximum.iter_mut().zip(batch) {
                    if !v.is_finite() {
                        non_finite.get_or_insert(i);
                    } else if v > *m {
                        *m = v;
                    }
                }
            }
        },
    )?;
    if let Some(i) = non_finite {
        return Err(Error::Export(format!(
            "`{}` holds NaN or Inf on the calibration text; its channels cannot be measured",
            tensors[i].0
        )));
    }
    Ok(maxima)
}

/// Runs `probe` (whose outputs are `outputs`) over `texts` in batches and
/// hands each batch's output values, in the order of `outputs`, to `on_batch`.
#[allow(clippy::too_many_arguments)]
fn run_probe(
    probe: ModelProto,
    weights_dir: Option<&Path>,
    outputs: &[String],
    setup: &EncoderSetup,
    texts: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
    on_batch: &mut dyn FnMut(&[Vec<f32>]),
) -> Result<()> {
    let input_names: Vec<String> = {
        let graph = probe.graph.as_ref().expect("a model with a graph");
        graph
            .input
            .iter()
            .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .map(|i| i.name.clone())
            .collect()
    };
    let bytes = probe.encode_to_vec();
    drop(probe);
    let mut session = probe_session(&bytes, weights_dir)?;
    drop(bytes);
    let mut done = 0;
    setup.for_each_batch(texts, "", batch_size, &Device::Cpu, &mut |input, chunk| {
        let feeds = token_feeds(&input_names, input).map_err(into_pipeline)?;
        let run = session
            .run(feeds)
            .map_err(|e| into_pipeline(Error::runtime("measuring activation ranges", e)))?;
        let values = outputs
            .iter()
            .map(|name| {
                let view = run[name.as_str()].try_extract_array::<f32>().map_err(|e| {
                    into_pipeline(Error::runtime(format!("reading the probe {name}"), e))
                })?;
                Ok(view.iter().copied().collect())
            })
            .collect::<effir_pipeline::Result<Vec<Vec<f32>>>>()?;
        on_batch(&values);
        done += chunk.len();
        progress(done);
        Ok(())
    })?;
    Ok(())
}

fn probe_session(bytes: &[u8], weights_dir: Option<&Path>) -> Result<Session> {
    let env = crate::runtime::environment()?;
    let mut builder =
        Session::builder(env).map_err(|e| Error::runtime("creating a probe session", e))?;
    if let Some(dir) = weights_dir {
        builder = builder
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                dir.to_string_lossy(),
            )
            .map_err(ort::Error::<()>::from)
            .map_err(|e| Error::runtime("pointing the probe at external data", e))?;
    }
    builder
        .commit_from_memory(bytes)
        .map_err(|e| Error::runtime("loading the probe graph", e))
}

/// The first node, in graph order, whose output holds a NaN or an Inf:
/// where a graph's non-finite values come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NonFiniteOrigin {
    pub node: String,
    pub op: String,
    pub output: String,
    /// The weights it reads, or failing that the nearest ones upstream:
    /// they name the layer (a projection's `{module}.weight_t` in effir's graphs).
    pub weights: Vec<String>,
    /// NaN or Inf elements of that output over the texts run.
    pub elements: u64,
}

impl std::fmt::Display for NonFiniteOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "first NaN/Inf at node `{}` ({}, output `{}`, {} elements)",
            self.node, self.op, self.output, self.elements
        )?;
        if !self.weights.is_empty() {
            write!(f, ", reading {}", self.weights.join(", "))?;
        }
        Ok(())
    }
}

/// Runs `graph` (a file; external data beside it) over `texts` and returns
/// the first node whose output is not finite, if any is.
pub fn first_non_finite(
    graph: &Path,
    setup: &EncoderSetup,
    texts: &[String],
    batch_size: usize,
) -> Result<Option<NonFiniteOrigin>> {
    let file = crate::graph_file::GraphFile::read(graph)?;
    let g = file.model.graph.as_ref().expect("checked on read");
    let outputs: Vec<(usize, String)> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (i, o.clone()))
        })
        .collect();
    let tensors: Vec<(String, Statistic)> = outputs
        .iter()
        .map(|(_, o)| (o.clone(), Statistic::NonFinite))
        .collect();
    let ranges = measure(
        &file.model,
        graph.parent(),
        &tensors,
        setup,
        texts,
        batch_size,
        &mut |_| {},
    )?;
    let Some(((node, output), range)) = outputs.iter().zip(&ranges).find(|(_, r)| r.non_finite > 0)
    else {
        return Ok(None);
    };
    let n = &g.node[*node];
    Ok(Some(NonFiniteOrigin {
        node: n.name.clone(),
        op: n.op_type.clone(),
        output: output.clone(),
        weights: nearest_weights(g, *node),
        elements: range.non_finite,
    }))
}

/// The matrices (initializers of rank ≥ 2) node `start` reads, or the
/// nearest ones upstream, breadth first.
fn nearest_weights(graph: &candle_onnx::onnx::GraphProto, start: usize) -> Vec<String> {
    use std::collections::{HashSet, VecDeque};
    let matrices: HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() >= 2)
        .map(|t| t.name.as_str())
        .collect();
    let producer = crate::node_index::NodeIndex::new(&graph.node).producer;
    let mut queue = VecDeque::from([start]);
    let mut seen = HashSet::from([start]);
    while !queue.is_empty() {
        // One level of the search at a time: the nearest weights win.
        let level: Vec<usize> = queue.drain(..).collect();
        let found: Vec<String> = level
            .iter()
            .flat_map(|&i| &graph.node[i].input)
            .filter(|x| matrices.contains(x.as_str()))
            .cloned()
            .collect();
        if !found.is_empty() {
            return found;
        }
        for i in level {
            for x in &graph.node[i].input {
                if let Some(&p) = producer.get(x) {
                    if seen.insert(p) {
                        queue.push_back(p);
                    }
                }
            }
        }
    }
    Vec::new()
}
