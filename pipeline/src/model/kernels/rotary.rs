//! Rotary position embeddings in Hugging Face's half-rotation layout
//! (`rotate_half`), forward and backward.
//!
//! Each position `t` rotates the pairs `(x[i], x[i + D/2])` by the angle
//! whose cosine and sine are `cos[t, i]`, `sin[t, i]`. The forward pass
//! computes exactly what candle's fused `rope` computes. A rotation's
//! transpose is the rotation by the opposite angle, so the backward pass is
//! the same kernel with `sin` negated.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, cpu_f32_values, with_values};

/// Whether [`rope`] can run on these tensors (CPU, f32; the angles need no
/// gradient).
pub fn applies(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin) && !cos.track_op() && !sin.track_op()
}

/// Rotates `x` `(B, H, T, D)` by `cos`, `sin` `(T, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = Rope {
        cos: with_values(cos, |v| Ok(v.to_vec()))?,
        sin: with_values(sin, |v| Ok(v.to_vec()))?,
    };
    x.contiguous()?.apply_op1(op)
}

/// The angles, `T × D/2` each, row-major.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn rotate(&self, x: &[f32], dims: &[usize], negate_sin: bool) -> Result<Vec<f32>> {
        let &[_, _, t, d] = dims else {
            candle_core::bail!("rotary: input of shape {dims:?}, expected (B, H, T, D)");
        };
        let half = d / 2;
        if d % 2 != 0 || self.cos.len() != t * half || self.sin.len() != t * half {
            candle_core::bail!(
                "rotary: {} angles for {t} positions of head size {d}",
                self.cos.len()
            );
        }
        let sign = if negate_sin { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .for_each(|(out, x)| {
                for pos in 0..t {
                    for i in 0..half {
                        let (i1, i2, a) = (pos * d + i, pos * d + i + half, pos * half + i);
                        let (cos, sin) = (self.cos[a], sign * self.sin[a]);
                        out[i1] = x[i1] * cos - x[i2] * sin;
                        out[i2] = x[i1] * sin + x[i2] * cos;
                    }
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "effir-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.rotate(cpu_f32_values(storage, layout)?, layout.dims(), false)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(grad, |g| self.rotate(g, grad.dims(), true))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::test_support::{assert_close, gradients, random};

    #[test]
    fn rope_matches_candle_forward_and_backward() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = random(&[b, h, t, d], 1);
        let angles = random(&[t, d / 2], 2).affine(3.0, 0.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let ours = rope(&x, &cos, &sin).unwrap();
        let fused = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        assert_close("rope forward", &ours, &fused, 0.0);
        let upstream = random(&[b, h, t, d], 3);
        let got = gradients(&[&x], &upstream, |t| rope(&t[0], &cos, &sin));
        let want = gradients(&[&x], &upstream, |t| {
            candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin)
        });
        assert_close("rope dx", &got[0], &want[0], 1e-6);
    }
}
