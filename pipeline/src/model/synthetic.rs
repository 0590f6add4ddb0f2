//! Random-weight models of a named shape, for checking memory and time at
//! the paper's scale without the paper's weights: a Llama-layout
//! `config.json`, bf16 safetensors (shards with their index when the model
//! is larger than one shard), written tensor by tensor ([`ShardedWriter`]) (nothing the size of the model is ever in memory), and a
//! byte-level tokenizer. The weights are uniform with the standard
//! deviation of a freshly initialised transformer (0.02), norms are one;
//! the same shape and seed give the same bytes.

use std::path::Path;

use candle_core::DType;

use serde_json::{json, Map, Value};

use crate::data::sampling::SplitMix64;
use crate::error::Result;
use crate::io::atomic_file::{write_bytes_atomically, StagedDir};
use crate::io::safetensors_shards::{PlannedTensor, ShardedWriter};
use crate::model::arch::checkpoint_map::{CheckpointMap, Projection, LLAMA};
use crate::model::arch::Sublayer;
use crate::model::byte_level::byte_alphabet;

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticShape {
    pub name: &'static str,
    pub model_type: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
}

/// The shapes `examples/synthetic_model.rs` writes.
pub const SHAPES: [SyntheticShape; 4] = [
    // Mistral-7B (v0.1): the EffiR paper's backbone.
    SyntheticShape {
        name: "mistral-7b",
        model_type: "mistral",
        hidden: 4096,
        layers: 32,
        intermediate: 14336,
        heads: 32,
        kv_heads: 8,
        vocab: 32000,
        tied_embeddings: false,
    },
    // Llama-3.2-3B.
    SyntheticShape {
        name: "llama-3b",
        model_type: "llama",
        hidden: 3072,
        layers: 28,
        intermediate: 8192,
        heads: 24,
        kv_heads: 8,
        vocab: 128256,
        tied_embeddings: true,
    },
    // About 200M parameters, for the memory test.
    SyntheticShape {
        name: "llama-200m",
        model_type: "llama",
        hidden: 1024,
        layers: 12,
        intermediate: 2816,
        heads: 16,
        kv_heads: 4,
        vocab: 32000,
        tied_embeddings: true,
    },
    // A few MB, for tests of the streaming path.
    SyntheticShape {
        name: "tiny",
        model_type: "llama",
        hidden: 128,
        layers: 4,
        intermediate: 384,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        tied_embeddings: false,
    },
];

impl SyntheticShape {
    pub fn named(name: &str) -> Option<Self> {
        SHAPES.iter().copied().find(|s| s.name == name)
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor, in checkpoint order: name, shape, and whether it is a
    /// norm; names from the Llama [`CheckpointMap`] (Mistral's is the same).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let map: &CheckpointMap = &LLAMA;
        let prefix = map.nested_prefix;
        let (h, f, d) = (self.hidden, self.intermediate, self.head_dim());
        let weight = |module: String| format!("{prefix}{module}.weight");
        let mut out = vec![(
            weight(map.embeddings.tokens.to_string()),
            vec![self.vocab, h],
            false,
        )];
        let rows = |role: Projection| match role {
            Projection::Query => (self.heads * d, h),
            Projection::Key | Projection::Value => (self.kv_heads * d, h),
            Projection::AttentionOutput => (h, self.heads * d),
            Projection::Gate | Projection::Up => (f, h),
            Projection::Down => (h, f),
        };
        for l in 0..self.layers {
            for sublayer in [Sublayer::Attention, Sublayer::Mlp] {
                for (_, norm) in map.norms(sublayer).all() {
                    out.push((weight(map.layer_module(l, norm)), vec![h], true));
                }
                for (role, module) in map.projections() {
                    if role.sublayer() == sublayer {
                        let (r, c) = rows(role);
                        out.push((weight(map.layer_module(l, module)), vec![r, c], false));
                    }
                }
            }
        }
        if let Some(norm) = map.final_norm {
            out.push((weight(norm.to_string()), vec![h], true));
        }
        if !self.tied_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, h], false));
        }
        out
    }

    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    fn config(&self) -> Value {
        let mut c = Map::new();
        let arch = if self.model_type == "mistral" {
            "MistralForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        for (k, v) in [
            ("architectures", json!([arch])),
            ("model_type", json!(self.model_type)),
            ("vocab_size", json!(self.vocab)),
            ("hidden_size", json!(self.hidden)),
            ("intermediate_size", json!(self.intermediate)),
            ("num_hidden_layers", json!(self.layers)),
            ("num_attention_heads", json!(self.heads)),
            ("num_key_value_heads", json!(self.kv_heads)),
            ("head_dim", json!(self.head_dim())),
            ("hidden_act", json!("silu")),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_theta", json!(10000.0)),
            ("max_position_embeddings", json!(4096)),
            ("tie_word_embeddings", json!(self.tied_embeddings)),
            ("bos_token_id", json!(1)),
            ("eos_token_id", json!(2)),
            ("pad_token_id", json!(0)),
            ("torch_dtype", json!("bfloat16")),
        ] {
            c.insert(k.into(), v);
        }
        if self.model_type == "mistral" {
            c.insert("sliding_window".into(), Value::Null);
        }
        Value::Object(c)
    }
}

