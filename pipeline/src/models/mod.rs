//! Transformer backbones, one architecture per file, and the dispatch from a
//! `config.json` `model_type` to them.
//!
//! Every backbone takes its per-layer widths from a [`ModelShape`], so layers
//! may lack their MLP or have their own MLP width (EffiR compression).

pub mod bert;
pub mod decoder;
pub mod decoder_config;
pub mod gemma3;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::shape::ModelShape;

/// The architectures effir implements, by Hugging Face `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Gemma3,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub const ALL: [Architecture; 6] = [
        Self::Bert,
        Self::Gemma3,
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
    ];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Gemma3 => "gemma3_text",
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// Encoders read the whole sequence; decoders are causal language models
    /// (EmbeddingGemma's Gemma3 is a decoder made bidirectional).
    pub fn is_decoder(self) -> bool {
        !matches!(self, Self::Bert)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Names of the tensors of one layer's MLP sub-layer in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpTensors {
    /// Weights (and biases) whose rows are the intermediate neurons.
    pub rows: Vec<String>,
    /// The output projection: its columns are the neurons.
    pub down: String,
    /// The rest of the residual block (output bias, norms), removed with a dropped MLP.
    pub others: Vec<String>,
}

impl Architecture {
    /// The MLP tensors of `layer`, under the checkpoint's `prefix`
    /// (`""`, `"bert."` or `"model."`).
    pub fn mlp_tensors(self, prefix: &str, layer: usize) -> MlpTensors {
        let p = prefix;
        match self {
            Self::Bert => MlpTensors {
                rows: vec![
                    format!("{p}encoder.layer.{layer}.intermediate.dense.weight"),
                    format!("{p}encoder.layer.{layer}.intermediate.dense.bias"),
                ],
                down: format!("{p}encoder.layer.{layer}.output.dense.weight"),
                others: vec![
                    format!("{p}encoder.layer.{layer}.output.dense.bias"),
                    format!("{p}encoder.layer.{layer}.output.LayerNorm.weight"),
                    format!("{p}encoder.layer.{layer}.output.LayerNorm.bias"),
                ],
            },
            Self::Gemma3 => MlpTensors {
                rows: vec![
                    format!("{p}layers.{layer}.mlp.gate_proj.weight"),
                    format!("{p}layers.{layer}.mlp.up_proj.weight"),
                ],
                down: format!("{p}layers.{layer}.mlp.down_proj.weight"),
                others: vec![
                    format!("{p}layers.{layer}.pre_feedforward_layernorm.weight"),
                    format!("{p}layers.{layer}.post_feedforward_layernorm.weight"),
                ],
            },
            Self::Llama | Self::Mistral | Self::Qwen2 | Self::Qwen3 => MlpTensors {
                rows: vec![
                    format!("{p}layers.{layer}.mlp.gate_proj.weight"),
                    format!("{p}layers.{layer}.mlp.up_proj.weight"),
                    // Llama `mlp_bias`.
                    format!("{p}layers.{layer}.mlp.gate_proj.bias"),
                    format!("{p}layers.{layer}.mlp.up_proj.bias"),
                ],
                down: format!("{p}layers.{layer}.mlp.down_proj.weight"),
                others: vec![
                    format!("{p}layers.{layer}.mlp.down_proj.bias"),
                    format!("{p}layers.{layer}.post_attention_layernorm.weight"),
                ],
            },
        }
    }

    /// The key prefix of a checkpoint holding `names`.
    pub fn checkpoint_prefix<'a>(
        self,
        mut names: impl Iterator<Item = &'a String>,
    ) -> &'static str {
        let (nested, probe) = match self {
            Self::Bert => ("bert.", "bert.embeddings.word_embeddings.weight"),
            _ => ("model.", "model.embed_tokens.weight"),
        };
        if names.any(|n| n == probe) {
            nested
        } else {
            ""
        }
    }
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub enum ArchitectureConfig {
    Bert(bert::Config),
    Gemma3(gemma3::Config),
    Llama(llama::Config),
    Mistral(mistral::Config),
    Qwen2(qwen2::Config),
    Qwen3(qwen3::Config),
}

