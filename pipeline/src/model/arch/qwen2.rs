//! Qwen2 / Qwen2.5 (gte-Qwen2, Qwen2.5-Coder, ...) as a text encoder: Llama
//! with biases on the q/k/v projections.
//!
//! Reference: transformers `models/qwen2/modeling_qwen2.py`.

use std::path::Path;

use serde::Deserialize;

use super::checkpoint_map;
use super::decoder::DecoderSpec;
use super::decoder_config::{DecoderConfig, LlamaFamily};
use super::layers::AttentionPattern;
use crate::error::{Error, Result};

/// `config.json` of a Qwen2 model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: DecoderConfig,
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl LlamaFamily for Config {
    fn base(&self) -> &DecoderConfig {
        &self.base
    }

    fn spec(&self, path: &Path) -> Result<DecoderSpec> {
        if self.use_sliding_window {
            return Err(Error::unsupported(path, "Qwen2 `use_sliding_window: true`"));
        }
        let mut spec =
            self.base
                .llama_spec(path, AttentionPattern::Causal, &checkpoint_map::LLAMA)?;
        spec.qkv_bias = true;
        Ok(spec)
    }
}
