//! `--precision fp16`: the transformer's projection products in float16,
//! everything else in float32.
//!
//! ```text
//! x ─ Cast(float16) ─ MatMul(x₁₆, W₁₆) ─ Cast(float) ─ (bias Add, residual, norm … in float32)
//! ```
//!
//! The products hold nearly all of an encoder's FLOPs; LayerNorm/RMSNorm
//! statistics, softmax, activations and the residual stream stay float32,
//! so the residual stream's large values (EmbeddingGemma's reach ~65,000 in
//! late layers, ONNX Runtime issue #32600) never meet float16. What does
//! meet it is checked first: the calibration text is run through the
//! float32 graph ([`crate::activation_ranges`]) and every product's input
//! and output magnitude is recorded. A product whose largest value, times
//! a headroom factor for text the calibration did not see, would pass
//! float16's largest finite value (65504) stays float32, named in the
//! export record; with `strict` the export is refused instead, naming it.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::{tensor_proto::DataType, GraphProto};
use serde::Serialize;

use crate::activation_ranges::TensorRange;
use crate::error::{Error, Result};
use crate::graph_file::float_values;
use crate::projection_products::{splice_products, ProjectionProduct};

/// float16's largest finite value.
pub const FLOAT16_MAX: f32 = 65504.0;

/// How the range check decides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RangeCheck {
    /// A product stays float16 only if its largest calibration value times
    /// this stays within [`FLOAT16_MAX`] (default 4).
    pub headroom: f32,
    /// Refuse the export, instead of keeping a product float32, when the
    /// check fails.
    pub strict: bool,
}

impl Default for RangeCheck {
    fn default() -> Self {
        Self {
            headroom: 4.0,
            strict: false,
        }
    }
}

/// One product's calibration ranges and the arithmetic it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProductRange {
    pub module: String,
    pub layer: usize,
    pub input_max_abs: f32,
    pub output_max_abs: f32,
    /// `fp16`, or `fp32` where the range check kept it.
    pub precision: &'static str,
}

/// Converts `products` of `graph` to float16 products, given each one's
/// `(input, output)` ranges on the calibration text, as the module
/// documentation describes. Nothing is changed when an error is returned.
pub fn convert_products(
    graph: &mut GraphProto,
    opset: i64,
    products: &[ProjectionProduct],
    ranges: &[(TensorRange, TensorRange)],
    check: RangeCheck,
) -> Result<Vec<ProductRange>> {
    assert_eq!(products.len(), ranges.len(), "one range pair per product");
    if !(check.headroom.is_finite() && check.headroom >= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "the float16 headroom must be a number ≥ 1, not {}",
            check.headroom
        )));
    }
    let mut report = Vec::with_capacity(products.len());
    let mut overflowing = Vec::new();
    for (p, (input, output)) in products.iter().zip(ranges) {
        if input.non_finite > 0 || output.non_finite > 0 {
            return Err(Error::Export(format!(
                "layer {} ({}): the float32 graph already produces NaN or Inf there on the calibration text",
                p.layer, p.module
            )));
        }
        let peak = input.max_abs.max(output.max_abs);
        let fits = peak * check.headroom <= FLOAT16_MAX;
        if !fits {
            overflowing.push(format!(
                "layer {} ({}): largest value {peak:.0} × headroom {} > {FLOAT16_MAX}",
                p.layer, p.module, check.headroom
            ));
        }
        report.push(ProductRange {
            module: p.module.clone(),
            layer: p.layer,
            input_max_abs: input.max_abs,
            output_max_abs: output.max_abs,
            precision: if fits { "fp16" } else { "fp32" },
        });
    }
    if check.strict && !overflowing.is_empty() {
        return Err(Error::Export(format!(
            "float16 range check failed (--strict), nothing written:\n  {}",
            overflowing.join("\n  ")
        )));
    }
    for finding in &overflowing {
        tracing::warn!("kept in float32: {finding}");
    }
    let converted: HashMap<usize, usize> = products
        .iter()
        .zip(&report)
        .filter(|(_, r)| r.precision == "fp16")
        .map(|(p, _)| (p.node, p.weight))
        .collect();
    // Q, K and V read one x: one Cast serves them.
    let mut half_inputs: HashMap<String, String> = HashMap::new();
    splice_products(graph, opset, &converted, &mut |g, x, weight| {
        // The emitted graph holds its weights: no external data to read.
        let values = float_values(weight, Path::new("."))?.expect("projection weights are float32");
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
        let w16 = g.raw_weight(
            &format!("{}_fp16", weight.name),
            DataType::Float16,
            &dims,
            raw,
        );
        let x16 = match half_inputs.get(x) {
            Some(x16) => x16.clone(),
            None => {
                let x16 = g.cast(x, DataType::Float16);
                half_inputs.insert(x.to_string(), x16.clone());
                x16
            }
        };
        let y16 = g.matmul(&x16, &w16);
        Ok(g.cast(&y16, DataType::Float))
    })?;
    Ok(report)
}
