//! A GGUF model's architecture in Hugging Face terms: the `config.json` its
//! metadata implies and, for each GGUF tensor, the checkpoint name effir's
//! [`CheckpointMap`] gives it, with llama.cpp's rotary row permutation of
//! the query and key projections undone where the converter applied it.
//!
//! Handled: `llama` (Llama, Mistral and SmolLM2 files), `qwen2` and `qwen3`.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::gguf_file::{GgufFile, TensorInfo};
use crate::error::{Error, Result};
use crate::model::arch::checkpoint_map::{CheckpointMap, Projection, LLAMA, QWEN3};

/// A GGUF architecture effir imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArchitecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl GgufArchitecture {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// `general.architecture`, the prefix of the architecture's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    fn checkpoint(self) -> &'static CheckpointMap {
        match self {
            Self::Llama | Self::Qwen2 => &LLAMA,
            Self::Qwen3 => &QWEN3,
        }
    }

    /// llama.cpp's converter permutes the query and key rows of Llama
    /// checkpoints into its rotary layout (`LlamaModel.permute`); Qwen
    /// checkpoints use the NeoX layout and are stored as they are.
    fn permutes_query_key(self) -> bool {
        self == Self::Llama
    }

    fn has_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    fn transformers_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// The dimensions of the model, read from the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufModel {
    pub architecture: GgufArchitecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    /// No `output.weight`: the output projection is the token table.
    pub tied_embeddings: bool,
}

/// Where one GGUF tensor goes in the Hugging Face checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorTarget {
    pub name: String,
    /// Undo llama.cpp's rotary row permutation over this many heads.
    pub unpermute_heads: Option<usize>,
    /// The shape the config implies.
    pub shape: Vec<usize>,
}

