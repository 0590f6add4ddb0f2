//! Dynamic int8 quantization of the transformer's matrix products, with
//! standard ONNX operators only:
//!
//! ```text
//! x (float) ─ DynamicQuantizeLinear ─ x_q (uint8), x_scale, x_zero_point
//! MatMulInteger(x_q, W_q, x_zero_point, W_zero_point) ─ int32
//!   ─ Cast(float) ─ Mul(x_scale · W_scale) [─ Add(bias)]
//! ```
//!
//! Weights are quantized once, at export, per output channel and
//! symmetrically; activations at run time, per tensor (ONNX Runtime fuses
//! the chain into its integer kernels). Which integer kernel ONNX Runtime
//! runs depends on the weights' type, and on x86 that choice matters:
//! - `u8s8` (int8 weights): `VPMADDUBSW`, the fast path, whose 16-bit
//!   intermediate sums can saturate on AVX2 and AVX-512 CPUs without VNNI;
//! - `u8u8` (uint8 weights, zero point 128): no saturation, slower;
//! - `reduce-range` (int8 weights in 7 bits, [-63, 63]): the fast kernel
//!   with headroom against saturation, at some precision.

use crate::graph::GraphBuilder;
pub use crate::precision::{Int8Kernel, MatmulPrecision};
use candle_onnx::onnx::tensor_proto::DataType;

/// A `(in, out)` matrix quantized per output column.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedColumns {
    /// Row-major `(in, out)`, int8 or uint8 as [`Self::data_type`] says.
    pub values: Vec<u8>,
    pub data_type: DataType,
    /// One per column: `w ≈ scale · (q − zero_point)`.
    pub scales: Vec<f32>,
    /// One per column (0 for int8, 128 for uint8), stored as `data_type`.
    pub zero_points: Vec<u8>,
}

/// Quantizes `w` (row-major `(rows, cols)`) per column, symmetrically: each
/// column's largest magnitude maps to the kernel's largest level. An
/// all-zero column gets scale 1.
pub fn quantize_columns(
    w: &[f32],
    rows: usize,
    cols: usize,
    kernel: Int8Kernel,
) -> QuantizedColumns {
    assert_eq!(w.len(), rows * cols, "matrix of {rows} × {cols}");
    let levels = kernel.levels();
    let mut max = vec![0f32; cols];
    for row in w.chunks_exact(cols) {
        for (m, v) in max.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / levels } else { 1.0 })
        .collect();
    let (data_type, offset) = match kernel {
        Int8Kernel::U8u8 => (DataType::Uint8, 128i32),
        Int8Kernel::U8s8 | Int8Kernel::ReduceRange => (DataType::Int8, 0),
    };
    let values = w
        .chunks_exact(cols)
        .flat_map(|row| {
            row.iter().zip(&scales).map(move |(v, s)| {
                let q = (v / s).round().clamp(-levels, levels) as i32 + offset;
                // Two's complement for int8, the offset value for uint8.
                q as u8
            })
        })
        .collect();
    QuantizedColumns {
        values,
        data_type,
        scales,
        zero_points: vec![offset as u8; cols],
    }
}

/// `x · W` with `w_t` the row-major `(in, out)` float matrix, as the int8
/// chain described in the module documentation; returns the float product.
pub fn int8_matmul(
    g: &mut GraphBuilder,
    x: &str,
    name: &str,
    w_t: &[f32],
    (in_dim, out_dim): (usize, usize),
    kernel: Int8Kernel,
) -> String {
    let q = quantize_columns(w_t, in_dim, out_dim, kernel);
    let weight = g.raw_weight(
        &format!("{name}.weight_quantized"),
        q.data_type,
        &[in_dim, out_dim],
        q.values,
    );
    let zero_point = g.raw_weight(
        &format!("{name}.weight_zero_point"),
        q.data_type,
        &[out_dim],
        q.zero_points,
    );
    let scales = g.floats(&q.scales);
    let [xq, x_scale, x_zero_point] = g.dynamic_quantize(x);
    let product = g.node(
        "MatMulInteger",
        &[&xq, &weight, &x_zero_point, &zero_point],
        vec![],
    );
    let product = g.cast(&product, DataType::Float);
    let scale = g.mul(&x_scale, &scales);
    g.mul(&product, &scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequantize(q: &QuantizedColumns, cols: usize) -> Vec<f32> {
        q.values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = i % cols;
                let (v, zp) = match q.data_type {
                    DataType::Uint8 => (v as i32, q.zero_points[c] as i32),
                    _ => (v as i8 as i32, q.zero_points[c] as i8 as i32),
                };
                (v - zp) as f32 * q.scales[c]
            })
            .collect()
    }

    /// Each kernel's weights round-trip within half a step of their
    /// column's scale, use the kernel's range, and keep a zero column zero.
    #[test]
    fn columns_round_trip_within_half_a_step() {
        let (rows, cols) = (7, 5);
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013 * (1 + i % cols) as f32)
            .collect();
        for r in 0..rows {
            w[r * cols + 3] = 0.0;
        }
        for (kernel, lo, hi) in [
            (Int8Kernel::U8s8, -127i32, 127i32),
            (Int8Kernel::ReduceRange, -63, 63),
            (Int8Kernel::U8u8, 1, 255),
        ] {
            let q = quantize_columns(&w, rows, cols, kernel);
            let back = dequantize(&q, cols);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = q.scales[i % cols];
                assert!(
                    (a - b).abs() <= 0.5 * step + 1e-7,
                    "{kernel:?} [{i}]: {a} -> {b} (step {step})"
                );
            }
            let stored: Vec<i32> = q
                .values
                .iter()
                .map(|&v| match q.data_type {
                    DataType::Uint8 => v as i32,
                    _ => v as i8 as i32,
                })
                .collect();
            assert!(
                stored.iter().all(|v| (lo..=hi).contains(v)),
                "{kernel:?}: {stored:?}"
            );
            assert!(
                stored.contains(&lo) || stored.contains(&hi),
                "{kernel:?} uses its full range"
            );
            assert!((0..rows).all(|r| back[r * cols + 3] == 0.0));
        }
    }
}
