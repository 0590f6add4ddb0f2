//! int8 for TensorRT (`--target tensorrt --precision int8`): symmetric,
//! statically calibrated int8 written as `QuantizeLinear`/`DequantizeLinear`
//! pairs around each projection product's activation and weight (the QDQ
//! form TensorRT builds int8 engines from; ONNX Runtime's CPU and CUDA
//! providers run it too):
//!
//! ```text
//! x ─ QuantizeLinear(s_x, 0) ─ DequantizeLinear(s_x, 0) ─┐
//!                                                      MatMul ─ (bias Add …)
//! W_q (int8) ─ DequantizeLinear(s_w per column, 0, axis 1) ─┘
//! ```
//!
//! Weights: int8 per output channel, `[-127, 127]`, zero point 0.
//! Activations: one scale per tensor, `max |x| / 127` over the calibration
//! text ([`crate::activation_ranges`]), zero point 0. The embedding tables
//! and the pooling/Dense head stay float32.
//!
//! By default only the products that read a sub-layer's normalised input
//! (Q, K, V, gate, up) are quantized. The output projections (attention
//! output, MLP down) stay float: their inputs, the attention mixture and
//! the activation's one-sided, outlier-heavy output, lose too much to one
//! static scale per tensor. On all-MiniLM-L6-v2 (`effir validate
//! --parity-texts 256` on SciFact, calibrated on 16k tokens of it) the lowest
//! cosine to the model is 0.972 with every product quantized and 0.990
//! with the output projections float. `all_products` quantizes them too.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::{tensor_proto::DataType, GraphProto};
use serde::Serialize;

use crate::activation_ranges::TensorRange;
use crate::error::{Error, Result};
use crate::graph::attr_int;
use crate::graph_file::float_values;
use crate::precision::Int8Kernel;
use crate::projection_products::{splice_products, ProjectionProduct};
use crate::quantize::quantize_columns;

/// The first opset whose `DequantizeLinear` takes per-axis scales.
pub const QDQ_MIN_OPSET: i64 = 13;

/// One product's calibrated activation scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivationScale {
    pub module: String,
    pub layer: usize,
    pub input_max_abs: f32,
    pub scale: f32,
    /// Whether the product was quantized (output projections stay float
    /// unless every product is asked for).
    pub quantized: bool,
}

/// Rewrites `products` of `graph` into QDQ form, with each product's input
/// range on the calibration text. Nothing is changed when an error is
/// returned.
pub fn quantize_products(
    graph: &mut GraphProto,
    opset: i64,
    products: &[ProjectionProduct],
    input_ranges: &[TensorRange],
    all_products: bool,
) -> Result<Vec<ActivationScale>> {
    assert_eq!(products.len(), input_ranges.len(), "one range per product");
    if opset < QDQ_MIN_OPSET {
        return Err(Error::Export(format!(
            "QDQ int8 needs opset {QDQ_MIN_OPSET} or later (per-channel DequantizeLinear); this graph is opset {opset}"
        )));
    }
    let mut scales = Vec::with_capacity(products.len());
    let mut by_input: HashMap<String, f32> = HashMap::new();
    for (p, range) in products.iter().zip(input_ranges) {
        if range.non_finite > 0 || !range.max_abs.is_finite() {
            return Err(Error::Export(format!(
                "layer {} ({}): its input is NaN or Inf on the calibration text; cannot calibrate",
                p.layer, p.module
            )));
        }
        let scale = if range.max_abs > 0.0 {
            range.max_abs / 127.0
        } else {
            1.0
        };
        let quantized = all_products || p.role.reads_input();
        if quantized {
            by_input.insert(p.input.clone(), scale);
        }
        scales.push(ActivationScale {
            module: p.module.clone(),
            layer: p.layer,
            input_max_abs: range.max_abs,
            scale,
            quantized,
        });
    }
    let sites: HashMap<usize, usize> = products
        .iter()
        .zip(&scales)
        .filter(|(_, s)| s.quantized)
        .map(|(p, _)| (p.node, p.weight))
        .collect();
    // Q, K and V read one x: one QDQ pair serves them.
    let mut dequantized: HashMap<String, String> = HashMap::new();
    let mut zero_point: Option<String> = None;
    splice_products(graph, opset, &sites, &mut |g, x, weight| {
        let zero = zero_point
            .get_or_insert_with(|| g.raw_weight("qdq_zero_point", DataType::Int8, &[], vec![0]))
            .clone();
        let xd = match dequantized.get(x) {
            Some(xd) => xd.clone(),
            None => {
                let s = g.float_scalar(by_input[x]);
                let q = g.node("QuantizeLinear", &[x, &s, &zero], vec![]);
                let xd = g.node("DequantizeLinear", &[&q, &s, &zero], vec![]);
                dequantized.insert(x.to_string(), xd.clone());
                xd
            }
        };
        let (rows, cols) = (weight.dims[0] as usize, weight.dims[1] as usize);
        // The emitted graph holds its weights: no external data to read.
        let values = float_values(weight, Path::new("."))?.expect("projection weights are float32");
        let q = quantize_columns(&values, rows, cols, Int8Kernel::U8s8);
        let wq = g.raw_weight(
            &format!("{}_int8", weight.name),
            DataType::Int8,
            &[rows, cols],
            q.values,
        );
        let ws = g.floats(&q.scales);
        let wz = g.raw_weight(
            &format!("{}_zero_point", weight.name),
            DataType::Int8,
            &[cols],
            q.zero_points,
        );
        let wd = g.node(
            "DequantizeLinear",
            &[&wq, &ws, &wz],
            vec![attr_int("axis", 1)],
        );
        Ok(g.matmul(&xd, &wd))
    })?;
    Ok(scales)
}
