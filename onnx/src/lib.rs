//! effir's ONNX crate: graph emission from effir models, rewriting of
//! existing exports, ONNX Runtime sessions and parity checks.
//!
//! It grows with the export stage; the model code it emits from lives in
//! `effir-pipeline`.
