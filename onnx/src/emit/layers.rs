//! Building blocks of the emitted graphs, the ONNX counterparts of
//! `effir_pipeline::model::arch::layers`: linear layers, norms, activations,
//! rotary embeddings, attention masks and attention. Every block computes
//! what the candle block computes, with standard opset-17 operators only
//! (no contrib ops), so ONNX Runtime's CPU, CUDA and TensorRT providers all
//! take the graph.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_onnx::onnx::tensor_proto::DataType;
use effir_pipeline::io::weight_store::WeightStore;
use effir_pipeline::model::arch::layers::{Activation, AttentionPattern, MASKED};
use effir_pipeline::Error as PipelineError;

use crate::error::{Error, Result};
use crate::graph::{attr_float, attr_int, GraphBuilder};
use crate::quantize::{int8_matmul, MatmulPrecision};

/// The graph inputs a backbone reads.
pub struct BackboneInputs {
    pub input_ids: String,
    pub attention_mask: String,
    pub token_type_ids: Option<String>,
}

/// Where the checkpoint's tensors come from.
enum TensorSource {
    /// All in memory.
    Loaded(HashMap<String, Tensor>),
    /// Memory-mapped, read when asked (a streamed export).
    Streamed(WeightStore),
}

/// The checkpoint's tensors, by name under a prefix (`bert.`, `model.`).
pub struct Weights {
    tensors: TensorSource,
    prefix: String,
    dir: PathBuf,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, prefix: &str, dir: &Path) -> Self {
        Self {
            tensors: TensorSource::Loaded(tensors),
            prefix: prefix.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    /// Tensors read from `store` one at a time, as the emitters ask for them.
    pub fn streamed(store: WeightStore, prefix: &str) -> Self {
        Self {
            dir: store.dir().to_path_buf(),
            tensors: TensorSource::Streamed(store),
            prefix: prefix.to_string(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        match &self.tensors {
            TensorSource::Loaded(tensors) => tensors.contains_key(&full),
            TensorSource::Streamed(store) => store.contains(&full),
        }
    }

    /// The tensor `prefix + name` as float32, with its shape checked.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let full = self.checked(name, dims)?;
        Ok(match &self.tensors {
            TensorSource::Loaded(tensors) => tensors[&full].to_dtype(DType::F32)?,
            TensorSource::Streamed(store) => store.load(&full, DType::F32)?,
        })
    }

    /// The 2-D tensor `prefix + name` (shape checked) as float32 values, a
    /// block of rows at a time, in order: a streamed export reads an
    /// embedding table this way instead of holding it as float32.
    pub fn for_each_row_block(
        &self,
        name: &str,
        dims: &[usize],
        f: &mut dyn FnMut(&[f32]),
    ) -> Result<()> {
        /// Rows per block: 4,096 rows of a 4,096-wide table are 64 MiB.
        const BLOCK_ROWS: usize = 4096;
        let full = self.checked(name, dims)?;
        match &self.tensors {
            TensorSource::Loaded(tensors) => {
                let table = &tensors[&full];
                let rows = dims[0];
                for first in (0..rows).step_by(BLOCK_ROWS) {
                    let count = BLOCK_ROWS.min(rows - first);
                    f(&values(
                        &table.narrow(0, first, count)?.to_dtype(DType::F32)?,
                    )?);
                }
            }
            TensorSource::Streamed(store) => {
                store.for_each_row_block(&full, BLOCK_ROWS, &mut |block| {
                    f(&block.flatten_all()?.to_vec1::<f32>()?);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// The full name of `name`, checked to exist with shape `dims`.
    fn checked(&self, name: &str, dims: &[usize]) -> Result<String> {
        let full = format!("{}{name}", self.prefix);
        let missing = || PipelineError::MissingTensor {
            path: self.dir.clone(),
            tensor: full.clone(),
        };
        let stored_dims: &[usize] = match &self.tensors {
            TensorSource::Loaded(tensors) => tensors.get(&full).ok_or_else(missing)?.dims(),
            TensorSource::Streamed(store) => &store.info(&full).ok_or_else(missing)?.shape,
        };
        if stored_dims != dims {
            return Err(PipelineError::ShapeMismatch {
                path: self.dir.clone(),
                tensor: full,
                expected: dims.to_vec(),
                got: stored_dims.to_vec(),
            }
            .into());
        }
        Ok(full)
    }
}

/// Flattens a float32 tensor.
pub fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `y = x W^T + b` for PyTorch's `(out, in)` weight `name.weight`: the
/// graph stores `W^T` so the product is one MatMul, or, when the builder's
/// matmul precision is int8, one dynamically quantized `MatMulInteger`
/// ([`crate::quantize`]).
pub fn linear(
    g: &mut GraphBuilder,
    w: &Weights,
    x: &str,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<String> {
    let weight = w.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
    let w_t = values(&weight.t()?.contiguous()?)?;
    let y = match g.matmul_precision() {
        // fp16 and QDQ int8 are applied to the float32 graph afterwards,
        // with ranges measured on it (`crate::half_precision`, `crate::qdq`).
        MatmulPrecision::Float32 | MatmulPrecision::Float16 | MatmulPrecision::Int8Qdq => {
            let wt = g.weight(&format!("{name}.weight_t"), &[in_dim, out_dim], &w_t);
            g.matmul(x, &wt)
        }
        MatmulPrecision::Int8(kernel) => int8_matmul(g, x, name, &w_t, (in_dim, out_dim), kernel),
    };
    if bias {
        let b = w.get(&format!("{name}.bias"), &[out_dim])?;
        let b = g.weight(&format!("{name}.bias"), &[out_dim], &values(&b)?);
        Ok(g.add(&y, &b))
    } else {
        Ok(y)
    }
}

/// LayerNorm over the last axis (ONNX `LayerNormalization`, opset 17).
pub fn layer_norm(
    g: &mut GraphBuilder,
    w: &Weights,
    x: &str,
    name: &str,
    dim: usize,
    eps: f64,
) -> Result<String> {
    let (wn, bn) = if w.contains(&format!("{name}.weight")) {
        ("weight", "bias")
    } else {
        ("gamma", "beta")
    };
    let scale = w.get(&format!("{name}.{wn}"), &[dim])?;
    let bias = w.get(&format!("{name}.{bn}"), &[dim])?;
    let scale = g.weight(&format!("{name}.weight"), &[dim], &values(&scale)?);
    let bias = g.weight(&format!("{name}.bias"), &[dim], &values(&bias)?);
    Ok(g.node(
        "LayerNormalization",
        &[x, &scale, &bias],
        vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
    ))
}

/// RMSNorm over the last axis, `x / sqrt(mean(x^2) + eps) * scale`; Gemma
/// (`unit_offset`) stores `scale - 1`.
pub fn rms_norm(
    g: &mut GraphBuilder,
    w: &Weights,
    x: &str,
    name: &str,
    dim: usize,
    eps: f64,
    unit_offset: bool,
) -> Result<String> {
    let weight = w.get(&format!("{name}.weight"), &[dim])?;
    let scale = if unit_offset { (weight + 1.0)? } else { weight };
    let scale = g.weight(&format!("{name}.weight"), &[dim], &values(&scale)?);
    let square = g.mul(x, x);
    let mean = g.reduce("ReduceMean", &square, &[-1], true);
    let eps = g.float_scalar(eps as f32);
    let var = g.add(&mean, &eps);
    let rms = g.unary("Sqrt", &var);
    let normed = g.div(x, &rms);
    Ok(g.mul(&normed, &scale))
}

/// GELU's `0.5 x (1 + s)` for `s` = erf or tanh of the scaled input.
fn gelu_from(g: &mut GraphBuilder, x: &str, s: &str) -> String {
    let one = g.float_scalar(1.0);
    let shifted = g.add(s, &one);
    let half = g.float_scalar(0.5);
    let half_x = g.mul(x, &half);
    g.mul(&half_x, &shifted)
}

/// The MLP activation. Both GELUs are written in the forms ONNX Runtime's
/// graph optimizer recognises and runs as one kernel (`GeluFusion`:
/// `Div` by √2, then `Erf`; `FastGeluFusion`: `Pow(x, 3)`): the same
/// function as multiplying by 1/√2 or by `x·x·x`, but one pass over the
/// MLP's widest tensor instead of five to seven (about 9 % of a dynamic
/// int8 MiniLM's time on this CPU).
pub fn activation(g: &mut GraphBuilder, x: &str, act: Activation) -> String {
    match act {
        Activation::GeluErf => {
            // 0.5 x (1 + erf(x / sqrt 2))
            let sqrt2 = g.float_scalar(std::f32::consts::SQRT_2);
            let scaled = g.div(x, &sqrt2);
            let erf = g.unary("Erf", &scaled);
            gelu_from(g, x, &erf)
        }
        Activation::GeluTanh => {
            // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            let three = g.float_scalar(3.0);
            let cube = g.node("Pow", &[x, &three], vec![]);
            let c = g.float_scalar(0.044_715);
            let term = g.mul(&cube, &c);
            let inner = g.add(x, &term);
            let k = g.float_scalar((2.0f32 / std::f32::consts::PI).sqrt());
            let arg = g.mul(&inner, &k);
            let tanh = g.unary("Tanh", &arg);
            gelu_from(g, x, &tanh)
        }
        Activation::Silu => {
            let sig = g.unary("Sigmoid", x);
            g.mul(x, &sig)
        }
        Activation::Relu => g.unary("Relu", x),
    }
}

/// `(B, T, H*D)` -> `(B, H, T, D)`.
pub fn split_heads(g: &mut GraphBuilder, x: &str, heads: usize, head_dim: usize) -> String {
    let r = g.reshape(x, &[0, 0, heads as i64, head_dim as i64]);
    g.transpose(&r, &[0, 2, 1, 3])
}

/// `(B, H, T, D)` -> `(B, T, H*D)`.
pub fn merge_heads(g: &mut GraphBuilder, x: &str, heads: usize, head_dim: usize) -> String {
    let t = g.transpose(x, &[0, 2, 1, 3]);
    g.reshape(&t, &[0, 0, (heads * head_dim) as i64])
}

/// Values every layer shares, computed once per graph from the inputs.
pub struct SequenceInfo {
    /// `attention_mask` as bool, `(B, T)`.
    pub keep: String,
    /// Positions `0..T`, int64, `(T,)`.
    pub positions: String,
}

impl SequenceInfo {
    pub fn new(g: &mut GraphBuilder, input_ids: &str, attention_mask: &str) -> Self {
        let shape = g.unary("Shape", input_ids);
        let one = g.int_scalar(1);
        let seq_len = g.gather(&shape, &one, 0);
        let zero = g.int_scalar(0);
        let positions = g.node("Range", &[&zero, &seq_len, &one], vec![]);
        let keep = g.cast(attention_mask, DataType::Bool);
        Self { keep, positions }
    }
}

/// Additive attention bias for `pattern`: 0 where a query may attend to a
/// key, [`MASKED`] elsewhere. `(B, 1, 1, T)` for plain bidirectional
/// attention, `(B, 1, T, T)` otherwise.
pub fn attention_bias(
    g: &mut GraphBuilder,
    seq: &SequenceInfo,
    pattern: AttentionPattern,
) -> String {
    let key_keep = g.unsqueeze(&seq.keep, &[1, 2]); // (B, 1, 1, T)
    let allowed = match pattern {
        AttentionPattern::Bidirectional => key_keep,
        _ => {
            let q = g.unsqueeze(&seq.positions, &[1]); // (T, 1)
            let k = g.unsqueeze(&seq.positions, &[0]); // (1, T)
            let diff = g.sub(&q, &k); // q - k, (T, T)
            let zero = g.int_scalar(0);
            let pattern_ok = match pattern {
                AttentionPattern::Causal => g.node("GreaterOrEqual", &[&diff, &zero], vec![]),
                AttentionPattern::BidirectionalWindow { window } => {
                    let abs = g.unary("Abs", &diff);
                    let w = g.int_scalar(window as i64);
                    g.node("Less", &[&abs, &w], vec![])
                }
                AttentionPattern::CausalWindow { window } => {
                    let causal = g.node("GreaterOrEqual", &[&diff, &zero], vec![]);
                    let w = g.int_scalar(window as i64);
                    let near = g.node("Less", &[&diff, &w], vec![]);
                    g.node("And", &[&causal, &near], vec![])
                }
                AttentionPattern::Bidirectional => unreachable!(),
            };
            g.node("And", &[&key_keep, &pattern_ok], vec![]) // (B, 1, T, T)
        }
    };
    let zero = g.float_scalar(0.0);
    let masked = g.float_scalar(MASKED);
    g.where_(&allowed, &zero, &masked)
}

/// `cos` and `sin` of rotary angles for positions `0..T`, each `(T, D/2)`.
pub fn rotary_tables(
    g: &mut GraphBuilder,
    seq: &SequenceInfo,
    inv_freq: &[f32],
) -> (String, String) {
    let pos = g.cast(&seq.positions, DataType::Float);
    let pos = g.unsqueeze(&pos, &[1]); // (T, 1)
    let freq = g.floats(inv_freq); // (D/2,)
    let angles = g.mul(&pos, &freq); // (T, D/2)
    (g.unary("Cos", &angles), g.unary("Sin", &angles))
}

/// Rotary embedding of `x` `(B, H, T, D)` in the half-rotation layout:
/// `[x1 cos - x2 sin, x2 cos + x1 sin]`.
pub fn apply_rotary(
    g: &mut GraphBuilder,
    x: &str,
    cos: &str,
    sin: &str,
    head_dim: usize,
) -> String {
    let half = (head_dim / 2) as i64;
    let x1 = g.slice(x, 3, 0, half);
    let x2 = g.slice(x, 3, half, head_dim as i64);
    let x1c = g.mul(&x1, cos);
    let x2s = g.mul(&x2, sin);
    let first = g.sub(&x1c, &x2s);
    let x2c = g.mul(&x2, cos);
    let x1s = g.mul(&x1, sin);
    let second = g.add(&x2c, &x1s);
    g.concat(&[&first, &second], 3)
}

/// How an attention bias reaches the scores.
#[derive(Debug, Clone, Copy)]
pub enum ScoreBias<'a> {
    /// `scores + bias`, `bias` broadcastable to `(B, Hq, T, T)`.
    Added(&'a str),
    /// A bias of the key alone, folded into the score product
    /// ([`FoldedKeyBias`]): `ones` `(B, Hq, T, 1)` is appended to the
    /// (scaled) queries, `bias` `(B, Hkv, T, 1)` to the keys.
    Folded { ones: &'a str, bias: &'a str },
}

/// A padding bias that depends on the key alone (bidirectional attention),
/// folded into the score product: `q·k + b_k = [q, 1]·[k, b_k]`. The scores
/// come out of the MatMul with the bias in them, and the `(B, H, T, T)`
/// `Add` — a pass over the largest tensor of every layer, about 10 % of a
/// dynamic int8 BERT's time on this CPU — is gone; in its place two
/// `Concat`s of `(B, H, T, D)`. Masked keys get [`MASKED`] exactly as the
/// added form gives them (`q·k` is far below its rounding step), so the
/// softmax is the same.
pub struct FoldedKeyBias {
    /// `(B, 1, T, 1)`: each key's bias.
    bias: String,
    /// `(B, 1, T, 1)` ones.
    ones: String,
    /// Both expanded to `(B, H, T, 1)`, by head count `H`.
    by_heads: HashMap<usize, (String, String)>,
}

impl FoldedKeyBias {
    /// From the `(B, 1, 1, T)` bias [`attention_bias`] makes for
    /// bidirectional attention.
    pub fn new(g: &mut GraphBuilder, key_bias: &str) -> Self {
        let bias = g.transpose(key_bias, &[0, 1, 3, 2]);
        let shape = g.unary("Shape", &bias);
        let one = g.float_scalar(1.0);
        let ones = g.node("Expand", &[&one, &shape], vec![]);
        Self {
            bias,
            ones,
            by_heads: HashMap::new(),
        }
    }

    /// The columns for a layer of `heads` query and key heads.
    pub fn columns(&mut self, g: &mut GraphBuilder, heads: usize) -> ScoreBias<'_> {
        let (bias, ones) = (&self.bias, &self.ones);
        let (ones, bias) = self.by_heads.entry(heads).or_insert_with(|| {
            let repeat = g.ints(&[1, heads as i64, 1, 1]);
            (
                g.node("Expand", &[ones, &repeat], vec![]),
                g.node("Expand", &[bias, &repeat], vec![]),
            )
        });
        ScoreBias::Folded { ones, bias }
    }
}

/// How a BERT graph's padding mask reaches the attention scores. Decoder
/// graphs always add theirs: a causal or windowed mask depends on the query
/// as well as the key, so it cannot be folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionMask {
    /// `scores + bias`, the form attention fusions match (TensorRT's) and
    /// the fp16 and QDQ conversions expect.
    Added,
    /// Folded into the score product ([`FoldedKeyBias`]): one
    /// `(B, H, T, T)` pass fewer per layer. For fp32 and dynamic int8
    /// graphs: the fold puts float32's lowest value into the product's
    /// operands, which float16 cannot hold and a QDQ scale cannot cover.
    Folded,
}

impl AttentionMask {
    /// The form [`Self::name`] names (as graph metadata records it).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "added" => Some(Self::Added),
            "folded" => Some(Self::Folded),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Folded => "folded",
        }
    }

    /// The form used when none is asked for: folded where it is allowed.
    pub fn default_for(precision: MatmulPrecision) -> Self {
        match precision {
            MatmulPrecision::Float32 | MatmulPrecision::Int8(_) => Self::Folded,
            MatmulPrecision::Float16 | MatmulPrecision::Int8Qdq => Self::Added,
        }
    }

    /// Refuses the folded form for precisions it breaks.
    pub fn check(self, precision: MatmulPrecision) -> Result<()> {
        match (self, precision) {
            (Self::Folded, MatmulPrecision::Float16 | MatmulPrecision::Int8Qdq) => {
                Err(Error::InvalidArgument(format!(
                    "--attention-mask folded puts float32's lowest value into the score product's \
                     operands, which {} products cannot carry; use --attention-mask added",
                    if precision == MatmulPrecision::Float16 {
                        "float16"
                    } else {
                        "QDQ int8 (a calibrated scale per operand)"
                    }
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Softmax attention with grouped K/V heads. `q` `(B, Hq, T, D)`, `k`/`v`
/// `(B, Hkv, T, D)`. As in candle, each group of `Hq / Hkv` query heads
/// folds into the row axis, so K and V are never repeated. Returns
/// `(B, Hq, T, D)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    bias: ScoreBias<'_>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
) -> String {
    let (h, hkv, d) = (heads as i64, kv_heads as i64, head_dim as i64);
    let grouped = heads != kv_heads;
    let s = g.float_scalar(scale as f32);
    let q = g.mul(q, &s);
    let (q, k, qk_dim) = match bias {
        ScoreBias::Added(_) => (q, k.to_string(), d),
        ScoreBias::Folded { ones, bias } => {
            (g.concat(&[&q, ones], 3), g.concat(&[k, bias], 3), d + 1)
        }
    };
    let q = if grouped {
        g.reshape(&q, &[0, hkv, -1, qk_dim]) // (B, Hkv, G*T, D)
    } else {
        q
    };
    let kt = g.transpose(&k, &[0, 1, 3, 2]);
    let scores = g.matmul(&q, &kt);
    let scores = if grouped {
        g.reshape(&scores, &[0, h, -1, 0]) // (B, Hq, T, T)
    } else {
        scores
    };
    let scores = match bias {
        ScoreBias::Added(bias) => g.add(&scores, bias),
        ScoreBias::Folded { .. } => scores,
    };
    let probs = g.softmax(&scores, -1);
    let probs = if grouped {
        g.reshape(&probs, &[0, hkv, -1, 0])
    } else {
        probs
    };
    let context = g.matmul(&probs, v);
    if grouped {
        g.reshape(&context, &[0, h, -1, d])
    } else {
        context
    }
}
