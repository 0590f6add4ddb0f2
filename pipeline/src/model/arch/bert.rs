//! BERT encoder (post-LayerNorm), as used by all-MiniLM-L6-v2, BGE, E5 and
//! most sentence-transformers models.
//!
//! Reference: transformers `models/bert/modeling_bert.py` (`BertModel`).
//! A layer is `h = LN(x + Attn(x))`, then `y = LN(h + W2 gelu(W1 h))`. With
//! its MLP dropped a layer ends at `h`: the output LayerNorm belongs to the
//! MLP's residual block and goes with it.

use std::path::Path;

use candle_core::{Module, Result as CandleResult, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::checkpoint_map::CheckpointMap;
use super::forward::{ForwardHooks, LayerParameters, ModelInput, Sublayer};
use super::layers::{multi_head_attention, Activation, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::model::shape::{LayerShape, MlpShape, ModelShape};

/// `config.json` of a BERT model, keyed as Hugging Face writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

impl Config {
    /// Rejects settings this implementation does not compute.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(kind) = &self.position_embedding_type {
            if kind != "absolute" {
                return Err(Error::unsupported(
                    path,
                    format!("position_embedding_type `{kind}`"),
                ));
            }
        }
        if Activation::from_hf(&self.hidden_act).is_none() {
            return Err(Error::unsupported(
                path,
                format!("hidden_act `{}`", self.hidden_act),
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::config(
                path,
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }
        Ok(())
    }

    pub fn uniform_shape(&self) -> ModelShape {
        ModelShape::uniform(
            "bert",
            self.num_hidden_layers,
            LayerShape {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_attention_heads,
                head_dim: self.hidden_size / self.num_attention_heads,
                mlp: Some(MlpShape {
                    intermediate_size: self.intermediate_size,
                }),
            },
        )
    }
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &Config, map: &CheckpointMap) -> CandleResult<Self> {
        let keys = &map.embeddings;
        let table = |module: Option<&str>, rows: usize| {
            let module = module.ok_or_else(|| {
                candle_core::Error::Msg("BERT has position and token-type embeddings".into())
            })?;
            vb.pp(module).get((rows, cfg.hidden_size), "weight")
        };
        Ok(Self {
            word: table(Some(keys.tokens), cfg.vocab_size)?,
            position: table(keys.positions, cfg.max_position_embeddings)?,
            token_type: table(keys.token_types, cfg.type_vocab_size)?,
            norm: LayerNorm::load(
                vb.pp(keys.norm.unwrap_or_default()),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
        })
    }

    fn forward(&self, input: &ModelInput) -> CandleResult<Tensor> {
        let (b, t) = input.input_ids.dims2()?;
        let hidden = self.word.dim(1)?;
        let words = self
            .word
            .index_select(&input.input_ids.flatten_all()?, 0)?
            .reshape((b, t, hidden))?;
        let types = match &input.token_type_ids {
            Some(ids) => self
                .token_type
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, hidden))?,
            None => self
                .token_type
                .get(0)?
                .reshape((1, 1, hidden))?
                .broadcast_as((b, t, hidden))?,
        };
        let positions = self.position.narrow(0, 0, t)?.unsqueeze(0)?;
        let x = (words + types)?.broadcast_add(&positions)?;
        self.norm.forward(&x)
    }

    fn parameter_count(&self) -> usize {
        self.word.elem_count()
            + self.position.elem_count()
            + self.token_type.elem_count()
            + self.norm.parameter_count()
    }
}

/// Self-attention: query, key, value and output projections and the residual LayerNorm.
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl AttentionBlock {
    fn load(
        vb: VarBuilder,
        cfg: &Config,
        map: &CheckpointMap,
        shape: &LayerShape,
    ) -> CandleResult<Self> {
        let inner = shape.num_heads * shape.head_dim;
        let h = cfg.hidden_size;
        let keys = &map.attention;
        Ok(Self {
            query: Linear::load(vb.pp(keys.query), h, inner, true)?,
            key: Linear::load(vb.pp(keys.key), h, inner, true)?,
            value: Linear::load(vb.pp(keys.value), h, inner, true)?,
            output: Linear::load(vb.pp(keys.output), inner, h, true)?,
            norm: LayerNorm::load(
                vb.pp(keys.norms.residual.unwrap_or_default()),
                h,
                cfg.layer_norm_eps,
            )?,
            heads: shape.num_heads,
            head_dim: shape.head_dim,
        })
    }

    /// `x`: `(B, T, H)`; `bias`: `(B, 1, 1, T)`, `None` without padding.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> CandleResult<Tensor> {
        let q = self.query.forward(x)?;
        let k = self.key.forward(x)?;
        let v = self.value.forward(x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (h, d) = (self.heads, self.head_dim);
        let context = multi_head_attention(&q, &k, &v, h, h, d, bias, scale)?;
        let out = self.output.forward(&context)?;
        self.norm.forward_sum(&out, x)
    }

    fn parameter_count(&self) -> usize {
        [&self.query, &self.key, &self.value, &self.output]
            .iter()
            .map(|l| l.parameter_count())
            .sum::<usize>()
            + self.norm.parameter_count()
    }
}

/// The MLP: intermediate and output projections and the residual LayerNorm.
struct MlpBlock {
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl MlpBlock {
    fn load(
        vb: VarBuilder,
        cfg: &Config,
        map: &CheckpointMap,
        mlp: MlpShape,
        act: Activation,
    ) -> CandleResult<Self> {
        let h = cfg.hidden_size;
        let keys = &map.mlp;
        Ok(Self {
            intermediate: Linear::load(vb.pp(keys.up), h, mlp.intermediate_size, true)?,
            output: Linear::load(vb.pp(keys.down), mlp.intermediate_size, h, true)?,
            norm: LayerNorm::load(
                vb.pp(keys.norms.residual.unwrap_or_default()),
                h,
                cfg.layer_norm_eps,
            )?,
            act,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        hooks: &mut dyn ForwardHooks,
    ) -> CandleResult<Tensor> {
        let a = self.intermediate.forward_then(x, self.act)?;
        let a = hooks.mlp_activation(layer, a)?;
        let y = hooks.mlp_output(layer, self.output.forward(&a)?)?;
        self.norm.forward_sum(&y, x)
    }

    fn parameter_count(&self) -> usize {
        self.intermediate.parameter_count()
            + self.output.parameter_count()
            + self.norm.parameter_count()
    }
}

struct Layer {
    attention: AttentionBlock,
    mlp: Option<MlpBlock>,
}

/// A BERT encoder whose layers may lack their MLP or have their own width.
pub struct Model {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    hidden_size: usize,
}

impl Model {
    pub fn load(
        vb: VarBuilder,
        cfg: &Config,
        map: &CheckpointMap,
        shape: &ModelShape,
    ) -> CandleResult<Self> {
        // Checkpoints of `BertForMaskedLM` & co. nest the encoder under `bert.`.
        let vb = if vb.contains_tensor(&map.nested_probe()) {
            vb.pp(map.nested_prefix.trim_end_matches('.'))
        } else {
            vb
        };
        let act = Activation::from_hf(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("unsupported hidden_act {}", cfg.hidden_act))
        })?;
        let embeddings = Embeddings::load(vb.clone(), cfg, map)?;
        let layers = shape
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer_shape)| {
                let vb = vb.pp(map.layers).pp(i);
                Ok(Layer {
                    attention: AttentionBlock::load(vb.clone(), cfg, map, layer_shape)?,
                    mlp: layer_shape
                        .mlp
                        .map(|mlp| MlpBlock::load(vb.clone(), cfg, map, mlp, act))
                        .transpose()?,
                })
            })
            .collect::<CandleResult<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            hidden_size: cfg.hidden_size,
        })
    }

    /// The residual stream entering layer 0 (embeddings and their norm).
    pub(crate) fn embed(&self, input: &ModelInput) -> CandleResult<Tensor> {
        self.embeddings.forward(input)
    }

    /// Runs layer `i` on the residual stream `x`; `bias` is the batch's
    /// [`padding_bias`].
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        x: Tensor,
        bias: Option<&Tensor>,
        hooks: &mut dyn ForwardHooks,
    ) -> CandleResult<Tensor> {
        let layer = &self.layers[i];
        let layer_in = x.clone();
        let mut x = x;
        if !hooks.skip(i, Sublayer::Attention) {
            let out = layer.attention.forward(&x, bias)?;
            hooks.observe(i, Sublayer::Attention, &x, &out)?;
            x = out;
        }
        if let Some(mlp) = layer.mlp.as_ref().filter(|_| !hooks.skip(i, Sublayer::Mlp)) {
            let out = mlp.forward(&x, i, hooks)?;
            hooks.observe(i, Sublayer::Mlp, &x, &out)?;
            x = out;
        }
        hooks.observe(i, Sublayer::Block, &layer_in, &x)?;
        Ok(x)
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn embedding_parameters(&self) -> usize {
        self.embeddings.parameter_count()
    }

    pub fn layer_parameters(&self) -> Vec<LayerParameters> {
        self.layers
            .iter()
            .map(|l| LayerParameters {
                attention: l.attention.parameter_count(),
                mlp: l.mlp.as_ref().map_or(0, MlpBlock::parameter_count),
            })
            .collect()
    }
}

/// Reads and validates a BERT `config.json`.
pub(crate) fn parse(path: &Path, value: &serde_json::Value) -> Result<Config> {
    let config: Config = crate::io::json_file::from_value(path, value)?;
    config.validate(path)?;
    Ok(config)
}
