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
//! quantizes the new model's values.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::GraphProto;
use effir_pipeline::Architecture;

use super::graph_index::{float_values, Source};
use super::weight_matching::Orientation;
use crate::error::Result;
use crate::graph::{GraphBuilder, WeightStorage};
use crate::quantize::{int8_matmul, Int8Kernel};

/// Replaces each projection `MatMul` by the int8 chain; returns how many.
pub(super) fn quantize_projections(
    graph: &mut GraphProto,
    opset: i64,
    assigned: &HashMap<Source, (String, Orientation)>,
    arch: Architecture,
    kernel: Int8Kernel,
    base: &Path,
) -> Result<usize> {
    let map = arch.checkpoint();
    // Initializer name → its index, for the `(in, out)` matrices (`Wᵀ`) of
    // the layers' projections.
    let projections: HashMap<String, usize> = assigned
        .iter()
        .filter_map(|(source, (name, orientation))| {
            let Source::Initializer(i) = source else {
                return None;
            };
            let module = name.strip_suffix(".weight")?;
            map.locate_projection(module)?;
            (*orientation == Orientation::Transposed && graph.initializer[*i].dims.len() == 2)
                .then(|| (graph.initializer[*i].name.clone(), *i))
        })
        .collect();
    // The chains are built apart, under names the graph does not already have.
    let mut builder = GraphBuilder::new(opset, WeightStorage::Float32);
    for name in graph
        .input
        .iter()
        .map(|v| &v.name)
        .chain(graph.initializer.iter().map(|t| &t.name))
        .chain(graph.node.iter().flat_map(|n| &n.output))
    {
        builder.reserve(name);
    }
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut count = 0;
    for node in std::mem::take(&mut graph.node) {
        let weight = (node.op_type == "MatMul" && node.input.len() == 2)
            .then(|| projections.get(&node.input[1]))
            .flatten();
        let Some(&w) = weight else {
            nodes.push(node);
            continue;
        };
        let tensor = &graph.initializer[w];
        let dims = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        let values = float_values(tensor, base)?.expect("projections are float matrices");
        let stem = format!("{}_int8", tensor.name);
        let product = int8_matmul(&mut builder, &node.input[0], &stem, &values, dims, kernel);
        let (mut chain, initializers) = builder.take_built();
        // The chain's last node computes the product: it takes the MatMul's place.
        let last = chain.last_mut().expect("the chain has nodes");
        debug_assert_eq!(last.output, [product]);
        last.output = node.output.clone();
        nodes.extend(chain);
        graph.initializer.extend(initializers);
        count += 1;
    }
    graph.node = nodes;
    Ok(count)
}
