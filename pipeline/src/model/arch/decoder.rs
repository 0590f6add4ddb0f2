//! The pre-norm transformer decoder stack shared by Llama, Mistral, Qwen2,
//! Qwen3 and Gemma3, used as a text encoder (retriever).
//!
//! Each architecture file (`llama.rs`, `qwen2.rs`, ...) parses its own
//! `config.json` and describes its quirks as a [`DecoderSpec`]: biases, q/k
//! norms, Gemma's "sandwich" norms and `(1 + w)` RMSNorm, embedding scaling,
//! per-layer rotary bases and sliding windows, causal or bidirectional
//! attention. References: transformers `modeling_llama.py`,
//! `modeling_qwen2.py`, `modeling_qwen3.py`, `modeling_mistral.py`,
//! `modeling_gemma3.py`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::checkpoint_map::{CheckpointMap, SublayerNorms};
use super::forward::{ForwardHooks, LayerParameters, ModelInput, Sublayer};
use super::layers::{
    apply_rotary, attention_bias, multi_head_attention, split_heads, Activation, AttentionPattern,
    RmsNorm, RopeScaling, Rotary,
};
use crate::model::shape::{LayerShape, MlpShape, ModelShape};

/// Rotary embedding parameters of one kind of layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Attention of one layer: which keys it sees and how positions rotate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttentionSpec {
    pub pattern: AttentionPattern,
    pub rope: RopeSpec,
}

/// How an architecture differs from plain Llama.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub norm_eps: f64,
    /// Gemma: RMSNorm scales by `1 + w`.
    pub norm_unit_offset: bool,
    /// Gemma: embeddings multiplied by `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    /// Bias on q/k/v projections (Qwen2; Llama `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Where the checkpoint keeps each tensor, and which norms (per-head
    /// q/k norms, Gemma's norms after each sub-layer) the layers have.
    pub checkpoint: &'static CheckpointMap,
    pub hidden_act: Activation,
    /// Multiplier of `q k^T` (usually `head_dim^-0.5`).
    pub attention_scale: f64,
    /// One entry per layer.
    pub layers: Vec<LayerAttentionSpec>,
}

/// What a decoder architecture's file makes of its `config.json`.
#[derive(Debug, Clone)]
pub struct ParsedDecoder {
    pub spec: DecoderSpec,
    /// The unpruned model's per-layer widths.
    pub uniform_shape: ModelShape,
    pub vocab_size: usize,
}

/// Query, key, value and output projections, and the optional per-head
/// query and key norms.
struct Attention {
    query: super::layers::Linear,
    key: super::layers::Linear,
    value: super::layers::Linear,
    output: super::layers::Linear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: VarBuilder, spec: &DecoderSpec, shape: &LayerShape) -> Result<Self> {
        use super::layers::Linear;
        let h = spec.hidden_size;
        let q_dim = shape.num_heads * shape.head_dim;
        let kv_dim = shape.num_kv_heads * shape.head_dim;
        let keys = &spec.checkpoint.attention;
        let head_norm = |module: &str| {
            RmsNorm::load(
                vb.pp(module),
                shape.head_dim,
                spec.norm_eps,
                spec.norm_unit_offset,
            )
        };
        let qk_norm = match (keys.query_norm, keys.key_norm) {
            (Some(q), Some(k)) => Some((head_norm(q)?, head_norm(k)?)),
            _ => None,
        };
        Ok(Self {
            query: Linear::load(vb.pp(keys.query), h, q_dim, spec.qkv_bias)?,
            key: Linear::load(vb.pp(keys.key), h, kv_dim, spec.qkv_bias)?,
            value: Linear::load(vb.pp(keys.value), h, kv_dim, spec.qkv_bias)?,
            output: Linear::load(vb.pp(keys.output), q_dim, h, spec.o_bias)?,
            qk_norm,
            heads: shape.num_heads,
            kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            scale: spec.attention_scale,
        })
    }

    /// `x`: `(B, T, H)`; `bias`: `(B, 1, T, T)`; `cos`/`sin`: `(T, D/2)`.
    fn forward(&self, x: &Tensor, bias: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // 1. Project and split heads: q (B, Hq, T, D), k (B, Hkv, T, D); v
        //    stays (B, T, Hkv·D), which attention reads in place.
        let mut q = split_heads(&self.query.forward(x)?, self.heads, self.head_dim)?;
        let mut k = split_heads(&self.key.forward(x)?, self.kv_heads, self.head_dim)?;
        let v = self.value.forward(x)?;
        // 2. Per-head RMSNorm of q and k (Qwen3, Gemma3).
        if let Some((query_norm, key_norm)) = &self.qk_norm {
            q = query_norm.forward(&q)?;
            k = key_norm.forward(&k)?;
        }
        // 3. Rotary position embedding.
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        // 4. Attention and output projection.
        let context = multi_head_attention(
            &q,
            &k,
            &v,
            self.heads,
            self.kv_heads,
            self.head_dim,
            Some(bias),
            self.scale,
        )?;
        self.output.forward(&context)
    }

    fn parameter_count(&self) -> usize {
        let norms = self
            .qk_norm
            .as_ref()
            .map_or(0, |(q, k)| q.parameter_count() + k.parameter_count());
        self.query.parameter_count()
            + self.key.parameter_count()
            + self.value.parameter_count()
            + self.output.parameter_count()
            + norms
    }
}

