//! Qwen3 (Qwen3-Embedding, ...) as a text encoder: Llama with RMSNorm on
//! every query and key head, and an explicit `head_dim`.
//!
//! Reference: transformers `models/qwen3/modeling_qwen3.py`.

use std::path::Path;

use serde::Deserialize;

use super::checkpoint_map;
use super::decoder::DecoderSpec;
use super::decoder_config::{DecoderConfig, LlamaFamily};
use super::layers::AttentionPattern;
use crate::error::{Error, Result};

/// `config.json` of a Qwen3 model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: DecoderConfig,
    /// Bias on q/k/v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl LlamaFamily for Config {
    fn base(&self) -> &DecoderConfig {
        &self.base
    }

    fn spec(&self, path: &Path) -> Result<DecoderSpec> {
        if self.use_sliding_window {
            return Err(Error::unsupported(path, "Qwen3 `use_sliding_window: true`"));
        }
        let mut spec =
            self.base
                .llama_spec(path, AttentionPattern::Causal, &checkpoint_map::QWEN3)?;
        spec.qkv_bias = self.attention_bias;
        spec.o_bias = self.attention_bias;
        Ok(spec)
    }
}
