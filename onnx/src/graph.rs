//! Building an ONNX graph node by node: unique value names, initializers,
//! constants, and one helper per operator the emitters use. Produces the
//! protobuf types of `candle-onnx`.

use std::collections::HashMap;

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

use crate::error::{Error, Result};
use crate::graph_file::ExternalDataFile;
use crate::precision::MatmulPrecision;

/// The element type of a graph input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    Float32,
    Float16,
    Int64,
    Bool,
}

impl ElementType {
    pub fn data_type(self) -> DataType {
        match self {
            Self::Float32 => DataType::Float,
            Self::Float16 => DataType::Float16,
            Self::Int64 => DataType::Int64,
            Self::Bool => DataType::Bool,
        }
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A named dynamic axis (`batch_size`, `sequence_length`).
    Dynamic(String),
}

/// How weights are stored in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    #[default]
    Float32,
    /// Matrices stored as float16 and cast to float32 where they are used:
    /// half the file size, float32 arithmetic.
    Float16,
    /// Matrices stored as bfloat16 (a bf16 checkpoint's own values, no
    /// rounding) and cast to float32 where they are used.
    BFloat16,
}

/// A half-precision storage: the stored name's suffix, the ONNX type, and
/// the conversion of one value to its little-endian bytes.
type HalfPrecision = (&'static str, DataType, fn(f32) -> [u8; 2]);

impl WeightStorage {
    /// How matrices are stored, when not as float32.
    fn half_precision(self) -> Option<HalfPrecision> {
        match self {
            Self::Float16 => Some(("fp16", DataType::Float16, |x| {
                half::f16::from_f32(x).to_le_bytes()
            })),
            Self::BFloat16 => Some(("bf16", DataType::Bfloat16, |x| {
                half::bf16::from_f32(x).to_le_bytes()
            })),
            Self::Float32 => None,
        }
    }

    /// The name effir's metadata and summaries give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
            Self::BFloat16 => "bfloat16",
        }
    }
}

/// A weight's initializer being filled ([`GraphBuilder::begin_weight`]):
/// float32 values in, stored bytes out.
pub struct StoredWeight {
    name: String,
    dims: Vec<i64>,
    half: Option<HalfPrecision>,
    raw: Vec<u8>,
}

impl StoredWeight {
    /// The bytes the whole tensor takes as stored.
    fn stored_len(&self) -> usize {
        let values = self.dims.iter().product::<i64>().max(0) as usize;
        values * if self.half.is_some() { 2 } else { 4 }
    }

    /// Appends `values`, converted to the stored precision.
    pub fn extend(&mut self, values: &[f32]) {
        match self.half {
            Some((_, _, convert)) => self.raw.extend(values.iter().flat_map(|&x| convert(x))),
            None => self.raw.extend(values.iter().flat_map(|x| x.to_le_bytes())),
        }
    }
}

/// A graph under construction.
pub struct GraphBuilder {
    opset: i64,
    storage: WeightStorage,
    nodes: Vec<NodeProto>,
    /// The `Cast`s of half-precision weights, which lead the node list
    /// (see [`GraphBuilder::weight`]).
    weight_casts: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    used_names: HashMap<String, usize>,
    /// Constants by content, so each is stored once.
    constants: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
    /// How [`crate::emit::layers::linear`] computes its products.
    matmul_precision: MatmulPrecision,
    /// `DynamicQuantizeLinear` outputs by input, so the products reading
    /// one tensor (q, k and v) share one.
    quantized_activations: HashMap<String, [String; 3]>,
    /// Where initializers go as they are made (streamed export).
    external_data: Option<ExternalDataFile>,
    /// Bytes of the initializers made so far, wherever they went.
    initializer_bytes: usize,
}

impl GraphBuilder {
    pub fn new(opset: i64, storage: WeightStorage) -> Self {
        Self {
            opset,
            storage,
            nodes: Vec::new(),
            weight_casts: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            used_names: HashMap::new(),
            constants: HashMap::new(),
            matmul_precision: MatmulPrecision::Float32,
            quantized_activations: HashMap::new(),
            external_data: None,
            initializer_bytes: 0,
        }
    }

