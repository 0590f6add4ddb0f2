//! LayerNorm and RMSNorm over the last dimension, forward and backward,
//! parallel over rows.
//!
//! The forward passes compute exactly what candle's fused `layer_norm` and
//! `rms_norm` compute (the same sums in the same order), so inference is
//! unchanged. The backward passes recompute each row's statistics from the
//! input instead of keeping them: with `x̂` the normalised row and `g` the
//! output gradient times the scale,
//! - LayerNorm: `dx = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ`,
//!   `dw = Σ dy ⊙ x̂`, `db = Σ dy`;
//! - RMSNorm: `dx = (g − x̂ · mean(g ⊙ x̂)) / rms`, `dscale = Σ dy ⊙ x̂`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, cpu_f32_values, with_values};

/// Rows per parallel task in the backward passes: each task keeps its own
/// parameter-gradient sums, added up at the end.
const ROWS_PER_TASK: usize = 64;

/// Whether [`layer_norm`] and [`rms_norm`] can run on these tensors.
pub fn applies(x: &Tensor, params: &[&Tensor]) -> bool {
    cpu_f32(x) && params.iter().all(|p| cpu_f32(p))
}

/// `(x − mean) / √(var + eps) · weight + bias` over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

/// `x / √(mean(x²) + eps) · scale` over the last dimension.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&scale.contiguous()?, RmsNorm { eps })
}

/// `layer_norm(a + b)`, the residual sum and its LayerNorm in one pass over
/// one new buffer, where the composed form writes the sum to a tensor of its
/// own first. For inference: when `a` or `b` is tracked for gradients it is
/// the composed form, whose backward pass [`layer_norm`] has. The result is
/// bit-identical to `layer_norm(&(a + b)?, …)` either way.
pub fn layer_norm_of_sum(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    if a.track_op() || b.track_op() || a.dims() != b.dims() {
        return layer_norm(&(a + b)?, weight, bias, eps);
    }
    let width = a.dim(candle_core::D::Minus1)?;
    let out = with_values(a, |a| {
        with_values(b, |b| {
            with_values(weight, |w| {
                with_values(bias, |bias| {
                    check_params("layer norm", width, &[w, bias])?;
                    let mut out = vec![0f32; a.len()];
                    out.par_chunks_mut(width)
                        .zip(a.par_chunks(width).zip(b.par_chunks(width)))
                        .for_each(|(out, (a, b))| {
                            for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
                                *o = a + b;
                            }
                            let (mean, inv_std) = mean_inv_std(out, eps);
                            for (o, (w, bias)) in out.iter_mut().zip(w.iter().zip(bias)) {
                                *o = (*o - mean) * inv_std * w + bias;
                            }
                        });
                    Ok(out)
                })
            })
        })
    })?;
    Tensor::from_vec(out, a.shape(), a.device())
}

struct LayerNorm {
    eps: f32,
}

/// A row's mean and `1 / σ`, as candle's `layer_norm` computes them
/// (`E[x²] − mean²`), except that a variance rounded below zero counts as
/// zero instead of giving NaN.
#[inline]
fn mean_inv_std(row: &[f32], eps: f32) -> (f32, f32) {
    let (mut sum, mut sum2) = (0f32, 0f32);
    for &v in row {
        sum += v;
        sum2 += v * v;
    }
    let n = row.len() as f32;
    let mean = sum / n;
    let var = (sum2 / n - mean * mean).max(0.0);
    (mean, (var + eps).sqrt().recip())
}

/// A row's root mean square, as candle's `rms_norm` computes it.
#[inline]
fn rms(row: &[f32], eps: f32) -> f32 {
    let sum2: f32 = row.iter().map(|v| v * v).sum();
    (sum2 / row.len() as f32 + eps).sqrt()
}

