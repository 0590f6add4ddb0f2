//! The graph as the passes read it: where each weight lives and weight
//! hashes (their values come from [`crate::graph_file::float_values`]);
//! which node produces and consumes each value is [`crate::node_index`].

use candle_onnx::onnx::GraphProto;

/// Where a graph weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Initializer(usize),
    /// A `Constant` node's `value`.
    Constant(usize),
}

/// The value name a weight source feeds into the graph.
pub(super) fn value_of(graph: &GraphProto, s: &Source) -> String {
    match s {
        Source::Initializer(i) => graph.initializer[*i].name.clone(),
        Source::Constant(i) => graph.node[*i].output[0].clone(),
    }
}

pub(super) fn hash(values: &[f32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}
