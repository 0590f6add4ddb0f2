//! Pass 5, with `--precision int8`: every `MatMul` that multiplies by one
//! of the transformer's projection matrices (attention Q/K/V/output, MLP
//! gate/up/down; never the embedding table, a pooler or a Dense head)
//! becomes the dynamic int8 chain that `effir export --precision int8`
//! emits, built by the same [`crate::quantize::int8_matmul`]:
//!
//! ```text
//! DynamicQuantizeLinear(x) ─ MatMulInteger(x_q, W_q, x_zp, W_zp) ─ Cast(float) ─ Mul(x_scale · W_scale)
//! ```
//!
//! The chain's last node writes the `MatMul`'s own output value, so the
//! rest of the graph (bias `Add`s, reshapes) and its interface stay as they
//! were. One `DynamicQuantizeLinear` serves every product of the same input
//! (Q, K and V read one `x`). Runs after the weights are replaced, so it
//! quantizes the new model's values. With `--int8-smoothing` the inputs
//! are smoothed first, as `export` does ([`crate::smoothing`]), measured on
//! the rewritten float graph.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::GraphProto;
use effir_pipeline::Architecture;

use super::graph_index::Source;
use super::weight_matching::Orientation;
use crate::error::Result;
use crate::graph_file::float_values;
use crate::projection_products::{splice_products, ProjectionProduct};
use crate::quantize::{int8_matmul, Int8Kernel};

/// The graph's `MatMul`s by a transformer projection held as an `(in,
/// out)` initializer (`Wᵀ`), in graph order.
pub(super) fn projection_sites(
    graph: &GraphProto,
    assigned: &HashMap<Source, (String, Orientation)>,
    arch: Architecture,
) -> Vec<ProjectionProduct> {
    let map = arch.checkpoint();
    // Initializer name → its index and checkpoint module.
    let projections: HashMap<&str, (usize, &str)> = assigned
        .iter()
        .filter_map(|(source, (name, orientation))| {
            let Source::Initializer(i) = source else {
                return None;
            };
            let module = name.strip_suffix(".weight")?;
            map.locate_projection(module)?;
            (*orientation == Orientation::Transposed && graph.initializer[*i].dims.len() == 2)
                .then(|| (graph.initializer[*i].name.as_str(), (*i, module)))
        })
        .collect();
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "MatMul" && n.input.len() == 2)
        .filter_map(|(i, n)| {
            let &(weight, module) = projections.get(n.input[1].as_str())?;
            ProjectionProduct::at(i, n, module, weight, arch)
        })
        .collect()
}

/// Replaces each projection `MatMul` by the int8 chain; returns how many.
pub(super) fn quantize_projections(
    graph: &mut GraphProto,
    opset: i64,
    assigned: &HashMap<Source, (String, Orientation)>,
    arch: Architecture,
    kernel: Int8Kernel,
    base: &Path,
) -> Result<usize> {
    let sites: HashMap<usize, usize> = projection_sites(graph, assigned, arch)
        .into_iter()
        .map(|p| (p.node, p.weight))
        .collect();
    let count = splice_products(graph, opset, &sites, &mut |g, x, tensor| {
        let dims = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        let values = float_values(tensor, base)?.expect("projections are float matrices");
        let stem = format!("{}_int8", tensor.name);
        Ok(int8_matmul(g, x, &stem, &values, dims, kernel))
    })?;
    Ok(count)
}
