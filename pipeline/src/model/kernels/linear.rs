//! `y = x Wᵀ + b`, forward and backward.
//!
//! The forward pass is one pass: the output starts as the bias rows and the
//! matrix product accumulates into it (the `gemm` crate's `dst = dst + x Wᵀ`),
//! where candle zero-fills the product, then adds the bias in a second pass
//! over a second buffer. The backward pass writes `dx = dy W`,
//! `dW = dyᵀ x` (in PyTorch's `(out, in)` layout, where candle's autograd
//! leaves a transposed view) and the bias gradient, the column sums of `dy`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::activation::{apply_in_place, Kind};
use super::{cpu_f32, cpu_f32_values, product, with_values, Threads};

/// Whether [`linear`] can run on these inputs (CPU, f32).
pub fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    cpu_f32(x) && cpu_f32(weight) && bias.is_none_or(cpu_f32)
}

/// `x (rows, in) · weightᵀ (in, out) + bias (out)` as `(rows, out)`;
/// `weight` is PyTorch's `(out, in)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    apply(x, weight, bias, Linear { then: None })
}

/// `activation(linear(x, weight, bias))`. When nothing is tracked for
/// gradients the activation runs in place on the product's own buffer, the
/// MLP's widest tensor, instead of writing a second one; otherwise it is
/// the two ops, each with its backward pass.
pub fn linear_then(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Kind,
) -> Result<Tensor> {
    if x.track_op() || weight.track_op() || bias.is_some_and(Tensor::track_op) {
        return linear(x, weight, bias)?.apply_op1(activation);
    }
    apply(
        x,
        weight,
        bias,
        Linear {
            then: Some(activation),
        },
    )
}

fn apply(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, op: Linear) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, op),
        None => x.apply_op2(&weight, op),
    }
}

/// The linear op; with two arguments it has no bias. `then`: an activation
/// applied to the output in place (only built when no gradient is wanted).
struct Linear {
    then: Option<Kind>,
}

impl Linear {
    fn finish(&self, mut out: Vec<f32>) -> Vec<f32> {
        if let Some(kind) = self.then {
            apply_in_place(kind, &mut out);
        }
        out
    }

    fn check_backward(&self) -> Result<()> {
        if self.then.is_some() {
            candle_core::bail!("linear with an in-place activation has no backward pass");
        }
        Ok(())
    }
}

/// The rows of `x` and the widths, checked against the weight and bias.
fn dims(x: &[usize], weight: &[usize], bias: Option<usize>) -> Result<(usize, usize, usize)> {
    let (&[rows, in_dim], &[out_dim, w_in]) = (x, weight) else {
        candle_core::bail!("linear: input {x:?} and weight {weight:?} must be matrices");
    };
    if w_in != in_dim || bias.is_some_and(|b| b != out_dim) {
        candle_core::bail!("linear: input {x:?}, weight {weight:?}, bias of {bias:?}");
    }
    Ok((rows, in_dim, out_dim))
}

fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    (rows, in_dim, out_dim): (usize, usize, usize),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * out_dim);
    match bias {
        Some(bias) => (0..rows).for_each(|_| out.extend_from_slice(bias)),
        None => out.resize(rows * out_dim, 0.0),
    }
    // SAFETY: `out` is rows × out_dim (row-major), `x` rows × in_dim,
    // `weight` out_dim × in_dim read as its transpose.
    unsafe {
        product(
            (rows, out_dim, in_dim),
            (out.as_mut_ptr(), out_dim, 1),
            bias.is_some(),
            (x.as_ptr(), in_dim, 1),
            (weight.as_ptr(), 1, in_dim),
            1.0,
            Threads::All,
        );
    }
    out
}

