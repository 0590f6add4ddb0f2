//! `config.json` keys shared by the Llama-family decoders (Llama, Mistral,
//! Qwen2, Qwen3), and the rotary settings every decoder reads.

use std::path::Path;

use serde::Deserialize;

use super::decoder::{DecoderSpec, LayerAttentionSpec, RopeSpec};
use super::layers::{Activation, RopeScaling};
use crate::error::{Error, Result};
use crate::model::shape::{LayerShape, MlpShape, ModelShape};

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// Resolves the rotary base and scaling from the old and new config keys.
pub(crate) fn rope_spec(
    path: &Path,
    rope_theta: Option<f64>,
    rope_scaling: Option<&RopeParameters>,
    default_theta: f64,
) -> Result<RopeSpec> {
    let theta = rope_scaling
        .and_then(|r| r.rope_theta)
        .or(rope_theta)
        .unwrap_or(default_theta);
    let scaling = match rope_scaling.and_then(|r| r.rope_type.as_deref()) {
        None | Some("default") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: rope_scaling
                .and_then(|r| r.factor)
                .ok_or_else(|| Error::config(path, "linear rope scaling without `factor`"))?,
        },
        Some(other) => {
            return Err(Error::unsupported(
                path,
                format!("rope scaling type `{other}`"),
            ))
        }
    };
    Ok(RopeSpec { theta, scaling })
}

/// The keys every Llama-family `config.json` carries.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl DecoderConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub(crate) fn activation(&self, path: &Path) -> Result<Activation> {
        Activation::from_hf(&self.hidden_act)
            .ok_or_else(|| Error::unsupported(path, format!("hidden_act `{}`", self.hidden_act)))
    }

    pub(crate) fn rope(&self, path: &Path) -> Result<RopeSpec> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        rope_spec(path, self.rope_theta, params, 10_000.0)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.num_attention_heads == 0 || self.num_kv_heads() == 0 {
            return Err(Error::config(path, "zero attention heads"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::config(
                path,
                "num_attention_heads is not a multiple of num_key_value_heads",
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                path,
                "head_dim must be even for rotary embeddings",
            ));
        }
        Ok(())
    }

    pub fn uniform_shape(&self, model_type: &str) -> ModelShape {
        ModelShape::uniform(
            model_type,
            self.num_hidden_layers,
            LayerShape {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_kv_heads(),
                head_dim: self.head_dim(),
                mlp: Some(MlpShape {
                    intermediate_size: self.intermediate_size,
                }),
            },
        )
    }
}

impl DecoderConfig {
    /// The spec of plain Llama with `pattern` attention on every layer;
    /// architectures switch on their differences from it.
    pub(crate) fn llama_spec(
        &self,
        path: &Path,
        pattern: super::layers::AttentionPattern,
        checkpoint: &'static super::checkpoint_map::CheckpointMap,
    ) -> Result<DecoderSpec> {
        self.validate(path)?;
        let layer = LayerAttentionSpec {
            pattern,
            rope: self.rope(path)?,
        };
        Ok(DecoderSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            norm_eps: self.rms_norm_eps,
            norm_unit_offset: false,
            embed_scale: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            checkpoint,
            hidden_act: self.activation(path)?,
            attention_scale: 1.0 / (self.head_dim() as f64).sqrt(),
            layers: vec![layer; self.num_hidden_layers],
        })
    }
}

impl DecoderConfig {
    /// What `config.json` says of a Llama-family decoder whose quirks are `spec`.
    pub(crate) fn parsed(&self, spec: DecoderSpec) -> super::decoder::ParsedDecoder {
        super::decoder::ParsedDecoder {
            spec,
            uniform_shape: self.uniform_shape(""),
            vocab_size: self.vocab_size,
        }
    }
}

/// A Llama-family `config.json` (Llama, Mistral, Qwen2, Qwen3): the shared
/// fields and how the architecture differs from plain Llama.
pub(crate) trait LlamaFamily: serde::de::DeserializeOwned {
    fn base(&self) -> &DecoderConfig;
    fn spec(&self, path: &Path) -> Result<DecoderSpec>;
}

/// Reads a Llama-family `config.json` as `C`.
pub(crate) fn parse<C: LlamaFamily>(
    path: &Path,
    value: &serde_json::Value,
) -> Result<super::decoder::ParsedDecoder> {
    let config: C = crate::io::json_file::from_value(path, value)?;
    Ok(config.base().parsed(config.spec(path)?))
}
