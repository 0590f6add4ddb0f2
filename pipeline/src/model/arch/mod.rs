//! Transformer backbones, one architecture per file, and the registry that
//! maps a `config.json` `model_type` to its parser and its
//! [`CheckpointMap`].
//!
//! Every backbone takes its per-layer widths from a [`ModelShape`], so layers
//! may lack their MLP or have their own MLP width (EffiR compression).
//! Adding an architecture: a file whose `parse` reads its `config.json`
//! (decoders describe themselves as a [`DecoderSpec`]), a variant of
//! [`Architecture`] and one line in [`REGISTRY`].

pub mod bert;
pub mod checkpoint_map;
pub mod decoder;
pub mod decoder_config;
pub mod forward;
pub mod gemma3;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::Value;

pub use checkpoint_map::{CheckpointMap, MlpTensors};
use decoder::DecoderSpec;
pub use forward::{
    ForwardHooks, LayerParameters, ModelInput, NoHooks, SkippedSublayers, Sublayer, WithSkipped,
};

use crate::error::{Error, Result};
use crate::model::shape::ModelShape;

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

/// One architecture: its `model_type`, how its `config.json` is read and
/// where its checkpoint keeps each tensor.
pub struct Registration {
    pub architecture: Architecture,
    pub model_type: &'static str,
    pub checkpoint: &'static CheckpointMap,
    /// The `transformers` classes of the unpruned architecture
    /// (configuration, backbone model), which the Python code written into
    /// a pruned directory extends.
    pub transformers_classes: (&'static str, &'static str),
    parse: fn(&Path, &Value) -> Result<ParsedConfig>,
}

/// Every architecture effir implements.
#[rustfmt::skip]
pub const REGISTRY: [Registration; 6] = [
    Registration { architecture: Architecture::Bert, model_type: "bert", checkpoint: &checkpoint_map::BERT, transformers_classes: ("BertConfig", "BertModel"), parse: |p, v| Ok(bert::parse(p, v)?.into()) },
    Registration { architecture: Architecture::Gemma3, model_type: "gemma3_text", checkpoint: &checkpoint_map::GEMMA3, transformers_classes: ("Gemma3TextConfig", "Gemma3TextModel"), parse: |p, v| Ok(gemma3::parse(p, v)?.into()) },
    Registration { architecture: Architecture::Llama, model_type: "llama", checkpoint: &checkpoint_map::LLAMA, transformers_classes: ("LlamaConfig", "LlamaModel"), parse: |p, v| Ok(decoder_config::parse::<llama::Config>(p, v)?.into()) },
    Registration { architecture: Architecture::Mistral, model_type: "mistral", checkpoint: &checkpoint_map::LLAMA, transformers_classes: ("MistralConfig", "MistralModel"), parse: |p, v| Ok(decoder_config::parse::<mistral::Config>(p, v)?.into()) },
    Registration { architecture: Architecture::Qwen2, model_type: "qwen2", checkpoint: &checkpoint_map::LLAMA, transformers_classes: ("Qwen2Config", "Qwen2Model"), parse: |p, v| Ok(decoder_config::parse::<qwen2::Config>(p, v)?.into()) },
    Registration { architecture: Architecture::Qwen3, model_type: "qwen3", checkpoint: &checkpoint_map::QWEN3, transformers_classes: ("Qwen3Config", "Qwen3Model"), parse: |p, v| Ok(decoder_config::parse::<qwen3::Config>(p, v)?.into()) },
];

impl Architecture {
    pub const ALL: [Architecture; 6] = [
        Self::Bert,
        Self::Gemma3,
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
    ];

