//! Softmax attention on the CPU without the `(B, H, T, T)` tensors, forward
//! and backward.
//!
//! The composed form (`q kᵀ`, `+ bias`, softmax, `· v`, and the copies that
//! split and merge heads) writes and re-reads several `B·H·T·T` tensors per
//! layer: 100 MB each for MiniLM at batch 32 × 256, every one a fresh
//! allocation, and for training candle keeps all of them until the backward
//! pass. Here each `(batch, head)` pair is one task: its `T × T` scores live
//! in a per-thread scratch buffer, the products run on the `gemm` crate
//! (candle's own matrix kernels) reading q, k and v in place through
//! strides, and the context is written straight into the merged
//! `(B, T, H·D)` output. Tasks run in parallel on rayon's pool; each product
//! runs on one thread.
//!
//! The backward pass recomputes the probabilities from q and k (as
//! FlashAttention does) instead of keeping them: with `P = softmax(S)`,
//! `S = scale · q kᵀ + bias` and the context `O = P v`,
//! `dP = dO vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dq = scale · dS k`,
//! `dk = scale · dSᵀ q` and `dv = Pᵀ dO`, summed over the query heads that
//! share a key/value head.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

use super::softmax::softmax_row;
use super::{cpu_f32, cpu_f32_values, f32_values as values, product, Strided, Threads};

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
    fn of(dims: &[usize], heads: usize) -> Result<Self> {
        Ok(match *dims {
            [_, seq, width] => Self {
                batch: seq * width,
                head: width / heads,
                row: width,
            },
            [_, h, seq, d] => Self {
                batch: h * seq * d,
                head: seq * d,
                row: d,
            },
            _ => candle_core::bail!("attention input of shape {dims:?}"),
        })
    }

    /// Where head `head` of batch entry `batch` starts.
    fn start(&self, batch: usize, head: usize) -> usize {
        batch * self.batch + head * self.head
    }
}

/// The mask added to the scores of each query: one row of `T` per batch
/// entry (`(B, 1, 1, T)`, padding) or per query (`(B, 1, T, T)`, causal and
/// windowed patterns); a batch size of 1 applies to every entry.
struct Bias<'a> {
    values: &'a [f32],
    per_query: bool,
    /// Whether the mask has one entry per batch entry (else one for all).
    per_batch: bool,
}

impl Bias<'_> {
    fn row(&self, batch: usize, query: usize, seq: usize) -> &[f32] {
        let batch = if self.per_batch { batch } else { 0 };
        let start = if self.per_query {
            (batch * seq + query) * seq
        } else {
            batch * seq
        };
        &self.values[start..start + seq]
    }
}

/// A buffer that parallel tasks write into, each its own disjoint elements.
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its batch entry's
// rows, its head's columns).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so closures capture the `Sync` wrapper, not the pointer.
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCORE_GRADS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`product`] on one thread: each attention task is already one of many.
///
/// # Safety
/// As [`product`].
unsafe fn product_here(
    shape: (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
) {
    product(shape, dst, accumulate, lhs, rhs, scale, Threads::One)
}

/// Whether [`attention`] can run on these inputs (CPU, f32; a mask needs no
/// gradient).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> bool {
    cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && bias.is_none_or(|b| cpu_f32(b) && !b.track_op())
}

/// The attention op: its shape and mask; q, k and v are its arguments.
struct Attention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// `(B, 1, 1, T)` or `(B, 1, T, T)`, contiguous.
    bias: Option<Tensor>,
}

