//! Per-layer widths of a (possibly pruned) model.
//!
//! A Hugging Face `config.json` describes a uniform stack: every layer has an
//! MLP of `intermediate_size`. After EffiR compression layers differ: some
//! have no MLP at all, the others have their own intermediate width. The
//! [`ModelShape`] records that, starts as [`ModelShape::uniform`] from the
//! config, and is saved as `effir_shape.json` beside the weights so that the
//! loader, the ONNX emitter and evaluation agree on it. `config.json` keeps
//! the original widths (pruning only adds LLM-Drop's `drop_mlp_list` and
//! `drop_attn_list` to it), so effir reads widths from the shape record.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `config.json` key with each layer's MLP width (`null`: dropped),
/// which effir writes for `transformers` and reads when a directory has no
/// shape record.
pub const CONFIG_WIDTHS_KEY: &str = "effir_intermediate_sizes";

/// File name of the shape record inside a model directory.
pub const SHAPE_FILE: &str = "effir_shape.json";
const SHAPE_VERSION: u32 = 1;

/// Widths of one transformer layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `None` when the layer's MLP sub-layer has been dropped.
    pub mlp: Option<MlpShape>,
}

/// Width of one MLP sub-layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpShape {
    pub intermediate_size: usize,
}

/// Widths of every layer of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub effir_shape_version: u32,
    /// `model_type` of the config this shape belongs to.
    pub model_type: String,
    pub layers: Vec<LayerShape>,
}

impl ModelShape {
    /// The shape of an unpruned model: every layer alike.
    pub fn uniform(model_type: &str, num_layers: usize, layer: LayerShape) -> Self {
        Self {
            effir_shape_version: SHAPE_VERSION,
            model_type: model_type.to_string(),
            layers: vec![layer; num_layers],
        }
    }

    /// Reads `effir_shape.json` from `dir` if it exists, else returns `uniform`.
    /// A shape file for another architecture or layer count is an error.
    pub fn load_or(dir: &Path, uniform: ModelShape) -> Result<Self> {
        let path = dir.join(SHAPE_FILE);
        let Some(shape) = crate::io::json_file::read_json_if_exists::<ModelShape>(&path)? else {
            return Ok(uniform);
        };
        if shape.effir_shape_version != SHAPE_VERSION {
            return Err(Error::config(
                &path,
                format!(
                    "effir_shape_version {} is not supported (expected {SHAPE_VERSION})",
                    shape.effir_shape_version
                ),
            ));
        }
        if shape.model_type != uniform.model_type {
            return Err(Error::config(
                &path,
                format!(
                    "shape is for model_type `{}` but config.json says `{}`",
                    shape.model_type, uniform.model_type
                ),
            ));
        }
        if shape.layers.len() != uniform.layers.len() {
            return Err(Error::config(
                &path,
                format!(
                    "shape has {} layers but config.json has {}",
                    shape.layers.len(),
                    uniform.layers.len()
                ),
            ));
        }
        for (i, layer) in shape.layers.iter().enumerate() {
            if layer.num_heads == 0 || layer.num_kv_heads == 0 || layer.head_dim == 0 {
                return Err(Error::config(
                    &path,
                    format!("layer {i} has a zero attention width"),
                ));
            }
            if layer.num_heads % layer.num_kv_heads != 0 {
                return Err(Error::config(
                    &path,
                    format!(
                        "layer {i}: num_heads {} is not a multiple of num_kv_heads {}",
                        layer.num_heads, layer.num_kv_heads
                    ),
                ));
            }
            if layer.mlp.is_some_and(|m| m.intermediate_size == 0) {
                return Err(Error::config(
                    &path,
                    format!(
                        "layer {i}: intermediate_size 0 (write `\"mlp\": null` to drop an MLP)"
                    ),
                ));
            }
        }
        Ok(shape)
    }

    /// Number of layers whose MLP is present.
    pub fn mlp_count(&self) -> usize {
        self.layers.iter().filter(|l| l.mlp.is_some()).count()
    }

    /// Writes `effir_shape.json` into `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SHAPE_FILE);
        crate::io::atomic_file::write_atomically(&path, |w| {
            serde_json::to_writer_pretty(&mut *w, self).map_err(|error| Error::Json {
                path: path.clone(),
                error,
            })
        })
    }
}
