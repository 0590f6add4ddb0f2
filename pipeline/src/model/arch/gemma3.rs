//! Gemma3 text model as an encoder, as in EmbeddingGemma-300M: bidirectional
//! (or causal) attention, sliding-window layers with their own rotary base,
//! RMSNorm scaling by `(1 + w)`, four norms per layer, q/k norms, GeGLU MLP
//! with `gelu_pytorch_tanh`, embeddings scaled by `sqrt(hidden_size)` and
//! attention scaled by `query_pre_attn_scalar^-0.5`.
//!
//! Reference: transformers `models/gemma3/modeling_gemma3.py`
//! (`Gemma3TextModel`; `use_bidirectional_attention` for EmbeddingGemma).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::decoder::{DecoderSpec, LayerAttentionSpec};
use super::decoder_config::{rope_spec, RopeParameters};
use super::layers::{Activation, AttentionPattern};
use crate::error::{Error, Result};
use crate::model::shape::{LayerShape, MlpShape, ModelShape};

/// `config.json` of a Gemma3 text model (`model_type: gemma3_text`).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(default = "default_hidden_activation")]
    pub hidden_activation: String,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base of full-attention layers (transformers 4 keys).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary base of sliding-window layers (transformers 4 keys).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: rotary settings keyed by layer type.
    #[serde(default)]
    pub rope_parameters: Option<HashMap<String, RopeParameters>>,
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_sliding_window_pattern")]
    pub sliding_window_pattern: usize,
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

fn default_hidden_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window_pattern() -> usize {
    6
}

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

impl Config {
    fn layer_types(&self, path: &Path) -> Result<Vec<bool>> {
        match &self.layer_types {
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    return Err(Error::config(
                        path,
                        format!(
                            "layer_types has {} entries for {} layers",
                            types.len(),
                            self.num_hidden_layers
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        SLIDING => Ok(true),
                        FULL => Ok(false),
                        other => Err(Error::unsupported(path, format!("layer type `{other}`"))),
                    })
                    .collect()
            }
            None => Ok((0..self.num_hidden_layers)
                .map(|i| (i + 1) % self.sliding_window_pattern.max(1) != 0)
                .collect()),
        }
    }

    pub(crate) fn spec(&self, path: &Path) -> Result<DecoderSpec> {
        if self.attn_logit_softcapping.is_some() {
            return Err(Error::unsupported(path, "attn_logit_softcapping"));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::config(
                path,
                "num_attention_heads is not a multiple of num_key_value_heads",
            ));
        }
        let hidden_act = Activation::from_hf(&self.hidden_activation).ok_or_else(|| {
            Error::unsupported(
                path,
                format!("hidden_activation `{}`", self.hidden_activation),
            )
        })?;
        let (full_rope, local_rope) = match &self.rope_parameters {
            Some(by_type) => (
                rope_spec(path, None, by_type.get(FULL), 1_000_000.0)?,
                rope_spec(path, None, by_type.get(SLIDING), 10_000.0)?,
            ),
            None => (
                rope_spec(
                    path,
                    self.rope_theta,
                    self.rope_scaling.as_ref(),
                    1_000_000.0,
                )?,
                rope_spec(path, self.rope_local_base_freq, None, 10_000.0)?,
            ),
        };
        let layers = self
            .layer_types(path)?
            .into_iter()
            .map(|sliding| {
                let window = if sliding { self.sliding_window } else { None };
                let pattern = match (window, self.use_bidirectional_attention) {
                    (None, true) => AttentionPattern::Bidirectional,
                    (None, false) => AttentionPattern::Causal,
                    // transformers halves the configured window of bidirectional
                    // Gemma3 (`Gemma3TextConfig.__post_init__`: `window // 2 + 1`,
                    // exclusive), so `sliding_window` is the total span.
                    (Some(window), true) => AttentionPattern::BidirectionalWindow {
                        window: window / 2 + 1,
                    },
                    (Some(window), false) => AttentionPattern::CausalWindow { window },
                };
                LayerAttentionSpec {
                    pattern,
                    rope: if sliding { local_rope } else { full_rope },
                }
            })
            .collect();
        Ok(DecoderSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            norm_eps: self.rms_norm_eps,
            norm_unit_offset: true,
            embed_scale: Some((self.hidden_size as f64).sqrt()),
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: false,
            checkpoint: &super::checkpoint_map::GEMMA3,
            hidden_act,
            attention_scale: 1.0 / self.query_pre_attn_scalar.sqrt(),
            layers,
        })
    }

    pub fn uniform_shape(&self) -> ModelShape {
        ModelShape::uniform(
            "gemma3_text",
            self.num_hidden_layers,
            LayerShape {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
                mlp: Some(MlpShape {
                    intermediate_size: self.intermediate_size,
                }),
            },
        )
    }
}

/// Reads a Gemma3 `config.json`.
pub(crate) fn parse(
    path: &Path,
    value: &serde_json::Value,
) -> Result<super::decoder::ParsedDecoder> {
    let config: Config = crate::io::json_file::from_value(path, value)?;
    Ok(super::decoder::ParsedDecoder {
        spec: config.spec(path)?,
        uniform_shape: config.uniform_shape(),
        vocab_size: config.vocab_size,
    })
}
