//! Building blocks shared by the architectures: linear layers, norms,
//! activations, rotary position embeddings, attention masks and scaled
//! dot-product attention.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::kernels;

/// `y = x W^T + b` on the last dimension, computed as one 2-D matmul over all
/// leading dimensions (faster on CPU than a broadcast batched matmul).
///
/// With LoRA adapters (`lora_a` `(r, in)`, `lora_b` `(out, r)` and the
/// scalar `lora_scale` beside the weight, added for fine-tuning) the output
/// gains `scale · x Aᵀ Bᵀ`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// `(out_features, in_features)`, as stored by PyTorch.
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

#[derive(Debug, Clone)]
struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        let lora = if vb.contains_tensor("lora_a") {
            let scale = vb.get((), "lora_scale")?.to_scalar::<f32>()? as f64;
            let rank = vb.get_unchecked("lora_a")?.dim(0)?;
            Some(LoraAdapter {
                a: vb.get((rank, in_dim), "lora_a")?,
                b: vb.get((out_dim, rank), "lora_b")?,
                scale,
            })
        } else {
            None
        };
        Ok(Self { weight, bias, lora })
    }

    pub fn parameter_count(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, Tensor::elem_count)
    }
}

impl Linear {
    /// `activation(self.forward(x))`; on the CPU in f32 without a LoRA
    /// adapter the activation runs in place on the product's buffer when
    /// nothing is tracked for gradients.
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let (x2, out_dims) = self.as_rows(x)?;
        match activation.kernel() {
            Some(kind) if self.kernel_applies(&x2) => {
                kernels::linear::linear_then(&x2, &self.weight, self.bias.as_ref(), kind)?
                    .reshape(out_dims)
            }
            _ => activation.forward(&self.forward(x)?),
        }
    }

    /// `x` as a matrix of rows `(rows, in)`, and the shape of the output.
    fn as_rows(&self, x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / in_dim, in_dim))?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = self.weight.dim(0)?;
        Ok((x2, out_dims))
    }

    /// Whether the fused CPU kernel computes this layer on `x2`.
    fn kernel_applies(&self, x2: &Tensor) -> bool {
        self.lora.is_none() && kernels::linear::applies(x2, &self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, out_dims) = self.as_rows(x)?;
        if self.kernel_applies(&x2) {
            return kernels::linear::linear(&x2, &self.weight, self.bias.as_ref())?
                .reshape(out_dims);
        }
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(lora) = &self.lora {
            let delta = x2.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
            y = (y + (delta * lora.scale)?)?;
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape(out_dims)
    }
}

/// LayerNorm with weight and bias (BERT).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        // Old TF-converted checkpoints call them gamma/beta.
        let (weight, bias) = if vb.contains_tensor("weight") {
            (vb.get(dim, "weight")?, vb.get(dim, "bias")?)
        } else {
            (vb.get(dim, "gamma")?, vb.get(dim, "beta")?)
        };
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }
}

// On the CPU in f32 the norms, activations, rotary embeddings and attention
// run effir's fused kernels, which have backward passes; elsewhere candle's
// composed, differentiable forms, which compute the same function.

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::norm::applies(x, &[&self.weight, &self.bias]) {
            return kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
}

impl LayerNorm {
    /// `self.forward(a + b)`: the residual sum and its norm, fused on the CPU
    /// in f32 when nothing is tracked for gradients.
    pub fn forward_sum(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if kernels::norm::applies(a, &[b, &self.weight, &self.bias]) {
            return kernels::norm::layer_norm_of_sum(a, b, &self.weight, &self.bias, self.eps);
        }
        self.forward(&(a + b)?)
    }
}

