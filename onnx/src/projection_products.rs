//! The transformer's projection products in a graph effir emitted (the
//! `MatMul`s by attention Q/K/V/output and MLP gate/up/down matrices; never
//! the embedding tables or the pooling/Dense head), and replacing such
//! products by other sub-graphs in place: the passes that change a
//! product's arithmetic after emission ([`crate::half_precision`],
//! [`crate::qdq`], and `rewrite`'s int8 pass) splice through
//! [`splice_products`].

use std::collections::{HashMap, HashSet};

use candle_onnx::onnx::{tensor_proto::DataType, GraphProto, NodeProto, TensorProto};
use effir_pipeline::model::arch::checkpoint_map::Projection;
use effir_pipeline::Architecture;

use crate::error::{Error, Result};
use crate::graph::GraphBuilder;

/// One projection `MatMul(x, Wᵀ)` of an emitted graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionProduct {
    /// Index of the `MatMul` in `graph.node`.
    pub node: usize,
    /// The checkpoint module of the projection, under its layer's path.
    pub module: String,
    pub layer: usize,
    pub role: Projection,
    /// The activation multiplied (`x`) and the product.
    pub input: String,
    pub output: String,
    /// Index of the float32 `(in, out)` matrix in `graph.initializer`.
    pub weight: usize,
}

/// The projection products of a graph `effir export` emitted for a model of
/// `arch`, in graph order. Their weights are float32 initializers named
/// `{module}.weight_t`, as the emitter names them.
pub fn projection_products(graph: &GraphProto, arch: Architecture) -> Vec<ProjectionProduct> {
    let initializers: HashMap<&str, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .filter(|(_, t)| t.data_type == DataType::Float as i32 && t.dims.len() == 2)
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "MatMul" && n.input.len() == 2)
        .filter_map(|(i, n)| {
            let weight = *initializers.get(n.input[1].as_str())?;
            let module = n.input[1].strip_suffix(".weight_t")?;
            ProjectionProduct::at(i, n, module, weight, arch)
        })
        .collect()
}

impl ProjectionProduct {
    /// The product `MatMul` node `node` (index `index`) computes by the
    /// matrix of checkpoint module `module` (initializer `weight`), if
    /// `module` is one of `arch`'s layer projections.
    pub fn at(
        index: usize,
        node: &NodeProto,
        module: &str,
        weight: usize,
        arch: Architecture,
    ) -> Option<Self> {
        let (layer, role) = arch.checkpoint().locate_projection(module)?;
        Some(Self {
            node: index,
            module: module.to_string(),
            layer,
            role,
            input: node.input[0].clone(),
            output: node.output[0].clone(),
            weight,
        })
    }
}

/// Replaces each `MatMul` at a key of `products` (node index → index of its
/// weight initializer) by the nodes `build(builder, x, weight)` adds, whose
/// last node computes the product: it is renamed to write the `MatMul`'s
/// own output, so the rest of the graph is untouched. New names never
/// clash with the graph's; weights no node reads any more are removed.
/// Returns how many products were replaced.
pub fn splice_products(
    graph: &mut GraphProto,
    opset: i64,
    products: &HashMap<usize, usize>,
    build: &mut dyn FnMut(&mut GraphBuilder, &str, &TensorProto) -> Result<String>,
) -> Result<usize> {
    let mut builder = GraphBuilder::editing(graph, opset);
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut added = Vec::new();
    let mut count = 0;
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        let Some(&w) = products.get(&i) else {
            nodes.push(node);
            continue;
        };
        let product = build(&mut builder, &node.input[0], &graph.initializer[w])?;
        let (mut chain, initializers) = builder.take_built();
        let last = chain.last_mut().ok_or_else(|| {
            Error::Export(format!(
                "no nodes were built for the product {}",
                node.output[0]
            ))
        })?;
        debug_assert_eq!(last.output, [product]);
        last.output = node.output.clone();
        nodes.extend(chain);
        added.extend(initializers);
        count += 1;
    }
    graph.node = nodes;
    graph.initializer.extend(added);
    drop_unread_initializers(graph);
    Ok(count)
}

/// Removes initializers no node reads and no graph output returns (and
/// their entries among the graph inputs, where older exports list them).
fn drop_unread_initializers(graph: &mut GraphProto) {
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    let unread: HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| !read.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    graph.initializer.retain(|t| !unread.contains(&t.name));
    graph.input.retain(|i| !unread.contains(&i.name));
}
