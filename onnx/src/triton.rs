//! A Triton Inference Server model repository for an export (`effir export
//! --layout triton --name NAME`):
//!
//! ```text
//! OUT/NAME/config.pbtxt      the ONNX Runtime backend's model configuration
//! OUT/NAME/1/model.onnx      version 1 of the model
//! OUT/NAME/tokenizer.json …  the tokenizer and model files, for clients
//! ```
//!
//! `config.pbtxt` is Triton's `ModelConfig` in protobuf text format:
//! platform `onnxruntime_onnx`, `max_batch_size` (the batch axis is implicit
//! in the tensor dims), dynamic batching, the graph's inputs and outputs
//! with their types and dims, an instance group, and with `--target
//! tensorrt` the ONNX Runtime TensorRT accelerator (precision, workspace,
//! engine cache). The tests parse it with Triton's own `model_config.proto`
//! (the `tritonclient` package's compiled module).

use crate::error::{Error, Result};
use crate::graph_file::IoInfo;

/// Choices of a Triton model configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonOptions {
    /// The model's name: its directory in the repository.
    pub name: String,
    /// Largest batch Triton forms (dynamic batching up to it).
    pub max_batch_size: u32,
}

impl TritonOptions {
    /// Checks that `name` can be a directory of a model repository.
    pub fn validate(&self) -> Result<()> {
        let ok = !self.name.is_empty()
            && self.name != "."
            && self.name != ".."
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "Triton model name `{}`: use letters, digits, '-', '_' and '.'",
                self.name
            )));
        }
        if self.max_batch_size == 0 {
            return Err(Error::InvalidArgument(
                "Triton max batch size must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// How the model runs under Triton.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Gpu,
    /// On the GPU through ONNX Runtime's TensorRT provider, at this
    /// TensorRT precision mode (`FP32`, `FP16`, `INT8`).
    TensorRt(&'static str),
}

/// `config.pbtxt` for a graph with `inputs` and `outputs` (the batch axis
/// first, as effir's graphs have it).
pub fn model_config(
    options: &TritonOptions,
    inputs: &[IoInfo],
    outputs: &[IoInfo],
    placement: Placement,
) -> Result<String> {
    let tensor = |io: &IoInfo| -> Result<String> {
        let data_type = match io.elem_type {
            1 => "TYPE_FP32",
            7 => "TYPE_INT64",
            10 => "TYPE_FP16",
            9 => "TYPE_BOOL",
            other => {
                return Err(Error::Export(format!(
                    "Triton: `{}` has ONNX element type {other}, which effir does not map",
                    io.name
                )))
            }
        };
        // The batch axis is Triton's (max_batch_size > 0): dims omit it.
        let dims: Vec<String> = io
            .dims
            .iter()
            .skip(1)
            .map(|d| d.map_or("-1".to_string(), |d| d.to_string()))
            .collect();
        Ok(format!(
            "  {{\n    name: \"{}\"\n    data_type: {data_type}\n    dims: [ {} ]\n  }}",
            io.name,
            dims.join(", ")
        ))
    };
    let list = |ios: &[IoInfo]| -> Result<String> {
        Ok(ios
            .iter()
            .map(tensor)
            .collect::<Result<Vec<_>>>()?
            .join(",\n"))
    };
    let kind = match placement {
        Placement::Cpu => "KIND_CPU",
        Placement::Gpu | Placement::TensorRt(_) => "KIND_GPU",
    };
    let mut text = format!(
        "# Written by effir {} (`effir export --layout triton`).\n\
         name: \"{}\"\n\
         platform: \"onnxruntime_onnx\"\n\
         max_batch_size: {}\n\
         input [\n{}\n]\n\
         output [\n{}\n]\n\
         dynamic_batching {{\n  max_queue_delay_microseconds: 100\n}}\n\
         instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n",
        env!("CARGO_PKG_VERSION"),
        options.name,
        options.max_batch_size,
        list(inputs)?,
        list(outputs)?,
    );
    if let Placement::TensorRt(precision) = placement {
        let parameter = |key: &str, value: &str| {
            format!("        parameters {{ key: \"{key}\" value: \"{value}\" }}\n")
        };
        text += "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n        name: \"tensorrt\"\n";
        text += &parameter("precision_mode", precision);
        text += &parameter("max_workspace_size_bytes", "1073741824");
        text += &parameter("trt_engine_cache_enable", "1");
        text += &parameter(
            "trt_engine_cache_path",
            &format!("/tmp/triton-trt-cache/{}", options.name),
        );
        text += "      }\n    ]\n  }\n}\n";
    }
    Ok(text)
}
