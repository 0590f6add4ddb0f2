//! The arithmetic a graph's matrix products use: the names that export,
//! the graph builder, quantization and validation share.

use serde::{Deserialize, Serialize};

/// The integer kernel an int8 graph asks ONNX Runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Int8Kernel {
    /// uint8 activations × int8 weights.
    #[default]
    U8s8,
    /// uint8 activations × uint8 weights (zero point 128).
    U8u8,
    /// uint8 activations × 7-bit int8 weights.
    ReduceRange,
}

impl Int8Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::U8s8 => "u8s8",
            Self::U8u8 => "u8u8",
            Self::ReduceRange => "reduce-range",
        }
    }

    /// The largest quantized magnitude of a weight.
    pub(crate) fn levels(self) -> f32 {
        match self {
            Self::U8s8 | Self::U8u8 => 127.0,
            Self::ReduceRange => 63.0,
        }
    }
}

/// The arithmetic of the transformer's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    #[default]
    Float32,
    /// Dynamic int8 for the CPU: weights quantized at export, activations
    /// at run time (`crate::quantize`).
    Int8(Int8Kernel),
    /// Static int8 as QuantizeLinear/DequantizeLinear pairs, activation
    /// scales calibrated at export: TensorRT's form (`crate::qdq`).
    Int8Qdq,
    /// float16 products, float32 elsewhere, range-checked at export
    /// (`crate::half_precision`).
    Float16,
}

impl MatmulPrecision {
    /// `fp32`, `int8` or `fp16`, as gates and records name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "fp32",
            Self::Int8(_) | Self::Int8Qdq => "int8",
            Self::Float16 => "fp16",
        }
    }

    pub fn int8_kernel(self) -> Option<Int8Kernel> {
        match self {
            Self::Int8(kernel) => Some(kernel),
            Self::Float32 | Self::Int8Qdq | Self::Float16 => None,
        }
    }

    /// How an int8 graph quantizes: `dynamic` (CPU) or `qdq` (TensorRT).
    pub fn int8_form(self) -> Option<&'static str> {
        match self {
            Self::Int8(_) => Some("dynamic"),
            Self::Int8Qdq => Some("qdq"),
            Self::Float32 | Self::Float16 => None,
        }
    }

    /// Whether the graph is emitted in float32 first and its products
    /// converted afterwards, from ranges measured on calibration text.
    pub fn needs_calibration(self) -> bool {
        matches!(self, Self::Int8Qdq | Self::Float16)
    }
}

/// Checks that `alpha` may smooth the products of `precision`
/// (`crate::smoothing`): dynamic int8 only, a strength in (0, 1].
pub fn check_int8_smoothing(precision: MatmulPrecision, alpha: f32) -> crate::error::Result<()> {
    if precision.int8_kernel().is_none() {
        return Err(crate::error::Error::InvalidArgument(format!(
            "int8 smoothing applies to dynamic int8 products (--precision int8 for the CPU), not {}",
            match precision {
                MatmulPrecision::Int8Qdq => "QDQ int8 (--target tensorrt)",
                other => other.name(),
            }
        )));
    }
    check_alpha(alpha)
}

/// Checks `alpha` is a smoothing strength: in (0, 1].
pub fn check_alpha(alpha: f32) -> crate::error::Result<()> {
    if alpha.is_finite() && alpha > 0.0 && alpha <= 1.0 {
        Ok(())
    } else {
        Err(crate::error::Error::InvalidArgument(format!(
            "the int8 smoothing strength must be in (0, 1] (0.75 is a good start), not {alpha}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_needs_dynamic_int8_and_a_strength_in_zero_to_one() {
        for alpha in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(check_alpha(alpha).is_err(), "{alpha}");
        }
        check_alpha(0.75).unwrap();
        check_alpha(1.0).unwrap();
        let int8 = MatmulPrecision::Int8(Int8Kernel::U8s8);
        check_int8_smoothing(int8, 0.75).unwrap();
        assert!(check_int8_smoothing(int8, 1.5).is_err());
        for other in [
            MatmulPrecision::Float32,
            MatmulPrecision::Float16,
            MatmulPrecision::Int8Qdq,
        ] {
            assert!(check_int8_smoothing(other, 0.75).is_err(), "{other:?}");
        }
    }
}
