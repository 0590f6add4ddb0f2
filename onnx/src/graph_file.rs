//! Reading and writing `.onnx` files: decoding with clear errors for
//! truncated or foreign files, the interface (inputs, outputs, metadata),
//! and writing with external data for graphs over protobuf's 2 GB limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_onnx::onnx::{
    tensor_proto::DataLocation, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto,
    ModelProto, StringStringEntryProto, TensorProto, ValueInfoProto,
};
use prost::Message;

use crate::error::{Error, Result};

/// One graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    pub name: String,
    /// ONNX `TensorProto.DataType` (1 float, 7 int64, ...); 0 if not a tensor.
    pub elem_type: i32,
    /// Fixed sizes, `None` for named or unknown axes.
    pub dims: Vec<Option<i64>>,
    /// Names of the dynamic axes (`""` for fixed ones).
    pub dim_names: Vec<String>,
}

/// A decoded `.onnx` file.
pub struct GraphFile {
    path: PathBuf,
    pub model: ModelProto,
}

/// Protobuf cannot hold a message over 2 GiB; effir moves weights out well
/// before that.
pub const EXTERNAL_DATA_THRESHOLD: usize = 1 << 30;

impl GraphFile {
    /// Reads and decodes `path`, rejecting files that are not ONNX models.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.is_empty() {
            return Err(Error::graph(path, "empty file, not an ONNX model"));
        }
        let model = ModelProto::decode(bytes.as_slice()).map_err(|e| {
            Error::graph(
                path,
                format!("not a readable ONNX model (truncated or corrupt?): {e}"),
            )
        })?;
        let Some(graph) = &model.graph else {
            return Err(Error::graph(path, "not an ONNX model: no graph"));
        };
        if model.ir_version == 0 || model.opset_import.is_empty() || graph.node.is_empty() {
            return Err(Error::graph(
                path,
                "not an ONNX model (no IR version, opset or nodes; truncated or a different protobuf?)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            model,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn graph(&self) -> &candle_onnx::onnx::GraphProto {
        self.model.graph.as_ref().expect("checked in read")
    }

    /// Graph inputs that are not initializers.
    pub fn inputs(&self) -> Vec<IoInfo> {
        let g = self.graph();
        let initializers: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        g.input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(io_info)
            .collect()
    }

    pub fn outputs(&self) -> Vec<IoInfo> {
        self.graph().output.iter().map(io_info).collect()
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.model
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }

    /// The default-domain opset.
    pub fn opset(&self) -> Option<i64> {
        default_opset(&self.model)
    }

    /// Size of `last_hidden_state`'s last axis, if fixed.
    pub fn hidden_size(&self) -> Option<usize> {
        self.output_dim(crate::interface::LAST_HIDDEN_STATE, 2)
    }

    /// Size of `sentence_embedding`'s last axis, if fixed.
    pub fn embedding_size(&self) -> Option<usize> {
        self.output_dim(crate::interface::SENTENCE_EMBEDDING, 1)
    }

    fn output_dim(&self, name: &str, axis: usize) -> Option<usize> {
        self.outputs()
            .into_iter()
            .find(|o| o.name == name)
            .and_then(|o| o.dims.get(axis).copied().flatten())
            .map(|d| d as usize)
    }

    /// Rows of the table a `Gather` looks `input` up in (the token
    /// embeddings of `input_ids`), if that table is an initializer.
    pub fn embedding_rows(&self, input: &str) -> Option<usize> {
        let g = self.graph();
        let node = g
            .node
            .iter()
            .find(|n| n.op_type == "Gather" && n.input.get(1).map(String::as_str) == Some(input))?;
        let table = node.input.first()?;
        // Directly (every graph effir writes now), or through a Cast of the
        // whole table (half-precision graphs of earlier versions).
        let source = g
            .node
            .iter()
            .find(|n| n.output.first() == Some(table) && n.op_type == "Cast")
            .and_then(|n| n.input.first())
            .unwrap_or(table);
        g.initializer
            .iter()
            .find(|t| &t.name == source)
            .and_then(|t| t.dims.first())
            .map(|&d| d as usize)
    }

    /// The arithmetic of the graph's matrix products: `effir.precision` when
    /// effir wrote it, else `int8` for a graph with integer products (a
    /// third-party quantized export: `MatMulInteger`, `QLinearMatMul`,
    /// `DynamicQuantizeMatMul`, `MatMulIntegerToFloat`), else `fp32`.
    pub fn precision(&self) -> String {
        if let Some(p) = self.metadata("effir.precision") {
            return p.to_string();
        }
        const INTEGER_PRODUCTS: [&str; 4] = [
            "MatMulInteger",
            "QLinearMatMul",
            "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat",
        ];
        let integer = self
            .graph()
            .node
            .iter()
            .any(|n| INTEGER_PRODUCTS.contains(&n.op_type.as_str()));
        if integer { "int8" } else { "fp32" }.to_string()
    }

    /// How often each operator occurs, keyed `domain::Op` (`Op` for the
    /// default domain).
    pub fn op_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for node in &self.graph().node {
            let key = if node.domain.is_empty() || node.domain == "ai.onnx" {
                node.op_type.clone()
            } else {
                format!("{}::{}", node.domain, node.op_type)
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }
}

fn io_info(v: &ValueInfoProto) -> IoInfo {
    let mut info = IoInfo {
        name: v.name.clone(),
        elem_type: 0,
        dims: Vec::new(),
        dim_names: Vec::new(),
    };
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        info.elem_type = t.elem_type;
        for d in t.shape.iter().flat_map(|s| &s.dim) {
            match &d.value {
                Some(dimension::Value::DimValue(n)) => {
                    info.dims.push(Some(*n));
                    info.dim_names.push(String::new());
                }
                Some(dimension::Value::DimParam(p)) => {
                    info.dims.push(None);
                    info.dim_names.push(p.clone());
                }
                None => {
                    info.dims.push(None);
                    info.dim_names.push(String::new());
                }
            }
        }
    }
    info
}

/// The default-domain opset of `model`.
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
}

