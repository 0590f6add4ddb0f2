//! Where each architecture keeps its weights: the one description of a
//! checkpoint's tensor names that every stage reads (loading, pruning,
//! ONNX emission and rewriting, LoRA, the tests). No other module spells a
//! tensor name.
//!
//! Module paths are relative to the backbone (after the optional nested
//! prefix, `bert.` or `model.`) and, for layer modules, to the layer
//! (`encoder.layer.3.` / `layers.3.`). Each module holds `weight` and, where
//! the architecture has one, `bias`.

use super::forward::Sublayer;

/// Where a norm sits relative to its sub-layer `f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + f(norm(x))`: pre-norm decoders.
    Input,
    /// `x + norm(f(..))`: Gemma's post-norm ("sandwich").
    Output,
    /// `norm(x + f(x))`: post-LayerNorm BERT. The norm belongs to the
    /// sub-layer: a dropped sub-layer takes it along.
    Residual,
}

/// The norms around one sub-layer, each a module path under the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SublayerNorms {
    pub input: Option<&'static str>,
    pub output: Option<&'static str>,
    pub residual: Option<&'static str>,
}

impl SublayerNorms {
    /// Every norm with its placement, in the order the sub-layer applies them.
    pub fn all(&self) -> impl Iterator<Item = (NormPlacement, &'static str)> {
        [
            (NormPlacement::Input, self.input),
            (NormPlacement::Output, self.output),
            (NormPlacement::Residual, self.residual),
        ]
        .into_iter()
        .filter_map(|(placement, module)| module.map(|m| (placement, m)))
    }
}

/// The token, position and token-type embeddings and their norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingKeys {
    /// The token embedding table (module; its tensor is `weight`).
    pub tokens: &'static str,
    pub positions: Option<&'static str>,
    pub token_types: Option<&'static str>,
    pub norm: Option<&'static str>,
}

/// One layer's attention sub-layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionKeys {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    /// The output projection (`o_proj`, BERT's `attention.output.dense`).
    pub output: &'static str,
    /// Per-head RMSNorm of queries and keys (Qwen3, Gemma3).
    pub query_norm: Option<&'static str>,
    pub key_norm: Option<&'static str>,
    pub norms: SublayerNorms,
}

/// One layer's MLP sub-layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpKeys {
    /// The gate of a gated MLP (`act(gate x) * up x`); `None` for `act(up x)`.
    pub gate: Option<&'static str>,
    /// The input projection whose rows are the neurons (BERT's `intermediate.dense`).
    pub up: &'static str,
    /// The output projection whose columns are the neurons (BERT's `output.dense`).
    pub down: &'static str,
    pub norms: SublayerNorms,
}

/// The projections of a layer, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Query,
    Key,
    Value,
    AttentionOutput,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub fn sublayer(self) -> Sublayer {
        match self {
            Self::Query | Self::Key | Self::Value | Self::AttentionOutput => Sublayer::Attention,
            Self::Gate | Self::Up | Self::Down => Sublayer::Mlp,
        }
    }

    /// Whether the projection reads the sub-layer's input (rather than
    /// writing its output back to the residual stream).
    pub fn reads_input(self) -> bool {
        !matches!(self, Self::AttentionOutput | Self::Down)
    }
}

/// An architecture's checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointMap {
    /// The prefix of task-model checkpoints (`BertForMaskedLM`,
    /// `LlamaForCausalLM`) that nest the backbone.
    pub nested_prefix: &'static str,
    pub embeddings: EmbeddingKeys,
    /// The layer list (`encoder.layer`, `layers`); layer `i` is `{layers}.{i}`.
    pub layers: &'static str,
    pub attention: AttentionKeys,
    pub mlp: MlpKeys,
    /// The norm after the last layer (decoders).
    pub final_norm: Option<&'static str>,
}

/// Names of the tensors of one layer's MLP sub-layer in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpTensors {
    /// Weights (and biases) whose rows are the intermediate neurons.
    pub rows: Vec<String>,
    /// The output projection: its columns are the neurons.
    pub down: String,
    /// The output projection's bias (absent from checkpoints without one).
    pub down_bias: String,
    /// The rest of the residual block (output bias, norms), removed with a dropped MLP.
    pub others: Vec<String>,
}

