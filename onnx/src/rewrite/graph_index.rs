//! The graph as the passes read it: where each weight lives, which node
//! produces and consumes each value, and weight values and their hashes.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::{
    tensor_proto::DataLocation, tensor_proto::DataType, GraphProto, NodeProto, TensorProto,
};

use crate::error::{Error, Result};

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

pub(super) fn float_values(t: &TensorProto, base: &Path) -> Result<Option<Vec<f32>>> {
    if t.data_type != DataType::Float as i32 {
        return Ok(None);
    }
    if t.data_location == DataLocation::External as i32 {
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let location = get("location").ok_or_else(|| {
            Error::graph(base, format!("{}: external data without location", t.name))
        })?;
        let offset: u64 = get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
        let path = base.join(location);
        let count: usize = t.dims.iter().product::<i64>() as usize;
        // Only this tensor's bytes are read.
        let mut bytes = vec![0u8; count * 4];
        let mut read = || -> std::io::Result<()> {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut bytes)
        };
        read().map_err(|e| {
            Error::graph(
                &path,
                format!(
                    "{}: cannot read its external data (truncated?): {e}",
                    t.name
                ),
            )
        })?;
        return Ok(Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ));
    }
    if !t.raw_data.is_empty() {
        return Ok(Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ));
    }
    Ok(Some(t.float_data.clone()))
}

pub(super) fn hash(values: &[f32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}