/// A byte-level BPE tokenizer with no merges: `<unk>`, `<s>`, `</s>`, then
/// the 256 bytes, so any text tokenizes (one token a byte).
fn byte_tokenizer() -> Value {
    let mut vocab = Map::new();
    for (id, token) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*token).into(), json!(id));
    }
    for (b, c) in byte_alphabet().iter().enumerate() {
        vocab.insert(c.to_string(), json!(3 + b));
    }
    let added: Vec<Value> = ["<unk>", "<s>", "</s>"]
        .iter()
        .enumerate()
        .map(|(id, t)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}

/// Writes a random-weight model of `shape` into the new directory `out`,
/// in shards of at most `shard_bytes` (a tensor larger than that gets a
/// shard of its own). Returns the bytes of weights written.
pub fn write_synthetic_model(
    shape: &SyntheticShape,
    out: &Path,
    shard_bytes: u64,
    seed: u64,
) -> Result<u64> {
    let staged = StagedDir::beside(out)?;
    let dir = staged.path();
    let tensors = shape.tensors();
    let planned = tensors
        .iter()
        .map(|(name, dims, _)| PlannedTensor {
            name: name.clone(),
            dtype: DType::BF16,
            shape: dims.clone(),
        })
        .collect();
    let mut writer = ShardedWriter::new(dir, planned, shard_bytes)?;
    let std = 0.02f32;
    let half_width = std * 3f32.sqrt();
    let mut total = 0u64;
    for (i, (name, dims, is_norm)) in tensors.iter().enumerate() {
        let n = dims.iter().product::<usize>();
        total += 2 * n as u64;
        // SplitMix64: a fast, seedable source of the weights.
        let mut rng = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut chunk = Vec::with_capacity(2 * n.min(1 << 20));
        writer.write_with(name, DType::BF16, dims, &mut |w| {
            let mut left = n;
            while left > 0 {
                let m = left.min(1 << 20);
                chunk.clear();
                for _ in 0..m {
                    let value = if *is_norm {
                        1.0f32
                    } else {
                        let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                        (2.0 * u - 1.0) * half_width
                    };
                    // bf16: the top half of the f32, rounded to nearest even.
                    let bits = value.to_bits();
                    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
                    chunk.extend_from_slice(&(rounded as u16).to_le_bytes());
                }
                w.write_all(&chunk)?;
                left -= m;
            }
            Ok(())
        })?;
    }
    writer.finish()?;
    write_bytes_atomically(
        &dir.join("config.json"),
        shape.config().to_string().as_bytes(),
    )?;
    write_bytes_atomically(
        &dir.join("tokenizer.json"),
        byte_tokenizer().to_string().as_bytes(),
    )?;
    let tokenizer_config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                                  "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 4096});
    write_bytes_atomically(
        &dir.join("tokenizer_config.json"),
        tokenizer_config.to_string().as_bytes(),
    )?;
    staged.publish(out)?;
    Ok(total)
}