impl GgufModel {
    /// Reads the architecture and dimensions of `gguf`, refusing what effir
    /// cannot represent (an unknown architecture, rope scaling, partial
    /// rotary dimensions).
    pub fn read(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let arch_name = gguf.require_str("general.architecture")?;
        let architecture = GgufArchitecture::from_name(arch_name).ok_or_else(|| {
            Error::unsupported(
                path,
                format!(
                    "GGUF architecture `{arch_name}` (effir imports {})",
                    GgufArchitecture::SUPPORTED
                ),
            )
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let size = |k: &str| -> Result<usize> {
            let v = gguf.require_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 24)
                .ok_or_else(|| Error::config(path, format!("`{}` is {v}", key(k))))
        };
        let hidden_size = size("embedding_length")?;
        let heads = size("attention.head_count")?;
        let kv_heads = match gguf.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => size("attention.head_count_kv")?,
            None => heads,
        };
        let stated_head_dim = gguf.metadata.contains_key(&key("attention.key_length"));
        let head_dim = if stated_head_dim {
            size("attention.key_length")?
        } else {
            hidden_size / heads
        };
        if heads % kv_heads != 0 || (!stated_head_dim && hidden_size % heads != 0) {
            return Err(Error::config(
                path,
                format!("{heads} attention heads, {kv_heads} key/value heads and hidden size {hidden_size} do not divide"),
            ));
        }
        if architecture.permutes_query_key() && head_dim % 2 != 0 {
            return Err(Error::unsupported(
                path,
                format!("an odd head size ({head_dim}) with llama.cpp's rotary row permutation"),
            ));
        }
        if let Some(v) = gguf.metadata.get(&key("attention.value_length")) {
            if v.as_u64() != Some(head_dim as u64) {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "`{}` {v:?} different from the key length {head_dim}",
                        key("attention.value_length")
                    ),
                ));
            }
        }
        if let Some(v) = gguf.metadata.get(&key("rope.dimension_count")) {
            if v.as_u64() != Some(head_dim as u64) {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "partial rotary embeddings (`{}` {v:?} of head size {head_dim})",
                        key("rope.dimension_count")
                    ),
                ));
            }
        }
        for scaling in ["rope.scaling.type", "rope.scaling.factor"] {
            if let Some(v) = gguf.metadata.get(&key(scaling)) {
                let none = v.as_str() == Some("none")
                    || v.as_f64() == Some(1.0)
                    || v.as_f64() == Some(0.0);
                if !none {
                    return Err(Error::unsupported(
                        path,
                        format!("rope scaling (`{}` is {v:?})", key(scaling)),
                    ));
                }
            }
        }
        if gguf.tensor("rope_freqs.weight").is_some() {
            return Err(Error::unsupported(
                path,
                "per-frequency rope factors (tensor `rope_freqs.weight`, Llama 3.1 rope scaling)",
            ));
        }
        let rms_norm_eps = gguf
            .require(&key("attention.layer_norm_rms_epsilon"))?
            .as_f64()
            .filter(|e| *e > 0.0 && *e < 1.0)
            .ok_or_else(|| {
                Error::config(
                    path,
                    format!(
                        "`{}` is not a small positive number",
                        key("attention.layer_norm_rms_epsilon")
                    ),
                )
            })?;
        let rope_theta = match gguf.metadata.get(&key("rope.freq_base")) {
            Some(v) => v.as_f64().filter(|t| *t > 1.0).ok_or_else(|| {
                Error::config(path, format!("`{}` is {v:?}", key("rope.freq_base")))
            })?,
            None => 10_000.0,
        };
        let vocab_size = match gguf.metadata.get("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.as_array().map_or(0, <[_]>::len),
            None => size("vocab_size")?,
        };
        let tokens = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| missing(path, "token_embd.weight"))?;
        if tokens.dims != [vocab_size, hidden_size] {
            return Err(Error::config(
                path,
                format!(
                    "tensor `token_embd.weight` has shape {:?}; the vocabulary ({vocab_size} tokens) and `{}` imply [{vocab_size}, {hidden_size}]",
                    tokens.dims,
                    key("embedding_length")
                ),
            ));
        }
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: size("feed_forward_length")?,
            layers: size("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            context_length: size("context_length")?,
            tied_embeddings: gguf.tensor("output.weight").is_none(),
        })
    }

    /// The Hugging Face checkpoint name and shape of GGUF tensor `name`, or
    /// `None` for a tensor effir does not know.
    pub fn target(&self, name: &str) -> Option<TensorTarget> {
        let map = self.architecture.checkpoint();
        let prefix = map.nested_prefix;
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let (q_rows, kv_rows) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let plain = |name: String, shape: Vec<usize>| TensorTarget {
            name,
            unpermute_heads: None,
            shape,
        };
        match name {
            "token_embd.weight" => {
                return Some(plain(
                    format!("{prefix}{}.weight", map.embeddings.tokens),
                    vec![self.vocab_size, h],
                ))
            }
            "output_norm.weight" => {
                return Some(plain(
                    format!("{prefix}{}.weight", map.final_norm?),
                    vec![h],
                ))
            }
            "output.weight" => {
                return Some(plain("lm_head.weight".into(), vec![self.vocab_size, h]))
            }
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, tensor) = rest.split_once('.')?;
        // Only the canonical spelling: `blk.01` or `blk.+1` would alias `blk.1`.
        let layer: usize = layer
            .parse()
            .ok()
            .filter(|&l: &usize| l < self.layers && l.to_string() == layer)?;
        let (module, suffix) = tensor.rsplit_once('.')?;
        let permute = self.architecture.permutes_query_key() && suffix == "weight";
        let (module_path, shape, unpermute_heads): (&str, Vec<usize>, Option<usize>) = match module
        {
            "attn_norm" => (map.attention.norms.input?, vec![h], None),
            "ffn_norm" => (map.mlp.norms.input?, vec![h], None),
            "attn_q_norm" => (map.attention.query_norm?, vec![self.head_dim], None),
            "attn_k_norm" => (map.attention.key_norm?, vec![self.head_dim], None),
            "attn_q" => (
                map.projection(Projection::Query)?,
                vec![q_rows, h],
                permute.then_some(self.heads),
            ),
            "attn_k" => (
                map.projection(Projection::Key)?,
                vec![kv_rows, h],
                permute.then_some(self.kv_heads),
            ),
            "attn_v" => (map.projection(Projection::Value)?, vec![kv_rows, h], None),
            "attn_output" => (
                map.projection(Projection::AttentionOutput)?,
                vec![h, q_rows],
                None,
            ),
            "ffn_gate" => (map.projection(Projection::Gate)?, vec![f, h], None),
            "ffn_up" => (map.projection(Projection::Up)?, vec![f, h], None),
            "ffn_down" => (map.projection(Projection::Down)?, vec![h, f], None),
            _ => return None,
        };
        let shape = match suffix {
            "weight" => shape,
            "bias"
                if self.architecture.has_qkv_bias()
                    && matches!(module, "attn_q" | "attn_k" | "attn_v") =>
            {
                vec![shape[0]]
            }
            _ => return None,
        };
        Some(TensorTarget {
            name: format!("{prefix}{}.{suffix}", map.layer_module(layer, module_path)),
            unpermute_heads,
            shape,
        })
    }

    /// The GGUF tensors every layer of this architecture must have.
    pub fn required_tensors(&self) -> Vec<String> {
        let mut names = vec![
            "token_embd.weight".to_string(),
            "output_norm.weight".to_string(),
        ];
        let mut per_layer = vec![
            "attn_norm.weight",
            "ffn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
        match self.architecture {
            GgufArchitecture::Llama => {}
            GgufArchitecture::Qwen2 => {
                per_layer.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"])
            }
            GgufArchitecture::Qwen3 => {
                per_layer.extend(["attn_q_norm.weight", "attn_k_norm.weight"])
            }
        }
        for layer in 0..self.layers {
            names.extend(per_layer.iter().map(|t| format!("blk.{layer}.{t}")));
        }
        names
    }

    /// The `config.json` of the imported model.
    pub fn config_json(&self, special: &SpecialTokenIds, torch_dtype: &str) -> Value {
        let mut config = Map::new();
        let mut set = |k: &str, v: Value| {
            config.insert(k.to_string(), v);
        };
        set(
            "architectures",
            json!([self.architecture.transformers_class()]),
        );
        set("model_type", json!(self.architecture.name()));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.layers));
        set("num_attention_heads", json!(self.heads));
        set("num_key_value_heads", json!(self.kv_heads));
        set("head_dim", json!(self.head_dim));
        set("hidden_act", json!("silu"));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set(
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": self.rope_theta}),
        );
        set("max_position_embeddings", json!(self.context_length));
        set("tie_word_embeddings", json!(self.tied_embeddings));
        set("attention_dropout", json!(0.0));
        match self.architecture {
            GgufArchitecture::Llama => {
                set("attention_bias", json!(false));
                set("mlp_bias", json!(false));
            }
            GgufArchitecture::Qwen2 => {
                set("use_sliding_window", json!(false));
                set("sliding_window", Value::Null);
            }
            GgufArchitecture::Qwen3 => {
                set("attention_bias", json!(false));
                set("use_sliding_window", json!(false));
                set("sliding_window", Value::Null);
            }
        }
        for (key, id) in [
            ("bos_token_id", special.bos),
            ("eos_token_id", special.eos),
            ("pad_token_id", special.pad),
        ] {
            if let Some(id) = id {
                set(key, json!(id));
            }
        }
        set("torch_dtype", json!(torch_dtype));
        Value::Object(config)
    }
}

