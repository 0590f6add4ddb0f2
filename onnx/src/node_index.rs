//! Which node produces each value of a graph and which nodes read it: the
//! index the graph passes walk (rewrite's weight matching and MLP surgery,
//! smoothing's folds, validate's search for where a NaN starts).

use std::collections::HashMap;

use candle_onnx::onnx::NodeProto;

/// Node indices by value name.
pub struct NodeIndex {
    pub producer: HashMap<String, usize>,
    /// Every reader of a value, once per input slot it fills, in node order.
    pub consumers: HashMap<String, Vec<usize>>,
}

impl NodeIndex {
    pub fn new(nodes: &[NodeProto]) -> Self {
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
        Self {
            producer,
            consumers,
        }
    }
}