/// The values of a float32 tensor of a graph, held in `raw_data`,
/// `float_data` or external data (relative to `base`, the graph's
/// directory; only this tensor's bytes are read); `None` for other types.
pub fn float_values(t: &TensorProto, base: &Path) -> Result<Option<Vec<f32>>> {
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

/// The bytes a graph takes on disk: the `.onnx` file and, when
/// [`write_model`] moved its weights out, the `<file>_data` beside it.
pub fn graph_bytes(graph: &Path) -> Result<u64> {
    let graph_len = std::fs::metadata(graph)
        .map_err(|e| Error::io(graph, e))?
        .len();
    let data = graph.with_extension("onnx_data");
    Ok(graph_len + std::fs::metadata(data).map_or(0, |m| m.len()))
}

/// Serialises `model` into `dir/file_name`, moving initializers into
/// `dir/<file_name>_data` when `external` is true. Files are written as
/// given; the caller stages `dir` and renames it into place.
pub fn write_model(
    mut model: ModelProto,
    dir: &Path,
    file_name: &str,
    external: bool,
) -> Result<()> {
    if external {
        let mut data = ExternalDataFile::create(dir, file_name)?;
        if let Some(graph) = model.graph.as_mut() {
            for tensor in &mut graph.initializer {
                data.move_out(tensor);
            }
        }
        data.close()?;
    }
    let bytes = model.encode_to_vec();
    let path = dir.join(file_name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    Ok(())
}

/// The `<graph>_data` file initializers are moved into as they are made
/// (a streamed export never holds the weights) or when a graph is written.
pub struct ExternalDataFile {
    path: PathBuf,
    location: String,
    out: std::io::BufWriter<std::fs::File>,
    offset: u64,
    /// The first write error, reported by [`ExternalDataFile::close`].
    error: Option<std::io::Error>,
}

impl ExternalDataFile {
    /// Creates `dir/<graph_file>_data`.
    pub fn create(dir: &Path, graph_file: &str) -> Result<Self> {
        let location = format!("{graph_file}_data");
        let path = dir.join(&location);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            location,
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            offset: 0,
            error: None,
        })
    }

    /// Moves `tensor`'s raw data (1 KiB or more; smaller ones stay in the
    /// graph) to the end of the file, 4 KiB-aligned so ONNX Runtime can
    /// memory-map it, and points the tensor there. After a write error the
    /// data is dropped (the graph is unusable; [`ExternalDataFile::close`]
    /// reports the error), so a failing streamed export does not gather
    /// the remaining weights in memory.
    pub fn move_out(&mut self, tensor: &mut TensorProto) {
        use std::io::Write;
        if tensor.raw_data.len() < 1024 {
            return;
        }
        if self.error.is_some() {
            tensor.raw_data = Vec::new();
            return;
        }
        let offset = self.offset.next_multiple_of(4096);
        let padding = vec![0u8; (offset - self.offset) as usize];
        let written = self
            .out
            .write_all(&padding)
            .and_then(|_| self.out.write_all(&tensor.raw_data));
        if let Err(e) = written {
            self.error = Some(e);
            tensor.raw_data = Vec::new();
            return;
        }
        let length = tensor.raw_data.len();
        self.offset = offset + length as u64;
        tensor.raw_data = Vec::new();
        tensor.data_location = DataLocation::External as i32;
        tensor.external_data = vec![
            entry("location", &self.location),
            entry("offset", &offset.to_string()),
            entry("length", &length.to_string()),
        ];
    }

    /// Flushes the file; the first write error, if any, is returned here.
    pub fn close(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(Error::io(&self.path, e));
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// Bytes of all initializers (the size the protobuf would have).
pub fn initializer_bytes(model: &ModelProto) -> usize {
    model
        .graph
        .as_ref()
        .map_or(0, |g| g.initializer.iter().map(|t| t.raw_data.len()).sum())
}
