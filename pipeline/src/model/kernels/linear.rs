//! `y = x Wᵀ + b` in one pass: the output starts as the bias rows and the
//! matrix product accumulates into it (the `gemm` crate's `dst = dst + x Wᵀ`),
//! where candle zero-fills the product, then adds the bias in a second pass
//! over a second buffer.

use candle_core::{Device, Result, Tensor};

use super::{f32_values as values, plain};

/// Whether [`linear`] can run on these inputs (CPU, f32, no gradient).
pub fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    plain(x) && plain(weight) && bias.is_none_or(plain)
}

/// `x (rows, in) · weightᵀ (in, out) + bias (out)` as `(rows, out)`;
/// `weight` is PyTorch's `(out, in)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, in_dim) = x.dims2()?;
    let (out_dim, w_in) = weight.dims2()?;
    if w_in != in_dim {
        candle_core::bail!(
            "linear kernel: input width {in_dim}, weight {:?}",
            weight.dims()
        );
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let xs = values(&x_storage, x_layout)?;
    let ws = values(&w_storage, w_layout)?;
    let mut out = Vec::with_capacity(rows * out_dim);
    let read_dst = match bias {
        Some(bias) => {
            let bias = bias.contiguous()?;
            let (b_storage, b_layout) = bias.storage_and_layout();
            let bs = values(&b_storage, b_layout)?;
            if bs.len() != out_dim {
                candle_core::bail!("linear kernel: bias of {} for width {out_dim}", bs.len());
            }
            for _ in 0..rows {
                out.extend_from_slice(bs);
            }
            true
        }
        None => {
            out.resize(rows * out_dim, 0.0);
            false
        }
    };
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && rows * out_dim * in_dim > 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `out` is rows × out_dim (row-major), `xs` rows × in_dim,
    // `ws` out_dim × in_dim read as its transpose; every stride stays inside.
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            read_dst,
            xs.as_ptr(),
            1,
            in_dim as isize,
            ws.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Tensor::from_vec(out, (rows, out_dim), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let diff: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6, "bias {}: {diff}", bias.is_some());
        }
    }
}
