//! Mistral (E5-Mistral, SFR-Embedding, ...) as a text encoder: Llama with an
//! optional causal sliding window.
//!
//! Reference: transformers `models/mistral/modeling_mistral.py`.

use std::path::Path;

use serde::Deserialize;

use super::checkpoint_map;
use super::decoder::DecoderSpec;
use super::decoder_config::{DecoderConfig, LlamaFamily};
use super::layers::AttentionPattern;
use crate::error::Result;

/// `config.json` of a Mistral model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: DecoderConfig,
    /// Keys further back than this are not attended (`null`: no window).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl LlamaFamily for Config {
    fn base(&self) -> &DecoderConfig {
        &self.base
    }

    fn spec(&self, path: &Path) -> Result<DecoderSpec> {
        let pattern = match self.sliding_window {
            Some(window) => AttentionPattern::CausalWindow { window },
            None => AttentionPattern::Causal,
        };
        self.base.llama_spec(path, pattern, &checkpoint_map::LLAMA)
    }
}
