//! Pass 3: each dropped MLP's block is located from its down projection
//! and cut out, its residual stream rewired.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_onnx::onnx::{GraphProto, NodeProto};
use effir_pipeline::{Architecture, ModelShape};

use super::graph_index::{value_of, Source};
use super::weight_matching::WeightMatch;
use crate::node_index::NodeIndex;

/// For each layer whose MLP the pruned model dropped, the value the MLP
/// block outputs and the value entering it (block output, block input),
/// found from the layer's down projection; and what could not be located.
/// Every layer's down projection must be found and used by MatMul or Gemm
/// only, so that a graph this code does not understand is refused.
pub(super) fn locate_dropped_mlps(
    graph: &GraphProto,
    idx: &NodeIndex,
    arch: Architecture,
    shape: &ModelShape,
    weights: &WeightMatch,
) -> (BTreeMap<usize, (String, String)>, Vec<String>) {
    let by_name: HashMap<&str, Source> = weights
        .assigned
        .iter()
        .map(|(s, (n, _))| (n.as_str(), *s))
        .collect();
    let mut missing = Vec::new();
    let mut blocks: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for (l, layer) in shape.layers.iter().enumerate() {
        let names = arch.checkpoint().mlp_tensors("", l);
        let Some(down) = by_name.get(names.down.as_str()) else {
            missing.push(format!("layer {l}: no graph weight equals {}", names.down));
            continue;
        };
        let down_value = value_of(graph, down);
        let users: Vec<usize> = idx.consumers.get(&down_value).cloned().unwrap_or_default();
        let unknown: Vec<String> = users
            .iter()
            .map(|&c| &graph.node[c])
            .filter(|n| !matches!(n.op_type.as_str(), "MatMul" | "Gemm" | "Transpose"))
            .map(|n| {
                if n.domain.is_empty() {
                    n.op_type.clone()
                } else {
                    format!("{}::{}", n.domain, n.op_type)
                }
            })
            .collect();
        if users.is_empty() || !unknown.is_empty() {
            missing.push(format!(
                "layer {l}: the down projection is used by [{}], expected MatMul or Gemm",
                unknown.join(", ")
            ));
            continue;
        }
        if layer.mlp.is_some() {
            continue;
        }
        match dropped_mlp_block(graph, idx, arch, &weights.by_value, &users, l) {
            Ok(block) => {
                blocks.insert(l, block);
            }
            Err(m) => missing.push(m),
        }
    }
    (blocks, missing)
}

/// Layer `l`'s MLP block, from the users of its down projection. The block
/// ends at the residual Add: the first node downstream of the down
/// projection that adds a value computed from the MLP (through biases,
/// reshapes, casts or a post-norm such as Gemma's) to one that is not,
/// and not a constant; that other value is the block's input. For post-LN
/// BERT the LayerNorm after the residual Add goes with the block. Returns
/// (block output, block input).
pub(super) fn dropped_mlp_block(
    graph: &GraphProto,
    idx: &NodeIndex,
    arch: Architecture,
    by_value: &HashMap<String, Source>,
    down_users: &[usize],
    l: usize,
) -> std::result::Result<(String, String), String> {
    let down = down_users
        .iter()
        .copied()
        .find(|&c| matches!(graph.node[c].op_type.as_str(), "MatMul" | "Gemm"))
        .ok_or_else(|| format!("layer {l}: the down projection is not used by a MatMul or Gemm"))?;
    let is_constant = |x: &String| {
        by_value.contains_key(x)
            || graph.initializer.iter().any(|t| &t.name == x)
            || idx
                .producer
                .get(x)
                .is_some_and(|&p| graph.node[p].op_type == "Constant")
    };
    // Values computed from the MLP's output; nodes are in topological order.
    let mut from_mlp: HashSet<&String> = graph.node[down].output.iter().collect();
    let mut residual = None;
    for node in &graph.node[down + 1..] {
        let inside: Vec<&String> = node.input.iter().filter(|x| from_mlp.contains(x)).collect();
        if inside.is_empty() {
            continue;
        }
        if node.op_type == "Add" && inside.len() == 1 && node.input.len() == 2 {
            let other = node.input.iter().find(|x| !from_mlp.contains(x));
            if let Some(x) = other.filter(|x| !is_constant(x)) {
                residual = Some((node, x.clone()));
                break;
            }
        }
        from_mlp.extend(node.output.iter());
    }
    let (r, x) = residual.ok_or_else(|| {
        format!("layer {l}: no residual Add after the down projection (the MLP's output is never added to the stream)")
    })?;
    let block_output = if arch.checkpoint().mlp.norms.residual.is_some() {
        // Post-LN: the LayerNorm after the residual goes with the MLP.
        let cs = idx.consumers.get(&r.output[0]).cloned().unwrap_or_default();
        match cs.as_slice() {
            [c] if graph.node[*c].op_type == "LayerNormalization" => {
                graph.node[*c].output[0].clone()
            }
            _ => return Err(format!(
                "layer {l}: the residual Add is not followed by one LayerNormalization (decomposed LayerNorm is not supported; export with opset >= 17)"
            )),
        }
    } else {
        r.output[0].clone()
    };
    Ok((block_output, x))
}

/// Cuts dropped MLP blocks out: each block's output becomes its input.
pub(super) fn cut_out_mlps(
    graph: &mut GraphProto,
    idx: &NodeIndex,
    blocks: &BTreeMap<usize, (String, String)>,
) {
    for (block_output, block_input) in blocks.values() {
        let p = idx.producer[block_output];
        graph.node[p] = NodeProto {
            input: vec![block_input.clone()],
            output: vec![block_output.clone()],
            name: format!("{block_output}_effir_identity"),
            op_type: "Identity".into(),
            ..Default::default()
        };
    }
}
