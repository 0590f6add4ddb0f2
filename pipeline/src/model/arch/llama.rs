//! Llama (and SmolLM2, TinyLlama, Llama 2/3 without rope scaling) as a text
//! encoder: causal attention, RMSNorm, SwiGLU MLP, rotary embeddings.
//!
//! Reference: transformers `models/llama/modeling_llama.py`.

use std::path::Path;

use serde::Deserialize;

use super::checkpoint_map;
use super::decoder::DecoderSpec;
use super::decoder_config::{DecoderConfig, LlamaFamily};
use super::layers::AttentionPattern;
use crate::error::Result;

/// `config.json` of a Llama model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: DecoderConfig,
    /// Bias on q/k/v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaFamily for Config {
    fn base(&self) -> &DecoderConfig {
        &self.base
    }

    fn spec(&self, path: &Path) -> Result<DecoderSpec> {
        let mut spec =
            self.base
                .llama_spec(path, AttentionPattern::Causal, &checkpoint_map::LLAMA)?;
        spec.qkv_bias = self.attention_bias;
        spec.o_bias = self.attention_bias;
        spec.mlp_bias = self.mlp_bias;
        Ok(spec)
    }
}
