//! effir-onnx: the product side of effir. It emits a slimmed ONNX graph from
//! an (unpruned, pruned or fine-tuned) model directory, runs graphs under
//! ONNX Runtime with an ordered choice of execution providers, and checks
//! a graph against its source model (parity) and against a reference model
//! (retrieval quality) with gates CI can trust.
//!
//! - [`emit`]: one emitter per architecture, the sentence-transformers
//!   head, interface profiles;
//! - [`interface`]: the names of a graph's inputs and outputs, which
//!   writers and readers share;
//! - [`graph`]: building graphs node by node; [`graph_file`]: reading,
//!   checking and writing `.onnx` files (external data);
//! - [`export`]: the serving directory; [`precision`]: the arithmetic of
//!   the matrix products; [`projection_products`]: finding and replacing
//!   them; [`quantize`]: dynamic int8 (CPU), [`qdq`]: static int8
//!   (TensorRT), [`half_precision`]: float16, the last two from ranges
//!   [`activation_ranges`] measures on calibration text;
//!   [`cpu_features`]: the instructions int8 kernels depend on;
//! - [`tensorrt`]: the TensorRT operator lint; [`triton`]: Triton model
//!   repositories;
//! - [`runtime`] (the library and every session's builder), [`providers`],
//!   [`session`]: ONNX Runtime;
//! - [`rewrite`]: slimming a third-party export of the same model in place,
//!   one pass per module;
//! - [`validate`]: parity and quality gates;
//! - [`bench`]: latency and throughput of graphs;
//! - [`frontier`]: speed against quality over candidate graphs, the front
//!   and the fastest graph that passes the gates.

pub mod activation_ranges;
pub mod bench;
pub mod cpu_features;
pub mod emit;
pub mod error;
pub mod export;
pub mod frontier;
pub mod graph;
pub mod graph_file;
pub mod half_precision;
pub mod interface;
pub mod node_index;
pub mod precision;
pub mod projection_products;
pub mod providers;
pub mod qdq;
pub mod quantize;
pub mod rewrite;
pub mod runtime;
pub mod session;
pub mod smoothing;
pub mod tensorrt;
pub mod triton;
pub mod validate;

/// The ONNX protobuf types (`ModelProto`, `NodeProto`, ...) effir reads and writes.
pub use candle_onnx::onnx as proto;
pub use error::{Error, Result};
pub use session::{GraphLocation, OnnxEncoder};
