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

    /// The kernel `--int8-kernel auto` picks for a CPU: u8s8 where its
    /// products cannot saturate (VNNI, or not x86), otherwise
    /// reduce-range: the same u8×s8 instructions with 7-bit weights, whose
    /// pairwise sums (at most 2 × 255 × 63) fit the 16 bits that AVX2's
    /// `VPMADDUBSW` keeps, so nothing saturates and nothing slows down.
    pub fn for_cpu(cpu: &crate::cpu_features::CpuFeatures) -> Self {
        if cpu.u8s8_may_saturate() {
            Self::ReduceRange
        } else {
            Self::U8s8
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
    fn auto_picks_the_fast_kernel_that_cannot_saturate_on_the_cpu() {
        use crate::cpu_features::CpuFeatures;
        let avx2 = CpuFeatures {
            avx2: true,
            avx512: false,
            vnni: false,
            neon: false,
        };
        assert_eq!(Int8Kernel::for_cpu(&avx2), Int8Kernel::ReduceRange);
        let avx512 = CpuFeatures {
            avx512: true,
            ..avx2
        };
        assert_eq!(Int8Kernel::for_cpu(&avx512), Int8Kernel::ReduceRange);
        let vnni = CpuFeatures {
            vnni: true,
            ..avx512
        };
        assert_eq!(Int8Kernel::for_cpu(&vnni), Int8Kernel::U8s8);
        let arm = CpuFeatures {
            avx2: false,
            neon: true,
            ..avx2
        };
        assert_eq!(Int8Kernel::for_cpu(&arm), Int8Kernel::U8s8);
        // reduce-range's largest pair sum fits a signed 16-bit lane; u8s8's does not.
        let pair = |levels: f32| 2.0 * 255.0 * levels;
        assert!(pair(Int8Kernel::ReduceRange.levels()) <= i16::MAX as f32);
        assert!(pair(Int8Kernel::U8s8.levels()) > i16::MAX as f32);
    }

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
