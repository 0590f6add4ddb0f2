//! Smoothed dynamic int8 (`--int8-smoothing ALPHA`): SmoothQuant's
//! per-channel rescaling (Xiao et al., 2023) in front of the CPU's dynamic
//! int8 products.
//!
//! ONNX Runtime's dynamic int8 quantizes each activation with one scale per
//! tensor, so a few channels with large values (the outliers of
//! transformer activations) set the step for every other channel, which
//! then keep only a few levels. Smoothing divides each input channel `j`
//! of a product by `s_j` and multiplies the weight's row `j` by the same
//! factor, which leaves the float product unchanged:
//!
//! ```text
//! x · W = (x / s) · (diag(s) W),   s_j = max|x_j|^α / max|W_j|^(1−α)
//! ```
//!
//! `max|x_j|` is measured on calibration text ([`crate::activation_ranges::channel_maxima`])
//! and `max|W_j|` is the largest magnitude of row `j` over every product
//! that reads `x` (Q, K and V share one input, so one factor per channel
//! serves the three). `α` moves the difficulty between the two: at 1 every
//! input channel ends with range 1 and the weights' rows carry the
//! activations' range; towards 0 the weights' rows are flattened instead.
//! At 0.5 a channel's activation and weight ranges end equal.
//!
//! The graph divides by `s` with one `Mul` per distinct input, ahead of
//! its `DynamicQuantizeLinear`:
//!
//! ```text
//! x ─ Mul(1/s) ─ DynamicQuantizeLinear ─ MatMulInteger(·, diag(s) W quantized) ─ Cast ─ Mul(scales)
//! ```
//!
//! unless the division can be folded into a tensor upstream, which costs
//! nothing at run time: the scale of a pre-norm decoder's RMSNorm (whose
//! output only Q/K/V or gate/up read), or the output columns of a gated
//! MLP's up projection (the down projection reads `act(gate) · up`). In
//! post-norm BERT the norms' outputs also feed the residual stream, so its
//! inputs keep their `Mul`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_onnx::onnx::{tensor_proto::DataType, GraphProto, ModelProto, TensorProto};
use effir_pipeline::data::calibration::CalibrationSet;
use effir_pipeline::EncoderSetup;
use serde::Serialize;

use crate::activation_ranges::channel_maxima;
use crate::error::{Error, Result};
use crate::graph_file::float_values;
use crate::node_index::NodeIndex;
use crate::precision::{check_alpha, Int8Kernel};
use crate::projection_products::{splice_products, ProjectionProduct};
use crate::quantize::int8_matmul;

/// Below this, a channel's or a row's largest magnitude counts as this (a
/// channel that is always zero keeps a finite factor).
const FLOOR: f32 = 1e-5;

/// What smoothing did to one product, in `effir_export.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmoothedProduct {
    pub module: String,
    pub layer: usize,
    /// The largest input magnitude on the calibration text, before and
    /// after the division: how much of the activations' range moved into
    /// the weights.
    pub input_max_abs: f32,
    pub smoothed_input_max_abs: f32,
    /// The smallest and largest factor `s_j`.
    pub factor_range: (f32, f32),
    /// Where the division by `s` went: `mul` (a `Mul` node ahead of the
    /// quantization) or the initializer it was folded into.
    pub division: String,
}

/// Smoothed dynamic int8, in `effir_export.json` and rewrite's summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmoothingSummary {
    pub alpha: f32,
    pub products: Vec<SmoothedProduct>,
}

/// `s_j = max|x_j|^α / max|W_j|^(1−α)` for each channel.
pub fn smoothing_factors(input_max: &[f32], row_max: &[f32], alpha: f32) -> Vec<f32> {
    assert_eq!(input_max.len(), row_max.len(), "one row per input channel");
    input_max
        .iter()
        .zip(row_max)
        .map(|(&x, &w)| x.max(FLOOR).powf(alpha) / w.max(FLOOR).powf(1.0 - alpha))
        .collect()
}

/// Measures each product input's channels on the calibration text `set`
/// (the float32 `model` run in ONNX Runtime, `batch_size` texts at a time)
/// and converts `products` to smoothed dynamic int8.
#[allow(clippy::too_many_arguments)]
pub fn smooth_products(
    model: &mut ModelProto,
    setup: &EncoderSetup,
    opset: i64,
    products: &[ProjectionProduct],
    alpha: f32,
    kernel: Int8Kernel,
    set: &CalibrationSet,
    batch_size: usize,
) -> Result<SmoothingSummary> {
    check_alpha(alpha)?;
    let graph = model.graph.as_ref().expect("a model with a graph");
    // One measurement per distinct input (Q, K and V share theirs).
    let mut inputs: Vec<(String, usize)> = Vec::new();
    for p in products {
        if !inputs.iter().any(|(x, _)| *x == p.input) {
            inputs.push((
                p.input.clone(),
                graph.initializer[p.weight].dims[0] as usize,
            ));
        }
    }
    let started = std::time::Instant::now();
    let maxima = channel_maxima(
        model,
        None,
        &inputs,
        setup,
        &set.texts,
        batch_size,
        &mut |_| {},
    )?;
    tracing::info!(
        texts = set.texts.len(),
        tokens = set.tokens,
        inputs = inputs.len(),
        seconds = started.elapsed().as_secs_f64(),
        "input channel ranges measured"
    );
    let maxima: HashMap<String, Vec<f32>> =
        inputs.into_iter().map(|(x, _)| x).zip(maxima).collect();
    let graph = model.graph.as_mut().expect("a model with a graph");
    quantize_products(graph, opset, products, &maxima, alpha, kernel)
}

