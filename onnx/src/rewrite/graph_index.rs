//! The graph as the passes read it: where each weight lives, which node
//! produces and consumes each value, and weight hashes (their values come
//! from [`crate::graph_file::float_values`]).

use std::collections::HashMap;

use candle_onnx::onnx::{GraphProto, NodeProto};

/// Where a graph weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Initializer(usize),
    /// A `Constant` node's `value`.
    Constant(usize),
}

pub(super) struct Index {
    pub(super) producer: HashMap<String, usize>,
    pub(super) consumers: HashMap<String, Vec<usize>>,
}

pub(super) fn index(nodes: &[NodeProto]) -> Index {
    let mut producer = HashMap::new();
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.clone(), i);
        }
        for x in &n.input {
            consumers.entry(x.clone()).or_default().push(i);
        }
    }
    Index {
        producer,
        consumers,
    }
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