/// RMSNorm. Gemma stores `w` and scales by `1 + w` (`unit_offset`); Llama
/// stores the scale itself. The offset is added in `forward`, not at load,
/// so a trained `w` takes effect at once.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    unit_offset: bool,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, unit_offset: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            unit_offset,
            eps: eps as f32,
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.weight.elem_count()
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = if self.unit_offset {
            (&self.weight + 1.0)?
        } else {
            self.weight.clone()
        };
        if kernels::norm::applies(x, &[&scale]) {
            return kernels::norm::rms_norm(x, &scale, self.eps);
        }
        candle_nn::ops::rms_norm_slow(x, &scale, self.eps)
    }
}

/// MLP activations, keyed by the names Hugging Face configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x Φ(x)` (HF `gelu`).
    GeluErf,
    /// Tanh approximation of GELU (HF `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x σ(x)` (HF `silu`, `swish`).
    Silu,
    Relu,
}

impl Activation {
    /// Parses an HF `hidden_act`; `None` for names effir does not implement.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }
}

impl Activation {
    /// The fused kernel that computes this activation, if there is one.
    fn kernel(self) -> Option<kernels::activation::Kind> {
        use kernels::activation::Kind;
        match self {
            Self::GeluErf => Some(Kind::GeluErf),
            Self::GeluTanh => Some(Kind::GeluTanh),
            Self::Silu => Some(Kind::Silu),
            Self::Relu => None,
        }
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(kind) = self.kernel() else {
            return x.relu();
        };
        if kernels::cpu_f32(x) {
            return x.contiguous()?.apply_op1(kind);
        }
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            _ => x.silu(),
        }
    }
}

/// RoPE frequency scaling from `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear {
        factor: f64,
    },
}

/// Precomputed inverse frequencies of rotary position embeddings in the
/// half-rotation layout of Hugging Face (`rotate_half`).
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        // As HF computes it: float32 `1 / base ** (arange(0, dim, 2) / dim)`.
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| {
                let f = 1.0f32 / (theta as f32).powf(i as f32 / head_dim as f32);
                match scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor as f32,
                }
            })
            .collect();
        Self { inv_freq }
    }

    /// `1 / (theta^(2i / head_dim) * factor)`, one per rotated pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `(seq_len, head_dim / 2)`, for positions `0..seq_len`.
    pub fn cos_sin(&self, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq_len, half), device)?,
            Tensor::from_vec(sin, (seq_len, half), device)?,
        ))
    }
}

/// Applies rotary embeddings to `x` of shape `(B, H, T, D)`.
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if kernels::rotary::applies(x, cos, sin) {
        return kernels::rotary::rope(x, cos, sin);
    }
    candle_nn::rotary_emb::rope_slow(&x.contiguous()?, cos, sin)
}

/// Value added to attention scores of masked positions. Finite, so that a row
/// with every key masked (a padding query) stays finite instead of NaN.
pub const MASKED: f32 = f32::MIN;

/// Which key positions a query may attend to, besides padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionPattern {
    /// Every key (encoders, bidirectional decoders).
    Bidirectional,
    /// Keys at or before the query.
    Causal,
    /// Keys within `window` positions on either side: `|q - k| < window`.
    BidirectionalWindow { window: usize },
    /// Keys at or before the query and `q - k < window`.
    CausalWindow { window: usize },
}

impl AttentionPattern {
    fn allows(&self, q: usize, k: usize) -> bool {
        match *self {
            Self::Bidirectional => true,
            Self::Causal => k <= q,
            Self::BidirectionalWindow { window } => q.abs_diff(k) < window,
            Self::CausalWindow { window } => k <= q && q - k < window,
        }
    }
}

