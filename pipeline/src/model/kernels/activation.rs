//! MLP activations as one vectorised pass over the tensor, split across
//! threads: exact GELU (BERT), tanh-GELU (Gemma), SiLU (Llama, Qwen,
//! Mistral). Each uses the kernels' [`exp`]; the AVX-512 or AVX2/FMA build
//! is chosen at run time.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::exp::exp;

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `x Φ(x)`, with `erf` from Abramowitz & Stegun 7.1.26 (absolute error
    /// below 1.5e-7).
    GeluErf,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
    /// `x σ(x)`.
    Silu,
}

#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    // 1 - 2 / (e^{2x} + 1), on |x| so e^{2x} cannot overflow.
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

#[inline(always)]
fn apply_body(kind: Kind, input: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    match kind {
        Kind::GeluErf => {
            for (o, &x) in out.iter_mut().zip(input) {
                *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Kind::GeluTanh => {
            for (o, &x) in out.iter_mut().zip(input) {
                *o = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)));
            }
        }
        Kind::Silu => {
            for (o, &x) in out.iter_mut().zip(input) {
                *o = x / (1.0 + exp(-x));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(kind: Kind, input: &[f32], out: &mut [f32]) {
    apply_body(kind, input, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512(kind: Kind, input: &[f32], out: &mut [f32]) {
    apply_body(kind, input, out)
}

fn apply(kind: Kind, input: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::exp::simd_level() {
        // SAFETY: the CPU has the features, as `simd_level` detected.
        super::exp::SimdLevel::Avx512 => return unsafe { apply_avx512(kind, input, out) },
        super::exp::SimdLevel::Avx2 => return unsafe { apply_avx2(kind, input, out) },
        super::exp::SimdLevel::Baseline => {}
    }
    apply_body(kind, input, out)
}

impl CustomOp1 for Kind {
    fn name(&self) -> &'static str {
        match self {
            Self::GeluErf => "effir-gelu-erf",
            Self::GeluTanh => "effir-gelu-tanh",
            Self::Silu => "effir-silu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} takes f32", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} takes a contiguous tensor", self.name());
        };
        let input = &data[start..end];
        let mut out = vec![0f32; input.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(input.par_chunks(16 * 1024))
            .for_each(|(o, i)| apply(*self, i, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: Kind, x: f64) -> f64 {
        match kind {
            // Φ(x) through erf (libm, f64).
            Kind::GeluErf => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
            Kind::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Kind::Silu => x / (1.0 + (-x).exp()),
        }
    }

    /// erf in f64: its Taylor series up to 3, beyond that `1 - erfc` with
    /// erfc's asymptotic series (relative error below 1e-3 of erfc, which
    /// is below 2.3e-5 there).
    fn erf_f64(x: f64) -> f64 {
        let z = x.abs();
        if z > 3.0 {
            let z2 = z * z;
            let series =
                1.0 - 1.0 / (2.0 * z2) + 3.0 / (4.0 * z2 * z2) - 15.0 / (8.0 * z2 * z2 * z2);
            let erfc = (-z2).exp() / (z * std::f64::consts::PI.sqrt()) * series;
            return (1.0 - erfc).copysign(x);
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..100 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-12_000..12_000).map(|i| i as f32 * 7.3e-4).collect();
        type Apply = fn(Kind, &[f32], &mut [f32]);
        let mut builds: Vec<(&str, Apply)> = vec![("portable", |k, i, o| apply_body(k, i, o))];
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::exp::{simd_level, SimdLevel};
            if simd_level() != SimdLevel::Baseline {
                builds.push(("avx2", |k, i, o| unsafe { apply_avx2(k, i, o) }));
            }
            if simd_level() == SimdLevel::Avx512 {
                builds.push(("avx512", |k, i, o| unsafe { apply_avx512(k, i, o) }));
            }
        }
        for ((build, apply), kind) in builds
            .iter()
            .flat_map(|b| [Kind::GeluErf, Kind::GeluTanh, Kind::Silu].map(|k| (b, k)))
        {
            let mut out = vec![0.0; xs.len()];
            apply(kind, &xs, &mut out);
            let worst = xs
                .iter()
                .zip(&out)
                .map(|(x, o)| (*o as f64 - reference(kind, *x as f64)).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 2e-6,
                "{build} {kind:?}: worst absolute error {worst:.2e}"
            );
        }
    }
}