    /// Writes every initializer of 1 KiB or more into `data` as soon as it
    /// is made, so the graph under construction holds no weights.
    pub fn with_external_data(mut self, data: ExternalDataFile) -> Self {
        self.external_data = Some(data);
        self
    }

    /// The external data file, to be closed once the graph is finished.
    pub fn take_external_data(&mut self) -> Option<ExternalDataFile> {
        self.external_data.take()
    }

    /// Bytes of the initializers made so far (in the graph or moved out).
    pub fn initializer_bytes(&self) -> usize {
        self.initializer_bytes
    }

    /// A builder for nodes to splice into `graph`: every value and node
    /// name the graph has is taken, so nothing built clashes with it.
    pub fn editing(graph: &GraphProto, opset: i64) -> Self {
        let mut builder = Self::new(opset, WeightStorage::Float32);
        for name in graph
            .input
            .iter()
            .map(|v| &v.name)
            .chain(graph.initializer.iter().map(|t| &t.name))
            .chain(
                graph
                    .node
                    .iter()
                    .flat_map(|n| n.output.iter().chain([&n.name])),
            )
        {
            builder.reserve(name);
        }
        builder
    }

    pub fn matmul_precision(&self) -> MatmulPrecision {
        self.matmul_precision
    }

    /// Sets how the linear layers emitted from now on compute their products.
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) {
        self.matmul_precision = precision;
    }

    /// `DynamicQuantizeLinear(x)`: `[quantized, scale, zero_point]`, added
    /// once per `x`.
    pub fn dynamic_quantize(&mut self, x: &str) -> [String; 3] {
        if let Some(q) = self.quantized_activations.get(x) {
            return q.clone();
        }
        let outputs = [
            self.unique(&format!("{x}_quantized")),
            self.unique(&format!("{x}_scale")),
            self.unique(&format!("{x}_zero_point")),
        ];
        let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        self.push_node("DynamicQuantizeLinear", &[x], &refs, vec![]);
        self.quantized_activations
            .insert(x.to_string(), outputs.clone());
        outputs
    }

    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// A value name not used before, derived from `hint`.
    pub fn unique(&mut self, hint: &str) -> String {
        // `hint`, then `hint_1`, `hint_2`, ...: the first not taken, also
        // by a name reserved or generated from another hint.
        loop {
            let count = self.used_names.entry(hint.to_string()).or_insert(0);
            *count += 1;
            let name = if *count == 1 {
                hint.to_string()
            } else {
                format!("{hint}_{}", *count - 1)
            };
            if name == hint || !self.used_names.contains_key(&name) {
                self.used_names.entry(name.clone()).or_insert(1);
                return name;
            }
        }
    }

    pub fn input(&mut self, name: &str, element: ElementType, dims: &[Dim]) -> String {
        self.used_names.insert(name.to_string(), 1);
        self.inputs.push(value_info(name, element, dims));
        name.to_string()
    }

    /// Declares `value` a graph output called `name`.
    pub fn output(&mut self, value: &str, name: &str, element: ElementType, dims: &[Dim]) {
        let value = if value == name {
            value.to_string()
        } else {
            self.node_named("Identity", &[value], name, vec![])
        };
        self.outputs.push(value_info(&value, element, dims));
    }

    /// Adds a node with one output named after `op`; returns the output.
    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let hint = format!("/{}", op);
        let output = self.unique(&hint);
        self.push_node(op, inputs, &[&output], attributes);
        output
    }

    /// Adds a node whose output is called `output` (unique-fied).
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<AttributeProto>,
    ) -> String {
        let output = self.unique(output);
        self.push_node(op, inputs, &[&output], attributes);
        output
    }

    fn push_node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) {
        let node = self.new_node(op, inputs, outputs, attribute);
        self.nodes.push(node);
    }

    /// A node named after its first output, not yet placed in the graph.
    fn new_node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: self.unique(&format!("{}_node", outputs[0])),
            op_type: op.to_string(),
            attribute,
            ..Default::default()
        }
    }

    /// A float32 weight called `name`, stored as the builder's
    /// [`WeightStorage`] says; returns the float32 value to use.
    ///
    /// A half-precision weight's `Cast` to float32 goes to the front of the
    /// graph's node list (reading only an initializer, it keeps the list in
    /// topological order). ONNX Runtime's default execution order (its
    /// `GraphViewer`, checked on 1.32: not a documented guarantee) is a
    /// depth-first walk back from the outputs that visits a node's
    /// higher-indexed inputs first; with every weight's `Cast` indexed
    /// below the computation, each runs just before the product that reads
    /// it, so the float32 copies exist one at a time instead of all from
    /// the start (when the session keeps the graph as stored: ONNX
    /// Runtime's optimizers fold the casts into float32 weights).
    ///
    /// Panics when `data` does not hold `dims`' element count: callers pass
    /// tensors they built to that shape, so a mismatch is a bug here, not
    /// bad input.
    pub fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        assert_eq!(
            data.len(),
            dims.iter().product::<usize>(),
            "{name}: {} values for a {dims:?} weight",
            data.len()
        );
        let mut stored = self.begin_weight(name, dims);
        stored.extend(data);
        let half = stored.half.is_some();
        let stored = self.push_stored(stored);
        if !half {
            return stored;
        }
        let value = self.unique(name);
        let cast = self.new_node(
            "Cast",
            &[&stored],
            &[&value],
            vec![attr_int("to", DataType::Float as i64)],
        );
        self.weight_casts.push(cast);
        value
    }

    /// Rows `indices` of an embedding table as float32; `stored` holds the
    /// whole table ([`GraphBuilder::begin_weight`], filled block by block).
    /// A half-precision table is gathered first and its rows cast, so no
    /// float32 copy of the whole table is made (the values are the same:
    /// the cast is element by element).
    pub fn embedding_rows(&mut self, stored: StoredWeight, indices: &str) -> Result<String> {
        let half = stored.half.is_some();
        let table = self.push_weight(stored)?;
        let rows = self.gather(&table, indices, 0);
        Ok(if half {
            self.cast(&rows, DataType::Float)
        } else {
            rows
        })
    }

    /// A float32 weight `name` of shape `dims` about to be stored as the
    /// builder's [`WeightStorage`] says (half precision for matrices): its
    /// values go in with [`StoredWeight::extend`], in order, in as many
    /// pieces as the caller reads them.
    pub fn begin_weight(&mut self, name: &str, dims: &[usize]) -> StoredWeight {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let half = self.storage.half_precision().filter(|_| dims.len() >= 2);
        let name = match half {
            Some((suffix, _, _)) => self.unique(&format!("{name}_{suffix}")),
            None => self.unique(name),
        };
        let mut stored = StoredWeight {
            name,
            dims,
            half,
            raw: Vec::new(),
        };
        stored.raw.reserve_exact(stored.stored_len());
        stored
    }

    /// Adds a filled weight's initializer, checked to hold as many values
    /// as its shape says; returns its name.
    fn push_weight(&mut self, stored: StoredWeight) -> Result<String> {
        if stored.raw.len() != stored.stored_len() {
            return Err(Error::Export(format!(
                "{}: {} bytes stored for a {:?} tensor, which takes {}",
                stored.name,
                stored.raw.len(),
                stored.dims,
                stored.stored_len()
            )));
        }
        Ok(self.push_stored(stored))
    }

    /// Adds a weight's initializer; returns its name.
    fn push_stored(&mut self, stored: StoredWeight) -> String {
        let data_type = stored.half.map_or(DataType::Float, |(_, t, _)| t);
        self.push_initializer(&stored.name, data_type, stored.dims, stored.raw);
        stored.name
    }

    /// An initializer stored as given (`raw` little-endian values of
    /// `data_type`), e.g. quantized weights; returns its name.
    pub fn raw_weight(
        &mut self,
        name: &str,
        data_type: DataType,
        dims: &[usize],
        raw: Vec<u8>,
    ) -> String {
        let name = self.unique(name);
        let dims = dims.iter().map(|&d| d as i64).collect();
        self.push_initializer(&name, data_type, dims, raw);
        name
    }

    fn push_initializer(&mut self, name: &str, data_type: DataType, dims: Vec<i64>, raw: Vec<u8>) {
        self.initializer_bytes += raw.len();
        let mut tensor = TensorProto {
            dims,
            data_type: data_type as i32,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        };
        if let Some(data) = self.external_data.as_mut() {
            data.move_out(&mut tensor);
        }
        self.initializers.push(tensor);
    }

    fn constant(&mut self, data_type: DataType, dims: Vec<i64>, raw: Vec<u8>) -> String {
        let key = (data_type as i32, dims.clone(), raw.clone());
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = self.unique("/const");
        self.push_initializer(&name, data_type, dims, raw);
        self.constants.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(DataType::Int64, vec![values.len() as i64], raw)
    }

    /// A scalar int64 constant.
    pub fn int_scalar(&mut self, value: i64) -> String {
        self.constant(DataType::Int64, vec![], value.to_le_bytes().to_vec())
    }

    /// A scalar float32 constant.
    pub fn float_scalar(&mut self, value: f32) -> String {
        self.constant(DataType::Float, vec![], value.to_le_bytes().to_vec())
    }

    /// A 1-D float32 constant.
    pub fn floats(&mut self, values: &[f32]) -> String {
        let raw = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(DataType::Float, vec![values.len() as i64], raw)
    }

    // ---- operators -------------------------------------------------------

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.node("Add", &[a, b], vec![])
    }

    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.node("Sub", &[a, b], vec![])
    }

    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.node("Mul", &[a, b], vec![])
    }

    pub fn div(&mut self, a: &str, b: &str) -> String {
        self.node("Div", &[a, b], vec![])
    }

    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.node("MatMul", &[a, b], vec![])
    }

    pub fn unary(&mut self, op: &str, x: &str) -> String {
        self.node(op, &[x], vec![])
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let shape = self.ints(shape);
        self.node("Reshape", &[x, &shape], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.ints(axes);
        self.node("Unsqueeze", &[x, &axes], vec![])
    }

    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.ints(axes);
        self.node("Squeeze", &[x, &axes], vec![])
    }

    pub fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.node("Concat", xs, vec![attr_int("axis", axis)])
    }

    /// `x[..., start:end]` on `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let starts = self.ints(&[start]);
        let ends = self.ints(&[end]);
        let axes = self.ints(&[axis]);
        self.node("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    pub fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    pub fn gather(&mut self, data: &str, indices: &str, axis: i64) -> String {
        self.node("Gather", &[data, indices], vec![attr_int("axis", axis)])
    }

    pub fn softmax(&mut self, x: &str, axis: i64) -> String {
        self.node("Softmax", &[x], vec![attr_int("axis", axis)])
    }

    /// `ReduceMean`/`ReduceSum`/`ReduceMax`/`ReduceL2` over `axes`, with
    /// axes as an input from the opset that made them one.
    pub fn reduce(&mut self, op: &str, x: &str, axes: &[i64], keep_dims: bool) -> String {
        // ReduceSum takes axes as an input from opset 13, the others from 18.
        let axes_as_input = if op == "ReduceSum" {
            self.opset >= 13
        } else {
            self.opset >= 18
        };
        let keep = attr_int("keepdims", keep_dims as i64);
        if axes_as_input {
            let axes = self.ints(axes);
            self.node(op, &[x, &axes], vec![keep])
        } else {
            self.node(op, &[x], vec![attr_ints("axes", axes), keep])
        }
    }

    pub fn where_(&mut self, condition: &str, a: &str, b: &str) -> String {
        self.node("Where", &[condition, a, b], vec![])
    }

    /// Marks `name`, a value of a graph being edited, as taken, so no value
    /// built from now on is called that.
    pub fn reserve(&mut self, name: &str) {
        self.used_names.entry(name.to_string()).or_insert(1);
    }

    /// The nodes and initializers built so far, leaving the builder's names
    /// (and shared constants and quantized activations) in place: for
    /// splicing into a graph being edited.
    pub fn take_built(&mut self) -> (Vec<NodeProto>, Vec<TensorProto>) {
        (self.take_nodes(), std::mem::take(&mut self.initializers))
    }

    /// The nodes built so far: the weights' casts, then the rest.
    fn take_nodes(&mut self) -> Vec<NodeProto> {
        let mut nodes = std::mem::take(&mut self.weight_casts);
        nodes.append(&mut self.nodes);
        nodes
    }

    /// Finishes the graph.
    pub fn finish(mut self, name: &str) -> GraphProto {
        GraphProto {
            node: self.take_nodes(),
            name: name.to_string(),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        }
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, element: ElementType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::Dynamic(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: element.data_type() as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
