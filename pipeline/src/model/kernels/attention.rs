//! Softmax attention on the CPU without the `(B, H, T, T)` tensors.
//!
//! The composed form (`q kᵀ`, `+ bias`, softmax, `· v`, and the copies that
//! split and merge heads) writes and re-reads several `B·H·T·T` tensors per
//! layer: 100 MB each for MiniLM at batch 32 × 256, every one a fresh
//! allocation. Here each `(batch, head)` pair is one task: its `T × T`
//! scores live in a per-thread scratch buffer, the two products run on the
//! `gemm` crate (candle's own matrix kernels) reading q, k and v in place
//! through strides, and the context is written straight into the merged
//! `(B, T, H·D)` output. Tasks run in parallel on rayon's pool; each product
//! runs on one thread.

use std::cell::RefCell;

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::softmax::softmax_row;
use super::{f32_values as values, plain};

/// How one of q, k, v is laid out: the offsets between batches, heads and
/// sequence positions (the head dimension is contiguous).
#[derive(Debug, Clone, Copy)]
struct HeadLayout {
    batch: usize,
    head: usize,
    row: usize,
}

impl HeadLayout {
    /// `(B, T, H·D)` (a projection's output) or `(B, H, T, D)` (split heads).
    fn of(t: &Tensor, heads: usize) -> Result<Self> {
        Ok(match t.dims() {
            &[_, seq, width] => Self {
                batch: seq * width,
                head: width / heads,
                row: width,
            },
            &[_, h, seq, d] => Self {
                batch: h * seq * d,
                head: seq * d,
                row: d,
            },
            dims => candle_core::bail!("attention input of shape {dims:?}"),
        })
    }
}

/// The mask added to the scores of each query: one row of `T` per batch
/// entry (`(B, 1, 1, T)`, padding) or per query (`(B, 1, T, T)`, causal and
/// windowed patterns).
enum Bias<'a> {
    PerKey(&'a [f32]),
    PerQuery(&'a [f32]),
}

impl Bias<'_> {
    fn row(&self, batch: usize, query: usize, seq: usize) -> &[f32] {
        match self {
            Self::PerKey(b) => &b[batch * seq..(batch + 1) * seq],
            Self::PerQuery(b) => {
                let start = (batch * seq + query) * seq;
                &b[start..start + seq]
            }
        }
    }
}

struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its batch
// entry's rows, its head's columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the `Sync` wrapper, not the pointer.
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the output buffer.
        unsafe { self.0.add(offset) }
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`attention`] can run on these inputs (CPU, f32, no gradient).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> bool {
    plain(q) && plain(k) && plain(v) && bias.is_none_or(plain)
}

