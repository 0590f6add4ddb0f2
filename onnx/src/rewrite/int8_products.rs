//! Pass 5, with `--precision int8`: every `MatMul` that multiplies by one
//! of the transformer's projection matrices (attention Q/K/V/output, MLP
//! gate/up/down; never the embedding table, a pooler or a Dense head)
//! becomes the dynamic int8 chain of [`crate::quantize`]:
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

use candle_onnx::onnx::{tensor_proto::DataType, GraphProto, NodeProto, TensorProto};
use effir_pipeline::Architecture;

use super::graph_index::{float_values, Source};
use super::weight_matching::Orientation;
use crate::error::Result;
use crate::graph::attr_int;
use crate::quantize::{quantize_columns, Int8Kernel};

/// Replaces each projection `MatMul` by the int8 chain; returns how many.
pub(super) fn quantize_projections(
    graph: &mut GraphProto,
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
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut new_initializers = Vec::new();
    let mut quantized_inputs: HashMap<String, [String; 3]> = HashMap::new();
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
        let (in_dim, out_dim) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        let values = float_values(tensor, base)?.expect("projections are float matrices");
        let q = quantize_columns(&values, in_dim, out_dim, kernel);
        let stem = format!("{}_int8", tensor.name);
        let x = &node.input[0];
        let [xq, x_scale, x_zero_point] = quantized_inputs
            .entry(x.clone())
            .or_insert_with(|| {
                let outputs = [
                    format!("{x}_quantized"),
                    format!("{x}_scale"),
                    format!("{x}_zero_point"),
                ];
                nodes.push(make_node(
                    "DynamicQuantizeLinear",
                    &format!("{x}_DynamicQuantizeLinear"),
                    &[x.as_str()],
                    &outputs.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
                outputs
            })
            .clone();
        let (wq, wzp, ws) = (
            format!("{stem}.weight_quantized"),
            format!("{stem}.weight_zero_point"),
            format!("{stem}.weight_scale"),
        );
        new_initializers.push(raw_tensor(&wq, q.data_type, &[in_dim, out_dim], q.values));
        new_initializers.push(raw_tensor(&wzp, q.data_type, &[out_dim], q.zero_points));
        new_initializers.push(raw_tensor(
            &ws,
            DataType::Float,
            &[out_dim],
            q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
        let (product, float_product, scale) = (
            format!("{stem}_product"),
            format!("{stem}_product_float"),
            format!("{stem}_scale"),
        );
        nodes.push(make_node(
            "MatMulInteger",
            &format!("{stem}_MatMulInteger"),
            &[&xq, &wq, &x_zero_point, &wzp],
            &[&product],
        ));
        let mut cast = make_node(
            "Cast",
            &format!("{stem}_Cast"),
            &[&product],
            &[&float_product],
        );
        cast.attribute.push(attr_int("to", DataType::Float as i64));
        nodes.push(cast);
        nodes.push(make_node(
            "Mul",
            &format!("{stem}_ScaleProduct"),
            &[&x_scale, &ws],
            &[&scale],
        ));
        nodes.push(make_node(
            "Mul",
            &format!("{stem}_Rescale"),
            &[&float_product, &scale],
            &[&node.output[0]],
        ));
        count += 1;
    }
    graph.node = nodes;
    graph.initializer.extend(new_initializers);
    Ok(count)
}

fn make_node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn raw_tensor(name: &str, data_type: DataType, dims: &[usize], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        data_type: data_type as i32,
        dims: dims.iter().map(|&d| d as i64).collect(),
        raw_data: raw,
        ..Default::default()
    }
}
