//! Qwen2 / Qwen2.5 (gte-Qwen2, Qwen2.5-Coder, ...) as a text encoder: Llama
//! with biases on the q/k/v projections.
//!
//! Reference: transformers `models/qwen2/modeling_qwen2.py`.

use std::path::Path;

use serde::Deserialize;

use super::checkpoint_map;
use super::decoder::DecoderSpec;
use super::decoder_config::DecoderConfig;
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

impl Config {
    pub(crate) fn spec(&self, path: &Path) -> Result<DecoderSpec> {
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

/// Reads a Qwen2 `config.json`.
pub(crate) fn parse(
    path: &Path,
    value: &serde_json::Value,
) -> Result<super::decoder::ParsedDecoder> {
    let config: Config = crate::io::json_file::from_value(path, value)?;
    Ok(config.base.parsed(config.spec(path)?))
}