fn check_params(what: &str, width: usize, params: &[&[f32]]) -> Result<()> {
    if width == 0 || params.iter().any(|p| p.len() != width) {
        candle_core::bail!(
            "{what}: rows of {width} with parameters of {:?}",
            params.iter().map(|p| p.len()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Adds up the parameter gradients of the tasks, `width` values each.
fn sum_parts(parts: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    parts.into_iter().fold(vec![0f32; width], |mut acc, p| {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
        acc
    })
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "effir-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            cpu_f32_values(x, xl)?,
            cpu_f32_values(w, wl)?,
            cpu_f32_values(b, bl)?,
        );
        let width = *xl.dims().last().unwrap_or(&0);
        check_params("layer norm", width, &[w, b])?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .for_each(|(out, x)| {
                let (mean, inv_std) = mean_inv_std(x, self.eps);
                for ((o, x), (w, b)) in out.iter_mut().zip(x).zip(w.iter().zip(b)) {
                    *o = (x - mean) * inv_std * w + b;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = x.dim(candle_core::D::Minus1)?;
        let (dx, dw, db) = with_values(x, |xs| {
            with_values(weight, |w| {
                with_values(grad, |gs| {
                    let mut dx = vec![0f32; xs.len()];
                    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(width * ROWS_PER_TASK)
                        .zip(xs.par_chunks(width * ROWS_PER_TASK))
                        .zip(gs.par_chunks(width * ROWS_PER_TASK))
                        .map(|((dx, xs), gs)| {
                            let (mut dw, mut db) = (vec![0f32; width], vec![0f32; width]);
                            let mut g = vec![0f32; width];
                            for ((dx, x), dy) in dx
                                .chunks_exact_mut(width)
                                .zip(xs.chunks_exact(width))
                                .zip(gs.chunks_exact(width))
                            {
                                let (mean, inv_std) = mean_inv_std(x, self.eps);
                                let (mut g_mean, mut gx_mean) = (0f32, 0f32);
                                for i in 0..width {
                                    let xhat = (x[i] - mean) * inv_std;
                                    g[i] = dy[i] * w[i];
                                    g_mean += g[i];
                                    gx_mean += g[i] * xhat;
                                    dw[i] += dy[i] * xhat;
                                    db[i] += dy[i];
                                }
                                g_mean /= width as f32;
                                gx_mean /= width as f32;
                                for i in 0..width {
                                    let xhat = (x[i] - mean) * inv_std;
                                    dx[i] = (g[i] - g_mean - xhat * gx_mean) * inv_std;
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let (dw, db): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
                    Ok((dx, sum_parts(dw, width), sum_parts(db, width)))
                })
            })
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dw, weight.shape(), device)?),
            Some(Tensor::from_vec(db, bias.shape(), device)?),
        ))
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "effir-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, scale) = (cpu_f32_values(x, xl)?, cpu_f32_values(s, sl)?);
        let width = *xl.dims().last().unwrap_or(&0);
        check_params("rms norm", width, &[scale])?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .for_each(|(out, x)| {
                let m = rms(x, self.eps);
                for ((o, x), s) in out.iter_mut().zip(x).zip(scale) {
                    *o = x / m * s;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = x.dim(candle_core::D::Minus1)?;
        let (dx, ds) = with_values(x, |xs| {
            with_values(scale, |s| {
                with_values(grad, |gs| {
                    let mut dx = vec![0f32; xs.len()];
                    let parts: Vec<Vec<f32>> = dx
                        .par_chunks_mut(width * ROWS_PER_TASK)
                        .zip(xs.par_chunks(width * ROWS_PER_TASK))
                        .zip(gs.par_chunks(width * ROWS_PER_TASK))
                        .map(|((dx, xs), gs)| {
                            let mut ds = vec![0f32; width];
                            for ((dx, x), dy) in dx
                                .chunks_exact_mut(width)
                                .zip(xs.chunks_exact(width))
                                .zip(gs.chunks_exact(width))
                            {
                                let inv = rms(x, self.eps).recip();
                                let mut gx_mean = 0f32;
                                for i in 0..width {
                                    let xhat = x[i] * inv;
                                    gx_mean += dy[i] * s[i] * xhat;
                                    ds[i] += dy[i] * xhat;
                                }
                                gx_mean /= width as f32;
                                for i in 0..width {
                                    dx[i] = (dy[i] * s[i] - x[i] * inv * gx_mean) * inv;
                                }
                            }
                            ds
                        })
                        .collect();
                    Ok((dx, sum_parts(parts, width)))
                })
            })
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(ds, scale.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::test_support::{assert_close, gradients, random};

    /// The forward passes equal candle's fused norms bit for bit (inference
    /// is unchanged), and the gradients equal those of candle's composed,
    /// differentiable forms.
    #[test]
    fn norms_match_candle_forward_and_backward() {
        let x = random(&[3, 5, 48], 1).affine(2.0, 0.5).unwrap();
        let w = random(&[48], 2).affine(0.5, 1.0).unwrap();
        let b = random(&[48], 3);
        let upstream = random(&[3, 5, 48], 4);

        let ours = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_close("layer norm forward", &ours, &fused, 0.0);
        let got = gradients(&[&x, &w, &b], &upstream, |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5)
        });
        let want = gradients(&[&x, &w, &b], &upstream, |t| {
            candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5)
        });
        for (name, (g, w)) in ["dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("layer norm {name}"), g, w, 2e-5);
        }

        let ours = rms_norm(&x, &w, 1e-6).unwrap();
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        assert_close("rms norm forward", &ours, &fused, 0.0);
        let got = gradients(&[&x, &w], &upstream, |t| rms_norm(&t[0], &t[1], 1e-6));
        let want = gradients(&[&x, &w], &upstream, |t| {
            candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6)
        });
        for (name, (g, w)) in ["dx", "dscale"].iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("rms norm {name}"), g, w, 2e-5);
        }
    }

    /// The fused residual sum and norm is the norm of the sum, bit for bit;
    /// tracked inputs take the composed path and still get their gradients.
    #[test]
    fn layer_norm_of_a_sum_is_the_norm_of_the_sum() {
        let a = random(&[2, 7, 40], 11).affine(3.0, 0.2).unwrap();
        let b = random(&[2, 7, 40], 12);
        let w = random(&[40], 13).affine(0.5, 1.0).unwrap();
        let bias = random(&[40], 14);
        let fused = layer_norm_of_sum(&a, &b, &w, &bias, 1e-12).unwrap();
        let composed = layer_norm(&(&a + &b).unwrap(), &w, &bias, 1e-12).unwrap();
        assert_close("fused residual norm", &fused, &composed, 0.0);

        let upstream = random(&[2, 7, 40], 15);
        let got = gradients(&[&a, &b], &upstream, |t| {
            layer_norm_of_sum(&t[0], &t[1], &w, &bias, 1e-12)
        });
        let want = gradients(&[&a, &b], &upstream, |t| {
            candle_nn::ops::layer_norm_slow(&(&t[0] + &t[1])?, &w, &bias, 1e-12)
        });
        assert_close("da", &got[0], &want[0], 2e-5);
        assert_close("db", &got[1], &want[1], 2e-5);
        assert!(layer_norm_of_sum(&a, &random(&[2, 7, 39], 16), &w, &bias, 1e-12).is_err());
    }

    /// More rows than one backward task takes: the per-task parameter
    /// gradients are added up.
    #[test]
    fn parameter_gradients_sum_over_every_task() {
        let rows = 3 * ROWS_PER_TASK + 5;
        let x = random(&[rows, 16], 5);
        let w = random(&[16], 6);
        let b = random(&[16], 7);
        let upstream = random(&[rows, 16], 8);
        let got = gradients(&[&x, &w, &b], &upstream, |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5)
        });
        let want = gradients(&[&x, &w, &b], &upstream, |t| {
            candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5)
        });
        assert_close("dw over tasks", &got[1], &want[1], 1e-4);
        assert_close("db over tasks", &got[2], &want[2], 1e-4);
    }
}