/// The gated MLP: `down(act(gate(x)) * up(x))`.
struct GatedMlp {
    gate: super::layers::Linear,
    up: super::layers::Linear,
    down: super::layers::Linear,
    act: Activation,
}

impl GatedMlp {
    fn load(vb: VarBuilder, spec: &DecoderSpec, mlp: MlpShape) -> Result<Self> {
        use super::layers::Linear;
        let (h, i) = (spec.hidden_size, mlp.intermediate_size);
        let keys = &spec.checkpoint.mlp;
        let gate = keys.gate.ok_or_else(|| {
            candle_core::Error::Msg(
                "the decoder MLP is gated: the checkpoint map names no gate".into(),
            )
        })?;
        Ok(Self {
            gate: Linear::load(vb.pp(gate), h, i, spec.mlp_bias)?,
            up: Linear::load(vb.pp(keys.up), h, i, spec.mlp_bias)?,
            down: Linear::load(vb.pp(keys.down), i, h, spec.mlp_bias)?,
            act: spec.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, layer: usize, hooks: &mut dyn ForwardHooks) -> Result<Tensor> {
        let gate = self.gate.forward_then(x, self.act)?;
        let a = hooks.mlp_activation(layer, (gate * self.up.forward(x)?)?)?;
        hooks.mlp_output(layer, self.down.forward(&a)?)
    }

    fn parameter_count(&self) -> usize {
        self.gate.parameter_count() + self.up.parameter_count() + self.down.parameter_count()
    }
}

/// A residual sub-layer: `x + post_norm(f(pre_norm(x)))`.
struct Residual<F> {
    pre_norm: RmsNorm,
    inner: F,
    post_norm: Option<RmsNorm>,
}

impl<F> Residual<F> {
    fn finish(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let y = match &self.post_norm {
            Some(norm) => norm.forward(&y)?,
            None => y,
        };
        x + y
    }

    fn norm_parameters(&self) -> usize {
        self.pre_norm.parameter_count()
            + self.post_norm.as_ref().map_or(0, RmsNorm::parameter_count)
    }
}

/// One layer's weights and which shared mask and rotary table it uses.
pub struct DecoderLayer {
    attention: Residual<Attention>,
    mlp: Option<Residual<GatedMlp>>,
    /// Index into the per-forward masks.
    mask: usize,
    /// Index into the model's rotary tables.
    rotary: usize,
}

impl DecoderLayer {
    /// Runs layer `i` on the residual stream `x`.
    pub(crate) fn forward(
        &self,
        i: usize,
        x: Tensor,
        context: &ForwardContext,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        let (cos, sin) = &context.cos_sin[self.rotary];
        let layer_in = x.clone();
        let mut x = x;
        if !hooks.skip(i, Sublayer::Attention) {
            let attn = &self.attention;
            let y = attn.inner.forward(
                &attn.pre_norm.forward(&x)?,
                &context.masks[self.mask],
                cos,
                sin,
            )?;
            let out = attn.finish(&x, y)?;
            hooks.observe(i, Sublayer::Attention, &x, &out)?;
            x = out;
        }
        if let Some(mlp) = self.mlp.as_ref().filter(|_| !hooks.skip(i, Sublayer::Mlp)) {
            let y = mlp.inner.forward(&mlp.pre_norm.forward(&x)?, i, hooks)?;
            let out = mlp.finish(&x, y)?;
            hooks.observe(i, Sublayer::Mlp, &x, &out)?;
            x = out;
        }
        hooks.observe(i, Sublayer::Block, &layer_in, &x)?;
        Ok(x)
    }

    fn parameters(&self) -> LayerParameters {
        LayerParameters {
            attention: self.attention.inner.parameter_count() + self.attention.norm_parameters(),
            mlp: self
                .mlp
                .as_ref()
                .map_or(0, |m| m.inner.parameter_count() + m.norm_parameters()),
        }
    }
}

/// What every layer of one forward pass shares: the attention masks of
/// each pattern and the rotary tables of each kind of layer.
pub struct ForwardContext {
    masks: Vec<Tensor>,
    cos_sin: Vec<(Tensor, Tensor)>,
}

/// How a decoder's parts are found and built, holding no weight: each
/// `load_*` reads its part from the builder it is given. [`Model`] loads
/// them all, a layer-at-a-time pass ([`crate::model::layer_stream`]) one
/// at a time, through the same code.
pub struct DecoderParts {
    spec: DecoderSpec,
    shape: ModelShape,
    /// `model.` when the checkpoint nests the stack (`*ForCausalLM`).
    prefix: &'static str,
    /// Distinct attention patterns; layers refer to them by index.
    patterns: Vec<AttentionPattern>,
    rotaries: Vec<Rotary>,
    /// Each layer's (mask, rotary) indices.
    layer_slots: Vec<(usize, usize)>,
}

impl DecoderParts {
    /// The parts of the checkpoint `vb` reads (nested under `model.` or not).
    pub fn new(vb: &VarBuilder, spec: &DecoderSpec, shape: &ModelShape) -> Result<Self> {
        let map = spec.checkpoint;
        let prefix = if vb.contains_tensor(&map.nested_probe()) {
            map.nested_prefix
        } else {
            ""
        };
        if shape.layers.len() != spec.layers.len() {
            return Err(candle_core::Error::Msg(format!(
                "the shape has {} layers, the config {}",
                shape.layers.len(),
                spec.layers.len()
            )));
        }
        let mut patterns: Vec<AttentionPattern> = Vec::new();
        let mut ropes: Vec<(RopeSpec, usize)> = Vec::new();
        let layer_slots = shape
            .layers
            .iter()
            .zip(&spec.layers)
            .map(|(layer_shape, attn_spec)| {
                (
                    index_of_or_push(&mut patterns, attn_spec.pattern),
                    index_of_or_push(&mut ropes, (attn_spec.rope, layer_shape.head_dim)),
                )
            })
            .collect();
        let rotaries = ropes
            .iter()
            .map(|(rope, head_dim)| Rotary::new(*head_dim, rope.theta, rope.scaling))
            .collect();
        Ok(Self {
            spec: spec.clone(),
            shape: shape.clone(),
            prefix,
            patterns,
            rotaries,
            layer_slots,
        })
    }

    /// `vb` at the stack's root (under the nested prefix, if any).
    fn stack(&self, vb: &VarBuilder<'static>) -> VarBuilder<'static> {
        match self.prefix {
            "" => vb.clone(),
            nested => vb.pp(nested.trim_end_matches('.')),
        }
    }

    pub fn layer_count(&self) -> usize {
        self.shape.layers.len()
    }

    /// The checkpoint name of the token embedding table.
    pub fn token_table_name(&self) -> String {
        format!(
            "{}{}.weight",
            self.prefix, self.spec.checkpoint.embeddings.tokens
        )
    }

    fn norm(&self, vb: VarBuilder) -> Result<RmsNorm> {
        let spec = &self.spec;
        RmsNorm::load(vb, spec.hidden_size, spec.norm_eps, spec.norm_unit_offset)
    }

    fn sublayer_norms(
        &self,
        vb: &VarBuilder,
        norms: SublayerNorms,
    ) -> Result<(RmsNorm, Option<RmsNorm>)> {
        let input = norms.input.ok_or_else(|| {
            candle_core::Error::Msg("a pre-norm decoder sub-layer has an input norm".into())
        })?;
        Ok((
            self.norm(vb.pp(input))?,
            norms.output.map(|o| self.norm(vb.pp(o))).transpose()?,
        ))
    }

    /// Loads layer `i`'s weights from `vb`.
    pub fn load_layer(&self, vb: &VarBuilder<'static>, i: usize) -> Result<DecoderLayer> {
        let (spec, map) = (&self.spec, self.spec.checkpoint);
        let layer_shape = &self.shape.layers[i];
        let vb = self.stack(vb).pp(map.layers).pp(i);
        let (mask, rotary) = self.layer_slots[i];
        let (pre_norm, post_norm) = self.sublayer_norms(&vb, map.attention.norms)?;
        let attention = Residual {
            pre_norm,
            inner: Attention::load(vb.clone(), spec, layer_shape)?,
            post_norm,
        };
        let mlp = match layer_shape.mlp {
            None => None,
            Some(mlp_shape) => {
                let (pre_norm, post_norm) = self.sublayer_norms(&vb, map.mlp.norms)?;
                Some(Residual {
                    pre_norm,
                    inner: GatedMlp::load(vb.clone(), spec, mlp_shape)?,
                    post_norm,
                })
            }
        };
        Ok(DecoderLayer {
            attention,
            mlp,
            mask,
            rotary,
        })
    }

    /// Loads the norm after the last layer from `vb`.
    pub(crate) fn load_final_norm(&self, vb: &VarBuilder<'static>) -> Result<RmsNorm> {
        self.norm(
            self.stack(vb).pp(self
                .spec
                .checkpoint
                .final_norm
                .ok_or_else(|| candle_core::Error::Msg("a decoder has a final norm".into()))?),
        )
    }

    /// Loads the whole token embedding table from `vb`.
    fn load_token_table(&self, vb: &VarBuilder<'static>) -> Result<Tensor> {
        self.stack(vb).get(
            (self.spec.vocab_size, self.spec.hidden_size),
            &format!("{}.weight", self.spec.checkpoint.embeddings.tokens),
        )
    }

    /// The residual stream entering layer 0, from the table rows of the
    /// batch's tokens (`(B·T, H)`, in `input_ids` order).
    pub fn embed(&self, rows: Tensor, input: &ModelInput) -> Result<Tensor> {
        let (b, t) = input.input_ids.dims2()?;
        let x = rows.reshape((b, t, self.spec.hidden_size))?;
        match self.spec.embed_scale {
            Some(scale) => x * scale,
            None => Ok(x),
        }
    }

    /// The masks and rotary tables of one batch.
    pub fn context(&self, input: &ModelInput) -> Result<ForwardContext> {
        let t = input.input_ids.dim(1)?;
        let device = input.input_ids.device();
        Ok(ForwardContext {
            masks: self
                .patterns
                .iter()
                .map(|p| attention_bias(&input.attention_mask, *p))
                .collect::<Result<Vec<_>>>()?,
            cos_sin: self
                .rotaries
                .iter()
                .map(|r| r.cos_sin(t, device))
                .collect::<Result<Vec<_>>>()?,
        })
    }
}

/// A decoder stack whose layers may lack their MLP or have their own width.
pub struct Model {
    parts: DecoderParts,
    token_embeddings: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
}

impl Model {
    pub(crate) fn load(
        vb: VarBuilder<'static>,
        spec: &DecoderSpec,
        shape: &ModelShape,
    ) -> Result<Self> {
        let parts = DecoderParts::new(&vb, spec, shape)?;
        let layers = (0..parts.layer_count())
            .map(|i| parts.load_layer(&vb, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embeddings: parts.load_token_table(&vb)?,
            norm: parts.load_final_norm(&vb)?,
            layers,
            parts,
        })
    }

    /// The residual stream entering layer 0 (scaled token embeddings).
    pub(crate) fn embed(&self, input: &ModelInput) -> Result<Tensor> {
        let rows = self
            .token_embeddings
            .index_select(&input.input_ids.flatten_all()?, 0)?;
        self.parts.embed(rows, input)
    }

    /// The masks and rotary tables the layers share for `input`.
    /// Positions are `0..T` for every row, as in Hugging Face; with left
    /// padding RoPE's relative form makes the result independent of the pad
    /// count.
    pub(crate) fn context(&self, input: &ModelInput) -> Result<ForwardContext> {
        self.parts.context(input)
    }

    /// Runs layer `i` on the residual stream `x`.
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        x: Tensor,
        context: &ForwardContext,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        self.layers[i].forward(i, x, context, hooks)
    }

    /// The norm after the last layer.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.parts.spec.hidden_size
    }

    pub fn embedding_parameters(&self) -> usize {
        self.token_embeddings.elem_count() + self.norm.parameter_count()
    }

    pub fn layer_parameters(&self) -> Vec<LayerParameters> {
        self.layers.iter().map(DecoderLayer::parameters).collect()
    }
}

fn index_of_or_push<T: PartialEq>(items: &mut Vec<T>, item: T) -> usize {
    match items.iter().position(|x| *x == item) {
        Some(i) => i,
        None => {
            items.push(item);
            items.len() - 1
        }
    }
}