/// `(dx, dW, db)`; `db` only when `with_bias`.
fn backward(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    with_bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (rows, in_dim, out_dim) = dims(x.dims(), weight.dims(), None)?;
    let (dx, dw, db) = with_values(x, |xs| {
        with_values(weight, |ws| {
            with_values(grad, |gs| {
                let mut dx = vec![0f32; rows * in_dim];
                let mut dw = vec![0f32; out_dim * in_dim];
                // SAFETY: every matrix is row-major with the sizes given.
                unsafe {
                    // dx (rows, in) = dy (rows, out) · W (out, in)
                    product(
                        (rows, in_dim, out_dim),
                        (dx.as_mut_ptr(), in_dim, 1),
                        false,
                        (gs.as_ptr(), out_dim, 1),
                        (ws.as_ptr(), in_dim, 1),
                        1.0,
                        Threads::All,
                    );
                    // dW (out, in) = dyᵀ (out, rows) · x (rows, in)
                    product(
                        (out_dim, in_dim, rows),
                        (dw.as_mut_ptr(), in_dim, 1),
                        false,
                        (gs.as_ptr(), 1, out_dim),
                        (xs.as_ptr(), in_dim, 1),
                        1.0,
                        Threads::All,
                    );
                }
                let db = with_bias.then(|| {
                    gs.chunks_exact(out_dim)
                        .fold(vec![0f32; out_dim], |mut acc, row| {
                            for (a, g) in acc.iter_mut().zip(row) {
                                *a += g;
                            }
                            acc
                        })
                });
                Ok((dx, dw, db))
            })
        })
    })?;
    let device = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), device)?,
        Tensor::from_vec(dw, weight.shape(), device)?,
        db.map(|db| Tensor::from_vec(db, out_dim, device))
            .transpose()?,
    ))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "effir-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = dims(xl.dims(), wl.dims(), None)?;
        let out = forward(cpu_f32_values(x, xl)?, cpu_f32_values(w, wl)?, None, shape);
        let out = self.finish(out);
        Ok((CpuStorage::F32(out), Shape::from((shape.0, shape.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.check_backward()?;
        let (dx, dw, _) = backward(x, weight, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "effir-linear-bias"
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
        let bias = cpu_f32_values(b, bl)?;
        let shape = dims(xl.dims(), wl.dims(), Some(bias.len()))?;
        let out = forward(
            cpu_f32_values(x, xl)?,
            cpu_f32_values(w, wl)?,
            Some(bias),
            shape,
        );
        let out = self.finish(out);
        Ok((CpuStorage::F32(out), Shape::from((shape.0, shape.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.check_backward()?;
        let (dx, dw, db) = backward(x, weight, grad, true)?;
        let db = db.map(|db| db.reshape(bias.shape())).transpose()?;
        Ok((Some(dx), Some(dw), db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_fused_product_equals_matmul_plus_bias() {
        let x = Tensor::arange(0f32, 5.0 * 7.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 7))
            .unwrap()
            .affine(0.01, -0.1)
            .unwrap();
        let w = Tensor::arange(0f32, 3.0 * 7.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 7))
            .unwrap()
            .affine(-0.02, 0.2)
            .unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        for (bias, want) in [
            (None, want.clone()),
            (Some(&b), want.broadcast_add(&b).unwrap()),
        ] {
            let got = linear(&x, &w, bias).unwrap();
            let diff = crate::model::kernels::test_support::max_diff(&got, &want);
            assert!(diff < 1e-6, "bias {}: {diff}", bias.is_some());
        }
    }

    /// The gradients with respect to x, W and b equal candle's autograd
    /// through `matmul` and `broadcast_add`.
    #[test]
    fn gradients_equal_the_composed_forms() {
        use crate::model::kernels::test_support::{assert_close, gradients, random};
        let x = random(&[37, 19], 1);
        let w = random(&[23, 19], 2);
        let b = random(&[23], 3);
        let upstream = random(&[37, 23], 4);
        let got = gradients(&[&x, &w, &b], &upstream, |t| {
            linear(&t[0], &t[1], Some(&t[2]))
        });
        let want = gradients(&[&x, &w, &b], &upstream, |t| {
            t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2])
        });
        for (name, (g, w)) in ["dx", "dW", "db"].iter().zip(got.iter().zip(&want)) {
            assert_close(name, g, w, 1e-5);
        }
        let got = gradients(&[&x, &w], &upstream, |t| linear(&t[0], &t[1], None));
        let want = gradients(&[&x, &w], &upstream, |t| t[0].matmul(&t[1].t()?));
        for (name, (g, w)) in ["dx without bias", "dW without bias"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_close(name, g, w, 1e-5);
        }
    }

    /// With an activation fused in, the output is the activation of the
    /// linear layer, bit for bit, with and without a bias; tracked inputs
    /// take the two-op path and get the composed gradients.
    #[test]
    fn an_activation_fused_in_place_equals_the_two_ops() {
        use crate::model::kernels::test_support::{assert_close, gradients, random};
        let x = random(&[41, 19], 5).affine(3.0, 0.0).unwrap();
        let w = random(&[29, 19], 6);
        let b = random(&[29], 7);
        for kind in [Kind::GeluErf, Kind::GeluTanh, Kind::Silu] {
            for bias in [None, Some(&b)] {
                let fused = linear_then(&x, &w, bias, kind).unwrap();
                let two_ops = linear(&x, &w, bias).unwrap().apply_op1(kind).unwrap();
                assert_close(&format!("{kind:?}"), &fused, &two_ops, 0.0);
            }
            let upstream = random(&[41, 29], 8);
            let got = gradients(&[&x, &w, &b], &upstream, |t| {
                linear_then(&t[0], &t[1], Some(&t[2]), kind)
            });
            let want = gradients(&[&x, &w, &b], &upstream, |t| {
                linear(&t[0], &t[1], Some(&t[2]))?.apply_op1(kind)
            });
            for (name, (g, w)) in ["dx", "dW", "db"].iter().zip(got.iter().zip(&want)) {
                assert_close(&format!("{kind:?} {name}"), g, w, 0.0);
            }
        }
    }
}