/// `softmax(scale · q kᵀ + bias) v` for every batch entry and head.
///
/// `q` is `(B, T, H·D)` or `(B, H, T, D)`, `k` and `v` likewise with `Hkv`
/// heads (`H` a multiple of `Hkv`: grouped-query attention); `bias` is
/// `(B, 1, 1, T)` or `(B, 1, T, T)`, or `None`. Returns `(B, T, H·D)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let batch = q.dim(0)?;
    let seq = if q.rank() == 3 { q.dim(1)? } else { q.dim(2)? };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (ql, kl, vl) = (
        HeadLayout::of(&q, heads)?,
        HeadLayout::of(&k, kv_heads)?,
        HeadLayout::of(&v, kv_heads)?,
    );
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let qs = values(&q_storage, q_layout)?;
    let ks = values(&k_storage, k_layout)?;
    let vs = values(&v_storage, v_layout)?;
    let bias_tensor = bias.map(Tensor::contiguous).transpose()?;
    let bias_storage = bias_tensor.as_ref().map(Tensor::storage_and_layout);
    let bias = match (&bias_tensor, &bias_storage) {
        (Some(b), Some((storage, layout))) => {
            let s = values(storage, layout)?;
            Some(match b.dims() {
                &[_, 1, 1, _] => Bias::PerKey(s),
                &[_, 1, rows, _] if rows == seq => Bias::PerQuery(s),
                dims => candle_core::bail!("attention bias of shape {dims:?}"),
            })
        }
        _ => None,
    };
    let group = heads / kv_heads;
    let width = heads * head_dim;
    let mut out = vec![0.0f32; batch * seq * width];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let scale = scale as f32;
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let kv = h / group;
        let q0 = &qs[b * ql.batch + h * ql.head..];
        let k0 = &ks[b * kl.batch + kv * kl.head..];
        let v0 = &vs[b * vl.batch + kv * vl.head..];
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.resize(seq * seq, 0.0);
            // SAFETY: the strides and sizes stay inside q, k, v and the
            // scratch buffer; the output block (rows of batch `b`, columns
            // of head `h`) belongs to this task alone.
            unsafe {
                // scores (T, T) = scale · q (T, D) · kᵀ (D, T)
                gemm::gemm(
                    seq,
                    seq,
                    head_dim,
                    scores.as_mut_ptr(),
                    1,
                    seq as isize,
                    false,
                    q0.as_ptr(),
                    1,
                    ql.row as isize,
                    k0.as_ptr(),
                    kl.row as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(seq).enumerate() {
                softmax_row(row, bias.as_ref().map(|bias| bias.row(b, i, seq)));
            }
            unsafe {
                // context (T, D) = probs (T, T) · v (T, D), into the merged output.
                let dst = out_ptr.at(b * seq * width + h * head_dim);
                gemm::gemm(
                    seq,
                    head_dim,
                    seq,
                    dst,
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    seq as isize,
                    v0.as_ptr(),
                    1,
                    vl.row as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    });
    Tensor::from_vec(out, (batch, seq, width), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::layers::{merge_heads, scaled_dot_product_attention, split_heads};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused kernel computes what the composed operations compute: for
    /// grouped-query heads, inputs merged or split, padding and causal masks.
    #[test]
    fn the_fused_kernel_equals_the_composed_attention() {
        let (b, t, d) = (3, 7, 8);
        for (heads, kv_heads) in [(4, 4), (4, 2), (6, 1)] {
            let q = random(&[b, t, heads * d], 1);
            let k = random(&[b, t, kv_heads * d], 2);
            let v = random(&[b, t, kv_heads * d], 3);
            // Row 1 pads its last two positions.
            let mut keep = vec![1f32; b * t];
            keep[t + t - 1] = 0.0;
            keep[t + t - 2] = 0.0;
            let keep = Tensor::from_vec(keep, (b, t), &Device::Cpu).unwrap();
            let per_key = ((keep.ones_like().unwrap() - &keep).unwrap() * f32::MIN as f64)
                .unwrap()
                .reshape((b, 1, 1, t))
                .unwrap();
            let causal: Vec<f32> = (0..b * t * t)
                .map(|i| if (i % t) > (i / t) % t { f32::MIN } else { 0.0 })
                .collect();
            let causal = Tensor::from_vec(causal, (b, 1, t, t), &Device::Cpu).unwrap();
            for bias in [None, Some(&per_key), Some(&causal)] {
                let (qs, ks, vs) = (
                    split_heads(&q, heads, d).unwrap(),
                    split_heads(&k, kv_heads, d).unwrap(),
                    split_heads(&v, kv_heads, d).unwrap(),
                );
                let want =
                    merge_heads(&scaled_dot_product_attention(&qs, &ks, &vs, bias, 0.3).unwrap())
                        .unwrap();
                for (q_in, k_in) in [(&q, &k), (&qs, &ks)] {
                    let got = attention(q_in, k_in, &v, heads, kv_heads, d, bias, 0.3).unwrap();
                    assert_eq!(got.dims(), [b, t, heads * d]);
                    let diff = max_diff(&got, &want);
                    assert!(
                        diff < 1e-6,
                        "heads {heads}/{kv_heads}, bias {:?}: {diff}",
                        bias.map(|b| b.dims().to_vec())
                    );
                }
            }
        }
    }
}
