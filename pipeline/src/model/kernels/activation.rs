//! MLP activations as one vectorised pass over the tensor, split across
//! threads: exact GELU (BERT), tanh-GELU (Gemma), SiLU (Llama, Qwen,
//! Mistral), and their derivatives for the backward pass (one more pass,
//! from the input). Each uses the kernels' [`exp`]; the AVX-512 or AVX2/FMA
//! build is chosen at run time.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
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

/// The activation of one value.
#[inline(always)]
fn activate(kind: Kind, x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    match kind {
        Kind::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Kind::GeluTanh => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x))),
        Kind::Silu => x / (1.0 + exp(-x)),
    }
}

#[inline(always)]
fn apply_body(kind: Kind, input: &[f32], out: &mut [f32]) {
    // One loop per kind, so each vectorises without a branch inside.
    match kind {
        Kind::GeluErf => out
            .iter_mut()
            .zip(input)
            .for_each(|(o, &x)| *o = activate(Kind::GeluErf, x)),
        Kind::GeluTanh => out
            .iter_mut()
            .zip(input)
            .for_each(|(o, &x)| *o = activate(Kind::GeluTanh, x)),
        Kind::Silu => out
            .iter_mut()
            .zip(input)
            .for_each(|(o, &x)| *o = activate(Kind::Silu, x)),
    }
}

#[inline(always)]
fn in_place_body(kind: Kind, values: &mut [f32]) {
    match kind {
        Kind::GeluErf => values
            .iter_mut()
            .for_each(|x| *x = activate(Kind::GeluErf, *x)),
        Kind::GeluTanh => values
            .iter_mut()
            .for_each(|x| *x = activate(Kind::GeluTanh, *x)),
        Kind::Silu => values
            .iter_mut()
            .for_each(|x| *x = activate(Kind::Silu, *x)),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn in_place_avx2(kind: Kind, values: &mut [f32]) {
    in_place_body(kind, values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn in_place_avx512(kind: Kind, values: &mut [f32]) {
    in_place_body(kind, values)
}

fn in_place(kind: Kind, values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::exp::simd_level() {
        // SAFETY: the CPU has the features, as `simd_level` detected.
        super::exp::SimdLevel::Avx512 => return unsafe { in_place_avx512(kind, values) },
        super::exp::SimdLevel::Avx2 => return unsafe { in_place_avx2(kind, values) },
        super::exp::SimdLevel::Baseline => {}
    }
    in_place_body(kind, values)
}

/// Replaces every value by its activation, over all threads: for a buffer
/// the caller owns and needs no more (the linear layer's output, when no
/// gradient is wanted), so no second buffer is written.
pub fn apply_in_place(kind: Kind, values: &mut [f32]) {
    values
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| in_place(kind, chunk));
}

/// `out = grad ⊙ f'(input)`.
#[inline(always)]
fn derivative_body(kind: Kind, input: &[f32], grad: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    match kind {
        Kind::GeluErf => {
            // Φ(x) + x φ(x)
            for ((o, &x), g) in out.iter_mut().zip(input).zip(grad) {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                *o = g * (cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x));
            }
        }
        Kind::GeluTanh => {
            for ((o, &x), g) in out.iter_mut().zip(input).zip(grad) {
                let t = tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x));
                let inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
                *o = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner);
            }
        }
        Kind::Silu => {
            // σ(x) (1 + x (1 − σ(x)))
            for ((o, &x), g) in out.iter_mut().zip(input).zip(grad) {
                let s = 1.0 / (1.0 + exp(-x));
                *o = g * s * (1.0 + x * (1.0 - s));
            }
        }
    }
}

/// One pass of an activation (`grad` `None`) or of its derivative times
/// `grad`.
#[inline(always)]
fn pass_body(kind: Kind, input: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    match grad {
        None => apply_body(kind, input, out),
        Some(grad) => derivative_body(kind, input, grad, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass_avx2(kind: Kind, input: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    pass_body(kind, input, grad, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pass_avx512(kind: Kind, input: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    pass_body(kind, input, grad, out)
}

fn pass(kind: Kind, input: &[f32], grad: Option<&[f32]>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::exp::simd_level() {
        // SAFETY: the CPU has the features, as `simd_level` detected.
        super::exp::SimdLevel::Avx512 => return unsafe { pass_avx512(kind, input, grad, out) },
        super::exp::SimdLevel::Avx2 => return unsafe { pass_avx2(kind, input, grad, out) },
        super::exp::SimdLevel::Baseline => {}
    }
    pass_body(kind, input, grad, out)
}

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// The activation of `input`, or its derivative times `grad`, over all threads.
fn parallel_pass(kind: Kind, input: &[f32], grad: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    match grad {
        None => out
            .par_chunks_mut(CHUNK)
            .zip(input.par_chunks(CHUNK))
            .for_each(|(o, i)| pass(kind, i, None, o)),
        Some(grad) => out
            .par_chunks_mut(CHUNK)
            .zip(input.par_chunks(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|((o, i), g)| pass(kind, i, Some(g), o)),
    }
    out
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
        let out = parallel_pass(*self, &data[start..end], None);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = super::with_values(x, |x| {
            super::with_values(grad, |g| Ok(parallel_pass(*self, x, Some(g))))
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
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

    type Pass = fn(Kind, &[f32], Option<&[f32]>, &mut [f32]);

    /// Every build of the kernel this CPU can run: the portable one, AVX2, AVX-512.
    fn builds() -> Vec<(&'static str, Pass)> {
        let mut builds: Vec<(&str, Pass)> = vec![("portable", |k, i, g, o| pass_body(k, i, g, o))];
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::exp::{simd_level, SimdLevel};
            if simd_level() != SimdLevel::Baseline {
                builds.push(("avx2", |k, i, g, o| unsafe { pass_avx2(k, i, g, o) }));
            }
            if simd_level() == SimdLevel::Avx512 {
                builds.push(("avx512", |k, i, g, o| unsafe { pass_avx512(k, i, g, o) }));
            }
        }
        builds
    }

    /// The derivatives equal central differences of the f64 definitions.
    #[test]
    fn derivatives_match_their_definitions() {
        // |x| < 4, inside the range where `erf_f64` is its Taylor series.
        let xs: Vec<f32> = (-3_000..3_000).map(|i| i as f32 * 1.3e-3).collect();
        let ones = vec![1.0f32; xs.len()];
        for ((build, pass), kind) in builds()
            .iter()
            .flat_map(|b| [Kind::GeluErf, Kind::GeluTanh, Kind::Silu].map(|k| (b, k)))
        {
            let mut out = vec![0.0; xs.len()];
            pass(kind, &xs, Some(&ones), &mut out);
            let h = 1e-4;
            let worst = xs
                .iter()
                .zip(&out)
                .map(|(&x, &d)| {
                    let x = x as f64;
                    let fd = (reference(kind, x + h) - reference(kind, x - h)) / (2.0 * h);
                    (d as f64 - fd).abs()
                })
                .fold(0.0, f64::max);
            assert!(
                worst < 2e-5,
                "{build} {kind:?}: worst derivative error {worst:.2e}"
            );
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-12_000..12_000).map(|i| i as f32 * 7.3e-4).collect();
        for ((build, pass), kind) in builds()
            .iter()
            .flat_map(|b| [Kind::GeluErf, Kind::GeluTanh, Kind::Silu].map(|k| (b, k)))
        {
            let mut out = vec![0.0; xs.len()];
            pass(kind, &xs, None, &mut out);
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