/// Rewrites `products` of `graph` (float32, weights in the graph) into
/// smoothed dynamic int8 products. `input_maxima` maps each product's
/// input tensor to its per-channel largest magnitude on the calibration
/// text; `alpha` is checked by the caller. Nothing is changed when an
/// error is returned.
fn quantize_products(
    graph: &mut GraphProto,
    opset: i64,
    products: &[ProjectionProduct],
    input_maxima: &HashMap<String, Vec<f32>>,
    alpha: f32,
    kernel: Int8Kernel,
) -> Result<SmoothingSummary> {
    // Each input's largest weight magnitude per row, over every product
    // that reads it. Each weight is decoded here and again when it is
    // rewritten below: twice the decoding, but one float32 weight in memory
    // at a time instead of every product's.
    let mut row_max: HashMap<&str, Vec<f32>> = HashMap::new();
    for p in products {
        let weight = &graph.initializer[p.weight];
        let (rows, cols) = (weight.dims[0] as usize, weight.dims[1] as usize);
        let values = float_values(weight, Path::new("."))?
            .ok_or_else(|| Error::Export(format!("{}: not a float32 weight", weight.name)))?;
        let maxima = input_maxima.get(&p.input).ok_or_else(|| {
            Error::Export(format!("no channel ranges were measured for `{}`", p.input))
        })?;
        if maxima.len() != rows {
            return Err(Error::Export(format!(
                "`{}` has {} channels measured, but {} multiplies it by {rows} rows",
                p.input,
                maxima.len(),
                weight.name
            )));
        }
        let entry = row_max
            .entry(p.input.as_str())
            .or_insert_with(|| vec![0.0; rows]);
        for (m, row) in entry.iter_mut().zip(values.chunks_exact(cols)) {
            *m = row.iter().fold(*m, |m, v| m.max(v.abs()));
        }
    }
    let factors: HashMap<String, Vec<f32>> = row_max
        .iter()
        .map(|(x, rows)| {
            let s = smoothing_factors(&input_maxima[*x], rows, alpha);
            (x.to_string(), s)
        })
        .collect();
    let placements = division_placements(graph, products);
    let records: Vec<SmoothedProduct> = products
        .iter()
        .map(|p| {
            let s = &factors[&p.input];
            let x = &input_maxima[&p.input];
            let max = |v: &mut dyn Iterator<Item = f32>| v.fold(0f32, f32::max);
            SmoothedProduct {
                module: p.module.clone(),
                layer: p.layer,
                input_max_abs: max(&mut x.iter().copied()),
                smoothed_input_max_abs: max(&mut x.iter().zip(s).map(|(x, s)| x / s)),
                factor_range: (
                    s.iter().copied().fold(f32::INFINITY, f32::min),
                    max(&mut s.iter().copied()),
                ),
                division: match &placements[&p.input] {
                    Division::Mul => "mul".into(),
                    Division::NormScale(name) | Division::Columns(name) => name.clone(),
                },
            }
        })
        .collect();
    // Weights whose output columns take a downstream input's division.
    let column_divisors: HashMap<&str, &Vec<f32>> = placements
        .iter()
        .filter_map(|(x, d)| match d {
            Division::Columns(weight) => Some((weight.as_str(), &factors[x])),
            _ => None,
        })
        .collect();
    let sites: HashMap<usize, usize> = products.iter().map(|p| (p.node, p.weight)).collect();
    let mut smoothed: HashMap<String, String> = HashMap::new();
    splice_products(graph, opset, &sites, &mut |g, x, weight| {
        let s = &factors[x];
        let xs = match (smoothed.get(x), &placements[x]) {
            (Some(xs), _) => xs.clone(),
            (None, Division::Mul) => {
                let inverse: Vec<f32> = s.iter().map(|s| 1.0 / s).collect();
                let inverse = g.floats(&inverse);
                let xs = g.mul(x, &inverse);
                smoothed.insert(x.to_string(), xs.clone());
                xs
            }
            // Divided upstream already.
            (None, _) => x.to_string(),
        };
        let (rows, cols) = (weight.dims[0] as usize, weight.dims[1] as usize);
        let mut values = float_values(weight, Path::new("."))?.expect("checked above");
        for (row, s) in values.chunks_exact_mut(cols).zip(s) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        if let Some(divisors) = column_divisors.get(weight.name.as_str()) {
            for row in values.chunks_exact_mut(cols) {
                row.iter_mut()
                    .zip(divisors.iter())
                    .for_each(|(v, d)| *v /= d);
            }
        }
        let stem = format!("{}_int8", weight.name);
        Ok(int8_matmul(g, &xs, &stem, &values, (rows, cols), kernel))
    })?;
    for (x, division) in &placements {
        if let Division::NormScale(name) = division {
            let t = graph
                .initializer
                .iter_mut()
                .find(|t| &t.name == name)
                .expect("a norm scale read by its norm stays");
            let values = float_values(t, Path::new("."))?.expect("checked float32");
            let divided: Vec<f32> = values.iter().zip(&factors[x]).map(|(v, s)| v / s).collect();
            set_float_values(t, &divided);
        }
    }
    Ok(SmoothingSummary {
        alpha,
        products: records,
    })
}