    fn registration(self) -> &'static Registration {
        REGISTRY
            .iter()
            .find(|r| r.architecture == self)
            .expect("every architecture is registered")
    }

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        self.registration().model_type
    }

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        REGISTRY
            .iter()
            .find(|r| r.model_type == model_type)
            .map(|r| r.architecture)
    }

    /// Where the architecture's checkpoint keeps each tensor.
    pub fn checkpoint(self) -> &'static CheckpointMap {
        self.registration().checkpoint
    }

    /// The `transformers` configuration and backbone classes.
    pub fn transformers_classes(self) -> (&'static str, &'static str) {
        self.registration().transformers_classes
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

/// The widest MLP a config (or a layer of `effir_intermediate_sizes`) may give.
const MAX_INTERMEDIATE_SIZE: u64 = 1 << 22;

/// The largest value a dimension of `config.json` may take: far above any
/// real model (GPT-scale models have ~100 layers, hidden sizes of ~20k,
/// vocabularies of ~250k), so a corrupt or hostile number is refused
/// before anything is allocated from it.
const DIMENSION_LIMITS: [(&str, u64); 9] = [
    ("num_hidden_layers", 4096),
    ("num_attention_heads", 4096),
    ("num_key_value_heads", 4096),
    ("hidden_size", 1 << 20),
    ("intermediate_size", MAX_INTERMEDIATE_SIZE),
    ("head_dim", 1 << 16),
    ("vocab_size", 1 << 26),
    ("max_position_embeddings", 1 << 26),
    ("type_vocab_size", 1 << 16),
];

fn check_dimensions(path: &Path, value: &Value) -> Result<()> {
    for (key, limit) in DIMENSION_LIMITS {
        if let Some(n) = value.get(key).and_then(Value::as_u64) {
            if n > limit {
                return Err(Error::config(
                    path,
                    format!("`{key}` is {n}, more than any model has (at most {limit})"),
                ));
            }
        }
    }
    Ok(())
}

/// `uniform` with the MLP widths of `effir_intermediate_sizes` (one entry
/// per layer, a width or `null` for a dropped MLP), if the config has them.
fn described_widths(
    path: &Path,
    value: &Value,
    uniform: &ModelShape,
) -> Result<Option<ModelShape>> {
    use crate::model::shape::CONFIG_WIDTHS_KEY as WIDTHS_KEY;
    let Some(widths) = value.get(WIDTHS_KEY) else {
        return Ok(None);
    };
    let bad = |m: String| Error::config(path, format!("`{WIDTHS_KEY}`: {m}"));
    let widths = widths.as_array().ok_or_else(|| bad("not a list".into()))?;
    if widths.len() != uniform.layers.len() {
        return Err(bad(format!(
            "{} entries for {} layers",
            widths.len(),
            uniform.layers.len()
        )));
    }
    let mut shape = uniform.clone();
    for (i, (layer, width)) in shape.layers.iter_mut().zip(widths).enumerate() {
        layer.mlp = match width {
            Value::Null => None,
            w => match w.as_u64() {
                Some(n) if n > 0 && n <= MAX_INTERMEDIATE_SIZE => {
                    Some(crate::model::shape::MlpShape {
                        intermediate_size: n as usize,
                    })
                }
                _ => {
                    return Err(bad(format!(
                        "layer {i}: {w} is not a width (1 to {MAX_INTERMEDIATE_SIZE}) or null"
                    )))
                }
            },
        };
    }
    Ok(Some(shape))
}

/// The backbone a `config.json` describes.
#[derive(Debug, Clone)]
pub enum BackboneConfig {
    Bert(bert::Config),
    /// Every decoder describes itself as a [`DecoderSpec`].
    Decoder(DecoderSpec),
}

/// What an architecture's `parse` makes of its `config.json`.
struct ParsedConfig {
    backbone: BackboneConfig,
    /// The unpruned model's per-layer widths.
    uniform_shape: ModelShape,
    /// Rows of the token embedding table.
    vocab_size: usize,
}

impl From<bert::Config> for ParsedConfig {
    fn from(config: bert::Config) -> Self {
        Self {
            uniform_shape: config.uniform_shape(),
            vocab_size: config.vocab_size,
            backbone: BackboneConfig::Bert(config),
        }
    }
}

impl From<decoder::ParsedDecoder> for ParsedConfig {
    fn from(parsed: decoder::ParsedDecoder) -> Self {
        Self {
            backbone: BackboneConfig::Decoder(parsed.spec),
            uniform_shape: parsed.uniform_shape,
            vocab_size: parsed.vocab_size,
        }
    }
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
    architecture: Architecture,
    pub backbone: BackboneConfig,
    uniform_shape: ModelShape,
    /// The per-layer widths `config.json` itself gives (`effir_intermediate_sizes`).
    described_shape: Option<ModelShape>,
    vocab_size: usize,
    pub special_tokens: SpecialTokens,
    pub max_position_embeddings: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`); settings effir does
    /// not implement fail here, before any weight is read.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: Value = crate::io::json_file::read_json(path)?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "no `model_type` string"))?;
        let registration = REGISTRY
            .iter()
            .find(|r| r.model_type == model_type)
            .ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: model_type.to_string(),
                supported: REGISTRY
                    .iter()
                    .map(|r| r.model_type)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        check_dimensions(path, &value)?;
        let mut parsed = (registration.parse)(path, &value)?;
        parsed.uniform_shape.model_type = registration.model_type.to_string();
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
        let described_shape = described_widths(path, &value, &parsed.uniform_shape)?;
        Ok(Self {
            path: path.to_path_buf(),
            architecture: registration.architecture,
            backbone: parsed.backbone,
            described_shape,
            uniform_shape: parsed.uniform_shape,
            vocab_size: parsed.vocab_size,
            special_tokens: SpecialTokens {
                pad_token_id: token_ids("pad_token_id").first().copied(),
                eos_token_ids: token_ids("eos_token_id"),
            },
            max_position_embeddings: value
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        })
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// Where the checkpoint keeps each tensor.
    pub fn checkpoint(&self) -> &'static CheckpointMap {
        self.architecture.checkpoint()
    }

    /// The shape of the unpruned model `config.json` describes.
    pub fn uniform_shape(&self) -> ModelShape {
        self.uniform_shape.clone()
    }

    /// The per-layer widths `config.json` describes: the uniform stack, or
    /// the widths of `effir_intermediate_sizes` (which effir writes for
    /// `transformers`). An
    /// `effir_shape.json` beside it takes precedence ([`ModelShape::load_or`]).
    pub fn described_shape(&self) -> ModelShape {
        self.described_shape
            .clone()
            .unwrap_or_else(|| self.uniform_shape.clone())
    }

    /// Rows of the token embedding table.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The decoder description (norms, biases, rotary and attention pattern
    /// per layer) of a decoder architecture; `None` for BERT.
    pub fn decoder_spec(&self) -> Option<&DecoderSpec> {
        match &self.backbone {
            BackboneConfig::Bert(_) => None,
            BackboneConfig::Decoder(spec) => Some(spec),
        }
    }
}

/// What every layer of one batch's forward pass shares: BERT's padding
/// bias, a decoder's masks and rotary tables.
pub enum LayerContext {
    Bert(Option<Tensor>),
    Decoder(decoder::ForwardContext),
}

/// A loaded transformer stack.
pub enum Backbone {
    Bert(bert::Model),
    Decoder(decoder::Model),
}

impl Backbone {
    /// Loads the stack of `config` with the widths of `shape` from `vb`.
    pub fn load(vb: VarBuilder<'static>, config: &ModelConfig, shape: &ModelShape) -> Result<Self> {
        let weights_err =
            |error| Error::weights(config.path.parent().unwrap_or(Path::new(".")), error);
        tracing::info!(architecture = %config.architecture(), layers = shape.layers.len(), mlps = shape.mlp_count(), "loading backbone");
        Ok(match &config.backbone {
            BackboneConfig::Bert(cfg) => Self::Bert(
                bert::Model::load(vb, cfg, config.checkpoint(), shape).map_err(weights_err)?,
            ),
            BackboneConfig::Decoder(spec) => {
                Self::Decoder(decoder::Model::load(vb, spec, shape).map_err(weights_err)?)
            }
        })
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
        let (mut x, context) = self.stem(input)?;
        for i in 0..self.layer_count() {
            x = self.layer(i, x, &context, hooks)?;
        }
        self.last_hidden(x)
    }

    /// The forward pass in pieces (what [`Backbone::forward_hooked`] runs,
    /// and what gradient checkpointing runs a layer at a time): the
    /// residual stream entering layer 0 and what every layer of this batch
    /// shares; then [`Backbone::layer`] for each layer and
    /// [`Backbone::last_hidden`].
    pub fn stem(&self, input: &ModelInput) -> Result<(Tensor, LayerContext)> {
        Ok(match self {
            Self::Bert(m) => (
                m.embed(input)?,
                LayerContext::Bert(layers::padding_bias(&input.attention_mask)?),
            ),
            Self::Decoder(m) => (m.embed(input)?, LayerContext::Decoder(m.context(input)?)),
        })
    }

    /// Layer `i` on the residual stream `x` (see [`Backbone::stem`]).
    pub fn layer(
        &self,
        i: usize,
        x: Tensor,
        context: &LayerContext,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        Ok(match (self, context) {
            (Self::Bert(m), LayerContext::Bert(bias)) => {
                m.layer_forward(i, x, bias.as_ref(), hooks)?
            }
            (Self::Decoder(m), LayerContext::Decoder(context)) => {
                m.layer_forward(i, x, context, hooks)?
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "a layer context of another architecture".into(),
                ))
            }
        })
    }

    /// The last hidden state from the residual stream leaving the last
    /// layer: the final norm of a decoder; BERT has none.
    pub fn last_hidden(&self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Bert(_) => x,
            Self::Decoder(m) => m.final_norm(&x)?,
        })
    }

    pub fn layer_count(&self) -> usize {
        match self {
            Self::Bert(m) => m.layer_count(),
            Self::Decoder(m) => m.layer_count(),
        }
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