/// Token ids a config declares, read independently of the architecture.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub pad_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list.
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` of a model directory.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub architecture: ArchitectureConfig,
    pub special_tokens: SpecialTokens,
    pub max_position_embeddings: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: Value = crate::json_file::read_json(path)?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "no `model_type` string"))?;
        let arch = Architecture::from_model_type(model_type).ok_or_else(|| {
            Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: model_type.to_string(),
                supported: Architecture::ALL
                    .iter()
                    .map(|a| a.model_type())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        fn parse<T: DeserializeOwned>(path: &Path, value: &Value) -> Result<T> {
            T::deserialize(value).map_err(|error| Error::Json {
                path: path.to_path_buf(),
                error,
            })
        }
        let architecture = match arch {
            Architecture::Bert => ArchitectureConfig::Bert(parse(path, &value)?),
            Architecture::Gemma3 => ArchitectureConfig::Gemma3(parse(path, &value)?),
            Architecture::Llama => ArchitectureConfig::Llama(parse(path, &value)?),
            Architecture::Mistral => ArchitectureConfig::Mistral(parse(path, &value)?),
            Architecture::Qwen2 => ArchitectureConfig::Qwen2(parse(path, &value)?),
            Architecture::Qwen3 => ArchitectureConfig::Qwen3(parse(path, &value)?),
        };
        let token_ids = |key: &str| -> Vec<u32> {
            match value.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
                Some(Value::Array(ids)) => ids
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|n| n as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let config = Self {
            path: path.to_path_buf(),
            special_tokens: SpecialTokens {
                pad_token_id: token_ids("pad_token_id").first().copied(),
                eos_token_ids: token_ids("eos_token_id"),
            },
            max_position_embeddings: value
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
            architecture,
        };
        // Fail on unsupported settings now, not at weight loading.
        config.validate()?;
        Ok(config)
    }

    pub fn architecture(&self) -> Architecture {
        match &self.architecture {
            ArchitectureConfig::Bert(_) => Architecture::Bert,
            ArchitectureConfig::Gemma3(_) => Architecture::Gemma3,
            ArchitectureConfig::Llama(_) => Architecture::Llama,
            ArchitectureConfig::Mistral(_) => Architecture::Mistral,
            ArchitectureConfig::Qwen2(_) => Architecture::Qwen2,
            ArchitectureConfig::Qwen3(_) => Architecture::Qwen3,
        }
    }

    /// The shape of the unpruned model `config.json` describes.
    pub fn uniform_shape(&self) -> ModelShape {
        let model_type = self.architecture().model_type();
        match &self.architecture {
            ArchitectureConfig::Bert(c) => c.uniform_shape(),
            ArchitectureConfig::Gemma3(c) => c.uniform_shape(),
            ArchitectureConfig::Llama(c) => c.base.uniform_shape(model_type),
            ArchitectureConfig::Mistral(c) => c.base.uniform_shape(model_type),
            ArchitectureConfig::Qwen2(c) => c.base.uniform_shape(model_type),
            ArchitectureConfig::Qwen3(c) => c.base.uniform_shape(model_type),
        }
    }

    /// Rows of the token embedding table.
    pub fn vocab_size(&self) -> usize {
        match &self.architecture {
            ArchitectureConfig::Bert(c) => c.vocab_size,
            ArchitectureConfig::Gemma3(c) => c.vocab_size,
            ArchitectureConfig::Llama(c) => c.base.vocab_size,
            ArchitectureConfig::Mistral(c) => c.base.vocab_size,
            ArchitectureConfig::Qwen2(c) => c.base.vocab_size,
            ArchitectureConfig::Qwen3(c) => c.base.vocab_size,
        }
    }

    /// The decoder description (norms, biases, rotary and attention pattern
    /// per layer) of a decoder architecture; `None` for BERT.
    pub fn decoder_spec(&self) -> Result<Option<decoder::DecoderSpec>> {
        let path = &self.path;
        Ok(Some(match &self.architecture {
            ArchitectureConfig::Bert(_) => return Ok(None),
            ArchitectureConfig::Gemma3(c) => c.spec(path)?,
            ArchitectureConfig::Llama(c) => c.spec(path)?,
            ArchitectureConfig::Mistral(c) => c.spec(path)?,
            ArchitectureConfig::Qwen2(c) => c.spec(path)?,
            ArchitectureConfig::Qwen3(c) => c.spec(path)?,
        }))
    }

    /// Rejects settings effir does not implement, before any weight is read.
    fn validate(&self) -> Result<()> {
        let path = &self.path;
        match &self.architecture {
            ArchitectureConfig::Bert(c) => c.validate(path),
            ArchitectureConfig::Gemma3(c) => c.spec(path).map(drop),
            ArchitectureConfig::Llama(c) => c.spec(path).map(drop),
            ArchitectureConfig::Mistral(c) => c.spec(path).map(drop),
            ArchitectureConfig::Qwen2(c) => c.spec(path).map(drop),
            ArchitectureConfig::Qwen3(c) => c.spec(path).map(drop),
        }
    }
}

/// One padded batch of token ids, as the backbones take it.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// `(B, T)`, `u32`.
    pub input_ids: Tensor,
    /// `(B, T)`, `u32`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(B, T)`, `u32`; BERT only.
    pub token_type_ids: Option<Tensor>,
}