impl CheckpointMap {
    /// The key prefix of a checkpoint holding `names`: the nested prefix
    /// when the backbone is nested, else `""`.
    pub fn prefix<'a>(&self, mut names: impl Iterator<Item = &'a String>) -> &'static str {
        let probe = self.nested_probe();
        if names.any(|n| *n == probe) {
            self.nested_prefix
        } else {
            ""
        }
    }

    /// The token table's name in a nested checkpoint: present exactly when
    /// the backbone is nested.
    pub fn nested_probe(&self) -> String {
        format!("{}{}.weight", self.nested_prefix, self.embeddings.tokens)
    }

    /// The module path of layer `layer`.
    pub fn layer(&self, layer: usize) -> String {
        format!("{}.{layer}", self.layers)
    }

    /// The module `module` (a path under the layer) of layer `layer`.
    pub fn layer_module(&self, layer: usize, module: &str) -> String {
        format!("{}.{layer}.{module}", self.layers)
    }

    /// The module path of a projection role under the layer.
    pub fn projection(&self, role: Projection) -> Option<&'static str> {
        let (a, m) = (&self.attention, &self.mlp);
        match role {
            Projection::Query => Some(a.query),
            Projection::Key => Some(a.key),
            Projection::Value => Some(a.value),
            Projection::AttentionOutput => Some(a.output),
            Projection::Gate => m.gate,
            Projection::Up => Some(m.up),
            Projection::Down => Some(m.down),
        }
    }

    /// Every projection of a layer: role and module path under the layer.
    pub fn projections(&self) -> Vec<(Projection, &'static str)> {
        use Projection::*;
        [Query, Key, Value, AttentionOutput, Gate, Up, Down]
            .into_iter()
            .filter_map(|role| Some((role, self.projection(role)?)))
            .collect()
    }

    /// The norms around a sub-layer.
    pub fn norms(&self, sublayer: Sublayer) -> SublayerNorms {
        match sublayer {
            Sublayer::Attention => self.attention.norms,
            Sublayer::Mlp => self.mlp.norms,
            Sublayer::Block => SublayerNorms {
                input: None,
                output: None,
                residual: None,
            },
        }
    }

    /// Reads a layer module path (`layers.3.mlp.up_proj`, no checkpoint
    /// prefix) as its layer and projection role.
    pub fn locate_projection(&self, module: &str) -> Option<(usize, Projection)> {
        let rest = module.strip_prefix(self.layers)?.strip_prefix('.')?;
        let (index, path) = rest.split_once('.')?;
        let layer = index.parse().ok()?;
        let role = self
            .projections()
            .into_iter()
            .find(|(_, p)| *p == path)
            .map(|(role, _)| role)?;
        Some((layer, role))
    }

    /// The norm applied at `placement` around the sub-layer of the
    /// projection `module` (a layer module path), as a layer module path.
    pub fn norm_around(&self, module: &str, placement: NormPlacement) -> Option<String> {
        let (layer, role) = self.locate_projection(module)?;
        self.norms(role.sublayer())
            .all()
            .find(|(p, _)| *p == placement)
            .map(|(_, norm)| self.layer_module(layer, norm))
    }

    /// The MLP tensors of `layer`, under the checkpoint's `prefix`.
    pub fn mlp_tensors(&self, prefix: &str, layer: usize) -> MlpTensors {
        let key = |module: &str, tensor: &str| {
            format!("{prefix}{}.{tensor}", self.layer_module(layer, module))
        };
        let inputs: Vec<&str> = self.mlp.gate.into_iter().chain([self.mlp.up]).collect();
        let down_bias = key(self.mlp.down, "bias");
        MlpTensors {
            rows: ["weight", "bias"]
                .iter()
                .flat_map(|t| inputs.iter().map(|m| key(m, t)))
                .collect(),
            down: key(self.mlp.down, "weight"),
            others: std::iter::once(down_bias.clone())
                .chain(
                    self.mlp
                        .norms
                        .all()
                        .flat_map(|(_, n)| [key(n, "weight"), key(n, "bias")]),
                )
                .collect(),
            down_bias,
        }
    }

    /// Whether `name`, a tensor of a checkpoint whose keys carry `prefix`,
    /// belongs to a layer's MLP sub-layer: its projections, their biases
    /// and the residual block's norms ([`Self::mlp_tensors`]).
    pub fn is_mlp_tensor(&self, prefix: &str, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(self.layers))
            .and_then(|r| r.strip_prefix('.'))
        else {
            return false;
        };
        let Some(Ok(layer)) = rest.split_once('.').map(|(i, _)| i.parse::<usize>()) else {
            return false;
        };
        let mlp = self.mlp_tensors(prefix, layer);
        mlp.down == name
            || mlp.rows.iter().any(|n| n == name)
            || mlp.others.iter().any(|n| n == name)
    }

    /// Whether `name` (a tensor name, with or without prefix) is an embedding table.
    pub fn is_embedding(&self, name: &str) -> bool {
        let e = &self.embeddings;
        [Some(e.tokens), e.positions, e.token_types]
            .into_iter()
            .flatten()
            .any(|table| {
                name.strip_suffix(".weight")
                    .is_some_and(|module| module.ends_with(table))
            })
    }
}

