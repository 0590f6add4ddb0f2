//! Pass 4: matched weights get the new model's values; dead nodes and
//! initializers go.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_onnx::onnx::{attribute_proto::AttributeType, tensor_proto::DataLocation, GraphProto};
use effir_pipeline::Architecture;

use super::graph_index::Source;
use super::weight_matching::{Checkpoint, Orientation};
use crate::error::{Error, Result};

/// Gives every matched weight the pruned model's values (those of dropped
/// MLPs are skipped: their nodes are dead). Returns how many were replaced.
pub(super) fn replace_weights(
    graph: &mut GraphProto,
    assigned: &HashMap<Source, (String, Orientation)>,
    target: &Checkpoint,
    arch: Architecture,
    dropped: &[usize],
    model_dir: &Path,
) -> Result<usize> {
    let dropped_names: HashSet<String> = dropped
        .iter()
        .flat_map(|&l| {
            let t = arch.checkpoint().mlp_tensors("", l);
            t.rows.into_iter().chain([t.down]).chain(t.others)
        })
        .collect();
    let mut replaced = 0;
    for (s, (name, orientation)) in assigned {
        let Some((dims, values)) = target.oriented(name, *orientation) else {
            if dropped_names.contains(name) {
                continue;
            }
            return Err(Error::InvalidArgument(format!(
                "{}: has no tensor `{name}`, which the graph uses",
                model_dir.display()
            )));
        };
        let tensor = match s {
            Source::Initializer(i) => &mut graph.initializer[*i],
            Source::Constant(i) => graph.node[*i]
                .attribute
                .iter_mut()
                .find(|a| a.name == "value" && a.r#type == AttributeType::Tensor as i32)
                .and_then(|a| a.t.as_mut())
                .expect("constant value"),
        };
        tensor.dims = dims;
        tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor.float_data.clear();
        tensor.data_location = DataLocation::Default as i32;
        tensor.external_data.clear();
        replaced += 1;
    }
    Ok(replaced)
}

/// Removes nodes none of whose outputs is used (transitively) and
/// initializers nothing reads.
pub(super) fn remove_dead(graph: &mut GraphProto) {
    loop {
        let mut used: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for n in &graph.node {
            used.extend(n.input.iter().cloned());
            // Subgraphs (If/Loop) read outer values too.
            for a in &n.attribute {
                if let Some(g) = &a.g {
                    for sn in &g.node {
                        used.extend(sn.input.iter().cloned());
                    }
                    used.extend(g.output.iter().map(|o| o.name.clone()));
                }
            }
        }
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.iter().any(|o| used.contains(o)));
        if graph.node.len() == before {
            graph.initializer.retain(|t| used.contains(&t.name));
            return;
        }
    }
}