/// A residual sub-layer of a transformer layer, or the whole layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sublayer {
    Attention,
    Mlp,
    /// The whole layer (attention and MLP).
    Block,
}

/// Run-time control and observation of a forward pass (analysis, drop
/// studies). `observe` gets the residual stream entering and leaving each
/// residual block: for pre-norm decoders `x` and `x + f(norm(x))`, for
/// post-norm BERT `x` and `LN(x + f(x))`.
pub trait ForwardHooks {
    /// Whether to bypass a sub-layer (its residual block becomes the identity).
    fn skip(&self, _layer: usize, _sublayer: Sublayer) -> bool {
        false
    }

    fn observe(
        &mut self,
        _layer: usize,
        _sublayer: Sublayer,
        _input: &Tensor,
        _output: &Tensor,
    ) -> candle_core::Result<()> {
        Ok(())
    }

    /// The MLP's intermediate activation `(B, T, I)` (what its output
    /// projection reads: `act(W1 x)` or `act(gate x) * up x`); the returned
    /// tensor replaces it (neuron statistics, masks for Taylor scores).
    fn mlp_activation(&mut self, _layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        Ok(activation)
    }
}

/// Sub-layers bypassed at run time, by layer index (drop studies).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedSublayers {
    pub attention: std::collections::BTreeSet<usize>,
    pub mlp: std::collections::BTreeSet<usize>,
}

impl SkippedSublayers {
    pub fn is_empty(&self) -> bool {
        self.attention.is_empty() && self.mlp.is_empty()
    }
}

impl ForwardHooks for SkippedSublayers {
    fn skip(&self, layer: usize, sublayer: Sublayer) -> bool {
        match sublayer {
            Sublayer::Attention => self.attention.contains(&layer),
            Sublayer::Mlp => self.mlp.contains(&layer),
            Sublayer::Block => false,
        }
    }
}

/// Hooks that neither skip nor observe.
pub struct NoHooks;

impl ForwardHooks for NoHooks {}

/// Parameter counts of one layer's sub-layers (norms included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParameters {
    pub attention: usize,
    pub mlp: usize,
}

/// A loaded transformer stack.
pub enum Backbone {
    Bert(bert::Model),
    Decoder(decoder::Model),
}

impl Backbone {
    /// Loads the stack of `config` with the widths of `shape` from `vb`.
    pub fn load(vb: VarBuilder, config: &ModelConfig, shape: &ModelShape) -> Result<Self> {
        let weights_err =
            |error| Error::weights(config.path.parent().unwrap_or(Path::new(".")), error);
        tracing::info!(architecture = %config.architecture(), layers = shape.layers.len(), mlps = shape.mlp_count(), "loading backbone");
        let decoder = |spec: decoder::DecoderSpec| -> Result<Self> {
            Ok(Self::Decoder(
                decoder::Model::load(vb.clone(), &spec, shape).map_err(weights_err)?,
            ))
        };
        let path = &config.path;
        match &config.architecture {
            ArchitectureConfig::Bert(cfg) => Ok(Self::Bert(
                bert::Model::load(vb.clone(), cfg, shape).map_err(weights_err)?,
            )),
            ArchitectureConfig::Gemma3(c) => decoder(c.spec(path)?),
            ArchitectureConfig::Llama(c) => decoder(c.spec(path)?),
            ArchitectureConfig::Mistral(c) => decoder(c.spec(path)?),
            ArchitectureConfig::Qwen2(c) => decoder(c.spec(path)?),
            ArchitectureConfig::Qwen3(c) => decoder(c.spec(path)?),
        }
    }

    /// Last hidden state, `(B, T, hidden_size)`.
    pub fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        self.forward_hooked(input, &mut NoHooks)
    }

    /// [`Backbone::forward`] with sub-layers skipped and observed by `hooks`.
    pub fn forward_hooked(
        &self,
        input: &ModelInput,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        Ok(match self {
            Self::Bert(m) => m.forward(input, hooks)?,
            Self::Decoder(m) => m.forward(input, hooks)?,
        })
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Bert(m) => m.hidden_size(),
            Self::Decoder(m) => m.hidden_size(),
        }
    }

    /// Token (and position) embeddings and the final norm.
    pub fn embedding_parameters(&self) -> usize {
        match self {
            Self::Bert(m) => m.embedding_parameters(),
            Self::Decoder(m) => m.embedding_parameters(),
        }
    }

    pub fn layer_parameters(&self) -> Vec<LayerParameters> {
        match self {
            Self::Bert(m) => m.layer_parameters(),
            Self::Decoder(m) => m.layer_parameters(),
        }
    }
}