/// BERT (and MiniLM, BGE, E5 of the BERT family): post-LayerNorm encoder.
/// Reference: transformers `models/bert/modeling_bert.py`.
pub const BERT: CheckpointMap = CheckpointMap {
    nested_prefix: "bert.",
    embeddings: EmbeddingKeys {
        tokens: "embeddings.word_embeddings",
        positions: Some("embeddings.position_embeddings"),
        token_types: Some("embeddings.token_type_embeddings"),
        norm: Some("embeddings.LayerNorm"),
    },
    layers: "encoder.layer",
    attention: AttentionKeys {
        query: "attention.self.query",
        key: "attention.self.key",
        value: "attention.self.value",
        output: "attention.output.dense",
        query_norm: None,
        key_norm: None,
        norms: SublayerNorms {
            input: None,
            output: None,
            residual: Some("attention.output.LayerNorm"),
        },
    },
    mlp: MlpKeys {
        gate: None,
        up: "intermediate.dense",
        down: "output.dense",
        norms: SublayerNorms {
            input: None,
            output: None,
            residual: Some("output.LayerNorm"),
        },
    },
    final_norm: None,
};

/// Llama, Mistral and Qwen2: pre-norm decoder, gated MLP; the MLP's input
/// norm is called `post_attention_layernorm`.
/// Reference: transformers `models/llama/modeling_llama.py`.
pub const LLAMA: CheckpointMap = CheckpointMap {
    nested_prefix: "model.",
    embeddings: EmbeddingKeys {
        tokens: "embed_tokens",
        positions: None,
        token_types: None,
        norm: None,
    },
    layers: "layers",
    attention: AttentionKeys {
        query: "self_attn.q_proj",
        key: "self_attn.k_proj",
        value: "self_attn.v_proj",
        output: "self_attn.o_proj",
        query_norm: None,
        key_norm: None,
        norms: SublayerNorms {
            input: Some("input_layernorm"),
            output: None,
            residual: None,
        },
    },
    mlp: MlpKeys {
        gate: Some("mlp.gate_proj"),
        up: "mlp.up_proj",
        down: "mlp.down_proj",
        norms: SublayerNorms {
            input: Some("post_attention_layernorm"),
            output: None,
            residual: None,
        },
    },
    final_norm: Some("norm"),
};

/// Qwen3: Llama's layout plus per-head query and key norms.
/// Reference: transformers `models/qwen3/modeling_qwen3.py`.
pub const QWEN3: CheckpointMap = CheckpointMap {
    attention: AttentionKeys {
        query_norm: Some("self_attn.q_norm"),
        key_norm: Some("self_attn.k_norm"),
        ..LLAMA.attention
    },
    ..LLAMA
};

