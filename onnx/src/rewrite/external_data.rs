//! Pass 1: weights held in external data come inline.

use std::path::Path;

use candle_onnx::onnx::{tensor_proto::DataLocation, tensor_proto::DataType, GraphProto};

use crate::error::{Error, Result};
use crate::graph_file::float_values;

/// Brings weights held in external data into the graph, so that no tensor
/// keeps pointing into the original's data file (the output's is written
/// anew). Returns whether the graph used external data.
pub(super) fn inline_external_data(
    graph: &mut GraphProto,
    graph_path: &Path,
    base: &Path,
) -> Result<bool> {
    let mut used = false;
    for t in graph.initializer.iter_mut() {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        used = true;
        if t.data_type != DataType::Float as i32 {
            return Err(Error::graph(
                graph_path,
                format!(
                    "{}: external data of a non-float tensor is not supported",
                    t.name
                ),
            ));
        }
        let values = float_values(t, base)?.expect("float tensor");
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.data_location = DataLocation::Default as i32;
        t.external_data.clear();
    }
    Ok(used)
}