/// `softmax(scale · q kᵀ + bias) v` for every batch entry and head, with a
/// backward pass when q, k or v is tracked.
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
    let op = Attention {
        heads,
        kv_heads,
        head_dim,
        scale: scale as f32,
        bias: bias.map(Tensor::contiguous).transpose()?,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// q, k and v as slices with their layouts, and the batch and sequence sizes.
struct Inputs<'a> {
    q: (&'a [f32], HeadLayout),
    k: (&'a [f32], HeadLayout),
    v: (&'a [f32], HeadLayout),
    batch: usize,
    seq: usize,
}

impl Attention {
    fn inputs<'a>(
        &self,
        q: (&'a [f32], &[usize]),
        k: (&'a [f32], &[usize]),
        v: (&'a [f32], &[usize]),
    ) -> Result<Inputs<'a>> {
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
            candle_core::bail!(
                "attention: {heads} query heads over {kv_heads} key/value heads of size {d}"
            );
        }
        // (batch, sequence) of a (B, T, H·D) or (B, H, T, D) input with `h` heads.
        let batch_seq = |dims: &[usize], h: usize| -> Result<(usize, usize)> {
            match *dims {
                [b, t, width] if width == h * d => Ok((b, t)),
                [b, heads_in, t, size] if heads_in == h && size == d => Ok((b, t)),
                _ => candle_core::bail!(
                    "attention: input of shape {dims:?} for {h} heads of size {d}"
                ),
            }
        };
        let (batch, seq) = batch_seq(q.1, heads)?;
        if batch_seq(k.1, kv_heads)? != (batch, seq) || batch_seq(v.1, kv_heads)? != (batch, seq) {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} differ in batch or sequence",
                q.1,
                k.1,
                v.1
            );
        }
        Ok(Inputs {
            q: (q.0, HeadLayout::of(q.1, self.heads)?),
            k: (k.0, HeadLayout::of(k.1, self.kv_heads)?),
            v: (v.0, HeadLayout::of(v.1, self.kv_heads)?),
            batch,
            seq,
        })
    }

    /// Runs `f` with the mask as a [`Bias`], when there is one.
    fn with_bias<R>(
        &self,
        batch: usize,
        seq: usize,
        f: impl FnOnce(Option<&Bias>) -> Result<R>,
    ) -> Result<R> {
        let Some(tensor) = &self.bias else {
            return f(None);
        };
        let (storage, layout) = tensor.storage_and_layout();
        let values = values(&storage, layout)?;
        let bias = match *tensor.dims() {
            [b, 1, rows, keys]
                if (b == batch || b == 1) && keys == seq && (rows == 1 || rows == seq) =>
            {
                Bias {
                    values,
                    per_query: rows == seq && seq > 1,
                    per_batch: b == batch && batch > 1,
                }
            }
            ref dims => candle_core::bail!(
                "attention bias of shape {dims:?} for batch {batch} and sequence {seq}"
            ),
        };
        f(Some(&bias))
    }

    /// `probs (T, T) = softmax(scale · q_h kᵀ + bias)` of batch entry `b`,
    /// query head `h`, into `probs`.
    fn probabilities(
        &self,
        x: &Inputs,
        bias: Option<&Bias>,
        b: usize,
        h: usize,
        probs: &mut [f32],
    ) {
        let (seq, d) = (x.seq, self.head_dim);
        let kv = h / (self.heads / self.kv_heads);
        let q0 = x.q.0[x.q.1.start(b, h)..].as_ptr();
        let k0 = x.k.0[x.k.1.start(b, kv)..].as_ptr();
        // SAFETY: q and k hold `seq` rows of `d` values at these strides; the
        // scratch holds T × T.
        unsafe {
            // scores (T, T) = scale · q (T, D) · kᵀ (D, T)
            product_here(
                (seq, seq, d),
                (probs.as_mut_ptr(), seq, 1),
                false,
                (q0, x.q.1.row, 1),
                (k0, 1, x.k.1.row),
                self.scale,
            );
        }
        for (i, row) in probs.chunks_exact_mut(seq).enumerate() {
            softmax_row(row, bias.map(|bias| bias.row(b, i, seq)));
        }
    }

    fn forward(&self, x: &Inputs) -> Result<Vec<f32>> {
        let (batch, seq, d) = (x.batch, x.seq, self.head_dim);
        let width = self.heads * d;
        let kv_of = |h: usize| h / (self.heads / self.kv_heads);
        let mut out = vec![0.0f32; batch * seq * width];
        let out_ptr = SharedOut(out.as_mut_ptr());
        self.with_bias(batch, seq, |bias| {
            (0..batch * self.heads).into_par_iter().for_each(|task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let v0 = x.v.0[x.v.1.start(b, kv_of(h))..].as_ptr();
                SCORES.with(|scores| {
                    let mut probs = scores.borrow_mut();
                    probs.resize(seq * seq, 0.0);
                    self.probabilities(x, bias, b, h, &mut probs);
                    // SAFETY: the output block (rows of batch `b`, columns of
                    // head `h`) belongs to this task alone.
                    unsafe {
                        // context (T, D) = probs (T, T) · v (T, D), into the merged output.
                        product_here(
                            (seq, d, seq),
                            (out_ptr.at(b * seq * width + h * d), width, 1),
                            false,
                            (probs.as_ptr(), seq, 1),
                            (v0, x.v.1.row, 1),
                            1.0,
                        );
                    }
                });
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// `(dq, dk, dv)`, each laid out as its input, from `grad` `(B, T, H·D)`.
    fn backward(&self, x: &Inputs, grad: &[f32]) -> Result<[Vec<f32>; 3]> {
        let (batch, seq, d) = (x.batch, x.seq, self.head_dim);
        let width = self.heads * d;
        let group = self.heads / self.kv_heads;
        let mut dq = vec![0.0f32; x.q.0.len()];
        let mut dk = vec![0.0f32; x.k.0.len()];
        let mut dv = vec![0.0f32; x.v.0.len()];
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        // One task per key/value head, so the query heads of a group add
        // into its dk and dv in turn.
        self.with_bias(batch, seq, |bias| {
            (0..batch * self.kv_heads).into_par_iter().for_each(|task| {
                let (b, kv) = (task / self.kv_heads, task % self.kv_heads);
                let k0 = x.k.0[x.k.1.start(b, kv)..].as_ptr();
                let v0 = x.v.0[x.v.1.start(b, kv)..].as_ptr();
                let dk0 = dk_ptr.at(x.k.1.start(b, kv));
                let dv0 = dv_ptr.at(x.v.1.start(b, kv));
                SCORES.with(|scores| {
                    SCORE_GRADS.with(|score_grads| {
                        let (mut probs, mut ds) = (scores.borrow_mut(), score_grads.borrow_mut());
                        probs.resize(seq * seq, 0.0);
                        ds.resize(seq * seq, 0.0);
                        for h in kv * group..(kv + 1) * group {
                            self.probabilities(x, bias, b, h, &mut probs);
                            let q0 = x.q.0[x.q.1.start(b, h)..].as_ptr();
                            let do0 = grad[b * seq * width + h * d..].as_ptr();
                            let accumulate = h > kv * group;
                            // SAFETY: every matrix stays inside its buffer;
                            // dq's block (batch `b`, head `h`) and dk's and
                            // dv's (batch `b`, head `kv`) belong to this task.
                            unsafe {
                                // dP (T, T) = dO (T, D) · vᵀ (D, T)
                                product_here(
                                    (seq, seq, d),
                                    (ds.as_mut_ptr(), seq, 1),
                                    false,
                                    (do0, width, 1),
                                    (v0, 1, x.v.1.row),
                                    1.0,
                                );
                            }
                            for (p, dp) in probs.chunks_exact(seq).zip(ds.chunks_exact_mut(seq)) {
                                let dot: f32 = p.iter().zip(dp.iter()).map(|(p, g)| p * g).sum();
                                for (g, p) in dp.iter_mut().zip(p) {
                                    *g = p * (*g - dot);
                                }
                            }
                            unsafe {
                                // dq (T, D) = scale · dS (T, T) · k (T, D)
                                product_here(
                                    (seq, d, seq),
                                    (dq_ptr.at(x.q.1.start(b, h)), x.q.1.row, 1),
                                    false,
                                    (ds.as_ptr(), seq, 1),
                                    (k0, x.k.1.row, 1),
                                    self.scale,
                                );
                                // dk (T, D) += scale · dSᵀ (T, T) · q (T, D)
                                product_here(
                                    (seq, d, seq),
                                    (dk0, x.k.1.row, 1),
                                    accumulate,
                                    (ds.as_ptr(), 1, seq),
                                    (q0, x.q.1.row, 1),
                                    self.scale,
                                );
                                // dv (T, D) += Pᵀ (T, T) · dO (T, D)
                                product_here(
                                    (seq, d, seq),
                                    (dv0, x.v.1.row, 1),
                                    accumulate,
                                    (probs.as_ptr(), 1, seq),
                                    (do0, width, 1),
                                    1.0,
                                );
                            }
                        }
                    })
                });
            });
            Ok(())
        })?;
        Ok([dq, dk, dv])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "effir-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = self.inputs(
            (cpu_f32_values(q, ql)?, ql.dims()),
            (cpu_f32_values(k, kl)?, kl.dims()),
            (cpu_f32_values(v, vl)?, vl.dims()),
        )?;
        let out = self.forward(&x)?;
        let shape = Shape::from((x.batch, x.seq, self.heads * self.head_dim));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _context: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (g_storage, g_layout) = grad.storage_and_layout();
        let x = self.inputs(
            (values(&q_storage, q_layout)?, q.dims()),
            (values(&k_storage, k_layout)?, k.dims()),
            (values(&v_storage, v_layout)?, v.dims()),
        )?;
        let [dq, dk, dv] = self.backward(&x, values(&g_storage, g_layout)?)?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::layers::{merge_heads, scaled_dot_product_attention, split_heads};
    use crate::model::kernels::test_support::{assert_close, gradients, random};
    use candle_core::Device;

    /// The composed attention, from merged `(B, T, H·D)` or split inputs.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (heads, kv_heads, d): (usize, usize, usize),
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let split = |t: &Tensor, h| {
            if t.rank() == 3 {
                split_heads(t, h, d)
            } else {
                Ok(t.clone())
            }
        };
        let context = scaled_dot_product_attention(
            &split(q, heads)?,
            &split(k, kv_heads)?,
            &split(v, kv_heads)?,
            bias,
            0.3,
        )?;
        merge_heads(&context)
    }

    /// The fused kernel computes what the composed operations compute, and
    /// so do its gradients with respect to q, k and v: for grouped-query
    /// heads, inputs merged or split, padding and causal masks.
    #[test]
    fn the_fused_kernel_equals_the_composed_attention() {
        let (b, t, d) = (3, 7, 8);
        for (heads, kv_heads) in [(4, 4), (4, 2), (6, 1)] {
            let q = random(&[b, t, heads * d], 1);
            let k = random(&[b, t, kv_heads * d], 2);
            let v = random(&[b, t, kv_heads * d], 3);
            let upstream = random(&[b, t, heads * d], 4);
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
            let (qs, ks) = (
                split_heads(&q, heads, d).unwrap(),
                split_heads(&k, kv_heads, d).unwrap(),
            );
            for bias in [None, Some(&per_key), Some(&causal)] {
                let case = format!(
                    "heads {heads}/{kv_heads}, bias {:?}",
                    bias.map(|b| b.dims().to_vec())
                );
                let shape = (heads, kv_heads, d);
                let want = composed(&q, &k, &v, shape, bias).unwrap();
                for (q_in, k_in) in [(&q, &k), (&qs, &ks)] {
                    let got = attention(q_in, k_in, &v, heads, kv_heads, d, bias, 0.3).unwrap();
                    assert_close(&format!("{case}: context"), &got, &want, 1e-6);
                    let ours = gradients(&[q_in, k_in, &v], &upstream, |x| {
                        attention(&x[0], &x[1], &x[2], heads, kv_heads, d, bias, 0.3)
                    });
                    let reference = gradients(&[q_in, k_in, &v], &upstream, |x| {
                        composed(&x[0], &x[1], &x[2], shape, bias)
                    });
                    for (name, (g, r)) in ["dq", "dk", "dv"].iter().zip(ours.iter().zip(&reference))
                    {
                        assert_close(
                            &format!("{case}, q rank {}: {name}", q_in.rank()),
                            g,
                            r,
                            1e-5,
                        );
                    }
                }
            }
        }
    }

    /// A mask of batch size 1 applies to every batch entry, as broadcasting
    /// does; inputs whose shapes do not fit each other are refused, not read
    /// out of bounds.
    #[test]
    fn a_shared_mask_broadcasts_and_mismatched_shapes_are_refused() {
        let (b, t, h, d) = (2, 5, 2, 4);
        let q = random(&[b, t, h * d], 1);
        let k = random(&[b, t, h * d], 2);
        let v = random(&[b, t, h * d], 3);
        let causal: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { f32::MIN } else { 0.0 })
            .collect();
        let shared = Tensor::from_vec(causal, (1, 1, t, t), &Device::Cpu).unwrap();
        let want = composed(&q, &k, &v, (h, h, d), Some(&shared)).unwrap();
        let got = attention(&q, &k, &v, h, h, d, Some(&shared), 0.3).unwrap();
        assert_close("shared mask", &got, &want, 1e-6);

        let short = random(&[b, t - 1, h * d], 4);
        let narrow = random(&[b, t, d], 5);
        let wrong_mask =
            Tensor::zeros((b, 1, 1, t + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (what, result) in [
            ("a shorter k", attention(&q, &short, &v, h, h, d, None, 0.3)),
            (
                "v of one head",
                attention(&q, &k, &narrow, h, h, d, None, 0.3),
            ),
            ("3 heads over 2", attention(&q, &k, &v, 3, 2, d, None, 0.3)),
            (
                "a mask of T + 1 keys",
                attention(&q, &k, &v, h, h, d, Some(&wrong_mask), 0.3),
            ),
        ] {
            assert!(result.is_err(), "{what} was accepted");
        }
    }
}