/// Gemma3 (EmbeddingGemma): query and key norms, and a norm before and
/// after each sub-layer; `post_attention_layernorm` is the attention's
/// output norm here, not the MLP's input norm.
/// Reference: transformers `models/gemma3/modeling_gemma3.py`.
pub const GEMMA3: CheckpointMap = CheckpointMap {
    attention: AttentionKeys {
        norms: SublayerNorms {
            input: Some("input_layernorm"),
            output: Some("post_attention_layernorm"),
            residual: None,
        },
        ..QWEN3.attention
    },
    mlp: MlpKeys {
        norms: SublayerNorms {
            input: Some("pre_feedforward_layernorm"),
            output: Some("post_feedforward_layernorm"),
            residual: None,
        },
        ..LLAMA.mlp
    },
    ..LLAMA
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_located_from_their_module_paths() {
        assert_eq!(
            LLAMA.locate_projection("layers.3.mlp.up_proj"),
            Some((3, Projection::Up))
        );
        assert_eq!(
            BERT.locate_projection("encoder.layer.11.attention.output.dense"),
            Some((11, Projection::AttentionOutput))
        );
        assert_eq!(
            BERT.locate_projection("encoder.layer.1.output.LayerNorm"),
            None
        );
        assert_eq!(LLAMA.locate_projection("layers.x.mlp.up_proj"), None);
    }

    /// What `trained: mlp` trains: each MLP's projections, biases and
    /// norms, under either key prefix, and nothing of attention (BERT's
    /// `attention.output.*` included), the embeddings or the final norm.
    #[test]
    fn mlp_tensors_are_told_from_the_rest_for_every_layout() {
        let cases: [(&CheckpointMap, &[&str], &[&str]); 4] = [
            (
                &BERT,
                &[
                    "encoder.layer.0.intermediate.dense.weight",
                    "encoder.layer.0.intermediate.dense.bias",
                    "encoder.layer.5.output.dense.weight",
                    "encoder.layer.5.output.dense.bias",
                    "encoder.layer.5.output.LayerNorm.weight",
                    "encoder.layer.5.output.LayerNorm.bias",
                ],
                &[
                    "encoder.layer.5.attention.output.dense.weight",
                    "encoder.layer.5.attention.output.LayerNorm.weight",
                    "encoder.layer.5.attention.self.query.weight",
                    "embeddings.LayerNorm.weight",
                    "embeddings.word_embeddings.weight",
                    "pooler.dense.weight",
                ],
            ),
            (
                &LLAMA,
                &[
                    "layers.2.mlp.gate_proj.weight",
                    "layers.2.mlp.up_proj.weight",
                    "layers.2.mlp.down_proj.weight",
                    "layers.2.post_attention_layernorm.weight",
                ],
                &[
                    "layers.2.input_layernorm.weight",
                    "layers.2.self_attn.o_proj.weight",
                    "norm.weight",
                    "embed_tokens.weight",
                    "lm_head.weight",
                ],
            ),
            (
                &QWEN3,
                &["layers.0.mlp.down_proj.weight"],
                &[
                    "layers.0.self_attn.q_norm.weight",
                    "layers.0.self_attn.k_norm.weight",
                ],
            ),
            (
                &GEMMA3,
                &[
                    "layers.1.mlp.up_proj.weight",
                    "layers.1.pre_feedforward_layernorm.weight",
                    "layers.1.post_feedforward_layernorm.weight",
                ],
                &[
                    "layers.1.post_attention_layernorm.weight",
                    "layers.1.input_layernorm.weight",
                    "layers.1.self_attn.v_proj.weight",
                ],
            ),
        ];
        for (map, mlp, others) in cases {
            for prefix in ["", map.nested_prefix] {
                for name in mlp {
                    let name = format!("{prefix}{name}");
                    assert!(map.is_mlp_tensor(prefix, &name), "{name} is an MLP tensor");
                }
                for name in others {
                    let name = format!("{prefix}{name}");
                    assert!(
                        !map.is_mlp_tensor(prefix, &name),
                        "{name} is not an MLP tensor"
                    );
                }
            }
        }
    }

    #[test]
    fn the_mlp_input_norm_is_the_architectures_own() {
        assert_eq!(
            LLAMA.norm_around("layers.2.mlp.gate_proj", NormPlacement::Input),
            Some("layers.2.post_attention_layernorm".into())
        );
        assert_eq!(
            GEMMA3.norm_around("layers.2.mlp.gate_proj", NormPlacement::Input),
            Some("layers.2.pre_feedforward_layernorm".into())
        );
        assert_eq!(
            BERT.norm_around("encoder.layer.0.output.dense", NormPlacement::Residual),
            Some("encoder.layer.0.output.LayerNorm".into())
        );
        assert_eq!(
            BERT.norm_around("encoder.layer.0.intermediate.dense", NormPlacement::Input),
            None
        );
    }

    #[test]
    fn a_dropped_mlp_takes_its_norms_and_output_bias() {
        let t = GEMMA3.mlp_tensors("model.", 1);
        assert_eq!(t.down, "model.layers.1.mlp.down_proj.weight");
        assert!(t
            .rows
            .contains(&"model.layers.1.mlp.gate_proj.weight".into()));
        assert!(t
            .others
            .contains(&"model.layers.1.post_feedforward_layernorm.weight".into()));
        let b = BERT.mlp_tensors("", 0);
        assert_eq!(
            b.rows[..1],
            ["encoder.layer.0.intermediate.dense.weight".to_string()]
        );
        assert!(b
            .others
            .contains(&"encoder.layer.0.output.LayerNorm.bias".into()));
    }
}