/// Where one product input's division by its factors goes.
#[derive(Debug, Clone, PartialEq)]
enum Division {
    /// A `Mul` node ahead of the quantization.
    Mul,
    /// Into the per-channel scale of the norm that makes the input
    /// (`normed · scale`, read by nothing but the products): free.
    NormScale(String),
    /// Into the output columns of the projection whose product is one
    /// factor of the input (`act(gate) · up`, a gated MLP's down input):
    /// free, as that projection is quantized per output column.
    Columns(String),
}

/// For each distinct product input, where its division can go without a
/// node of its own. Either fold needs every reader of the input to be a
/// product being smoothed, and the folded tensor to be read by nothing but
/// the node that makes the input (so nothing else sees the change).
fn division_placements(
    graph: &GraphProto,
    products: &[ProjectionProduct],
) -> HashMap<String, Division> {
    let index = NodeIndex::new(&graph.node);
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let product_nodes: HashSet<usize> = products.iter().map(|p| p.node).collect();
    let product_weight: HashMap<&str, &str> = products
        .iter()
        .map(|p| (p.output.as_str(), graph.initializer[p.weight].name.as_str()))
        .collect();
    // Read by exactly one node, `node`, and not a graph output.
    let private_to = |name: &str, node: usize| {
        !outputs.contains(name) && index.consumers.get(name).is_some_and(|r| r == &[node])
    };
    let mut placements = HashMap::new();
    for p in products {
        if placements.contains_key(&p.input) {
            continue;
        }
        let x = p.input.as_str();
        let only_products = !outputs.contains(x)
            && index
                .consumers
                .get(x)
                .is_some_and(|r| r.iter().all(|n| product_nodes.contains(n)));
        let channels = graph.initializer[p.weight].dims[0];
        let folded = index
            .producer
            .get(x)
            .filter(|_| only_products)
            .map(|&m| (m, &graph.node[m]))
            .filter(|(_, n)| n.op_type == "Mul" && n.input.len() == 2)
            .and_then(|(m, n)| {
                n.input.iter().find_map(|factor| {
                    let scale = graph.initializer.iter().find(|t| {
                        t.name == *factor
                            && t.data_type == DataType::Float as i32
                            && t.dims == [channels]
                    });
                    if scale.is_some() && private_to(factor, m) {
                        return Some(Division::NormScale(factor.clone()));
                    }
                    let weight = product_weight.get(factor.as_str())?;
                    private_to(factor, m).then(|| Division::Columns(weight.to_string()))
                })
            });
        placements.insert(p.input.clone(), folded.unwrap_or(Division::Mul));
    }
    placements
}

/// Replaces a float32 initializer's values (stored as raw little-endian
/// bytes).
fn set_float_values(t: &mut TensorProto, values: &[f32]) {
    t.float_data.clear();
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// α = 1 flattens the activations (every channel's range becomes 1),
    /// α = 0.5 makes a channel's activation and weight ranges equal, and a
    /// channel that is always zero keeps a finite factor.
    #[test]
    fn factors_move_range_between_activations_and_weights() {
        let x = [8.0, 0.5, 0.0];
        let w = [0.1, 0.4, 0.2];
        let s = smoothing_factors(&x, &w, 1.0);
        assert_eq!(s[0], 8.0);
        assert_eq!(s[1], 0.5);
        assert!(s[2].is_finite() && s[2] > 0.0);
        let s = smoothing_factors(&x, &w, 0.5);
        // Activation and weight ranges end equal: x/s = w·s = sqrt(x·w).
        for j in 0..2 {
            let (a, b) = (x[j] / s[j], w[j] * s[j]);
            assert!((a - b).abs() < 1e-6 * a.max(b), "{j}: {a} vs {b}");
        }
    }
}