/// The special token ids of the GGUF tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

fn missing(path: &Path, tensor: &str) -> Error {
    Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
    }
}

/// Checks the tensor directory against the architecture: every required
/// tensor present, no tensor effir does not know, every shape as the
/// metadata implies.
pub fn check_tensors(gguf: &GgufFile, model: &GgufModel) -> Result<()> {
    let path = gguf.path();
    // Each layer has at least nine tensors: a layer count the directory
    // cannot hold is refused before any name is built.
    if model.layers.saturating_mul(9).saturating_add(2) > gguf.tensors.len() {
        return Err(Error::config(
            path,
            format!(
                "`{}.block_count` says {} layers; the file holds {} tensors, too few for them",
                model.architecture.name(),
                model.layers,
                gguf.tensors.len()
            ),
        ));
    }
    for name in model.required_tensors() {
        if gguf.tensor(&name).is_none() {
            return Err(missing(path, &name));
        }
    }
    for info in &gguf.tensors {
        let target = model.target(&info.name).ok_or_else(|| {
            Error::unsupported(
                path,
                format!(
                    "tensor `{}` (not part of the {} layout effir imports)",
                    info.name,
                    model.architecture.name()
                ),
            )
        })?;
        if info.dims != target.shape {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: info.name.clone(),
                expected: target.shape,
                got: info.dims.clone(),
            });
        }
    }
    Ok(())
}

/// Undoes llama.cpp's rotary permutation of a query or key projection with
/// `heads` heads: within each head, llama.cpp interleaves the two halves of
/// the rotary dimensions (row `2·i + a` of the head holds the original row
/// `a·d + i`, `d` = half the head size); this puts them back.
pub fn unpermute_rows(values: &[f32], info: &TensorInfo, heads: usize) -> Vec<f32> {
    let rows = info.dims[0];
    let cols = values.len() / rows;
    let half = rows / heads / 2;
    let mut out = vec![0.0f32; values.len()];
    for head in 0..heads {
        let base = head * 2 * half;
        for i in 0..half {
            for a in 0..2 {
                let from = base + 2 * i + a;
                let to = base + a * half + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}