/// Additive attention mask of shape `(B, 1, T, T)` combining key padding
/// (`attention_mask`, `(B, T)`, 1 = token, 0 = padding) with `pattern`.
pub(crate) fn attention_bias(attention_mask: &Tensor, pattern: AttentionPattern) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let keys: Vec<Vec<u32>> = attention_mask.to_dtype(DType::U32)?.to_vec2()?;
    let mut bias = vec![0f32; b * t * t];
    for (row, keep) in keys.iter().enumerate() {
        for q in 0..t {
            let base = (row * t + q) * t;
            for (k, &keep_k) in keep.iter().enumerate() {
                if keep_k == 0 || !pattern.allows(q, k) {
                    bias[base + k] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), attention_mask.device())
}

/// Additive key-padding mask of shape `(B, 1, 1, T)` (bidirectional, no
/// window): cheaper than [`attention_bias`] for encoders. `None` when the
/// batch has no padding (length-sorted batches often have none).
pub(crate) fn padding_bias(attention_mask: &Tensor) -> Result<Option<Tensor>> {
    let (b, t) = attention_mask.dims2()?;
    if attention_mask
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize
        == b * t
    {
        return Ok(None);
    }
    let keep = attention_mask.to_dtype(DType::F32)?;
    // (1 - keep) * MASKED
    let bias = ((keep.ones_like()? - keep)? * MASKED as f64)?;
    Ok(Some(bias.reshape((b, 1, 1, t))?))
}

/// `(B, T, H*D)` -> `(B, H, T, D)`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// `(B, H, T, D)` -> `(B, T, H*D)`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// Multi-head softmax attention. `q` is `(B, T, H·D)` (a projection's
/// output) or `(B, H, T, D)`, `k` and `v` likewise with `kv_heads` heads;
/// `bias` is `(B, 1, 1, T)` or `(B, 1, T, T)`, or `None`. Returns
/// `(B, T, H·D)`. On the CPU in f32 this is the fused kernel
/// ([`crate::model::kernels::attention`]); otherwise the composed form.
#[allow(clippy::too_many_arguments)]
pub(crate) fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    use crate::model::kernels::attention;
    if attention::applies(q, k, v, bias) {
        return attention::attention(q, k, v, heads, kv_heads, head_dim, bias, scale);
    }
    let split = |t: &Tensor, heads: usize| {
        if t.rank() == 3 {
            split_heads(t, heads, head_dim)
        } else {
            Ok(t.clone())
        }
    };
    let context = scaled_dot_product_attention(
        &split(q, heads)?,
        &split(k, kv_heads)?,
        &split(v, kv_heads)?,
        bias,
        scale,
    )?;
    merge_heads(&context)
}

/// Softmax attention. `q`: `(B, H, T, D)`; `k`, `v`: `(B, Hkv, T, D)` with
/// `H` a multiple of `Hkv` (grouped-query attention); `bias` broadcastable to
/// `(B, H, T, T)`, or `None` when nothing is masked. Returns `(B, H, T, D)`.
pub(crate) fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let group = h / kv_heads;
    // Scaling q (B·H·T·D values) is cheaper than scaling the scores (B·H·T·T).
    // Grouped heads fold into the row dimension so every K/V head is used
    // once, without materialising repeated K/V:
    // q (B, Hkv, G*T, D) · k^T (B, Hkv, D, T) -> (B, Hkv, G*T, T).
    let q = (q * scale)?.reshape((b, kv_heads, group * t, d))?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(bias) = bias {
        scores = scores.reshape((b, h, t, t))?.broadcast_add(bias)?;
    }
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.reshape((b, kv_heads, group * t, t))?;
    probs.matmul(v)?.reshape((b, h, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused activations (inference) compute what candle's composed
    /// ones (training) compute.
    #[test]
    fn fused_activations_match_candles() {
        let x = Tensor::arange(-8000i64, 8000, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1e-3, 0.0)
            .unwrap();
        for (act, reference) in [
            (Activation::GeluErf, x.gelu_erf().unwrap()),
            (Activation::GeluTanh, x.gelu().unwrap()),
            (Activation::Silu, x.silu().unwrap()),
        ] {
            let ours: Vec<f32> = act.forward(&x).unwrap().to_vec1().unwrap();
            let reference: Vec<f32> = reference.to_vec1().unwrap();
            let worst = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-6, "{act:?}: max |diff| {worst}");
        }
    }
}
