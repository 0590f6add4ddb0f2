//! Row softmax with an additive mask, in place, with a vectorisable `exp`.
//!
//! glibc's scalar `expf` was a tenth of MiniLM's inference time (the
//! `(B, H, T, T)` attention scores); this `exp` is Cephes' `expf` (range
//! reduction by `ln 2`, a degree-6 polynomial, the exponent set by bits),
//! written so the compiler vectorises it, and compiled for AVX2/FMA where the
//! CPU has them (detected at run time).

/// `exp(x)`, within 2 ulp of `f32::exp` on `[-87.3, 88.3]`; 0 below.
/// Branch-free and without float-to-int casts, so it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, so `n ln 2` is subtracted exactly.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Adding 2^23 puts a small integer in the mantissa's low bits.
    const TO_BITS: f32 = 8_388_608.0;
    let clamped = x.clamp(-87.3, 88.3);
    let n = (clamped * LOG2E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: the biased exponent n + 127 (1..=254 here) moved into place.
    let scale = f32::from_bits((n + 127.0 + TO_BITS).to_bits() << 23);
    let keep = if x < -87.3 { 0.0 } else { 1.0 };
    y * scale * keep
}

const LANES: usize = 8;

/// Adds `bias` (when given) to `row`, then replaces it by its softmax.
#[inline(always)]
fn softmax_row_body(row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
    // Eight running maxima and sums, so the reductions vectorise.
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, x) in max.iter_mut().zip(chunk) {
            *m = m.max(*x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&max)
        .fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let mut sum = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, x) in sum.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    let total: f32 = chunks.remainder().iter().chain(&sum).sum();
    let inv = 1.0 / total;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], bias: Option<&[f32]>) {
    softmax_row_body(row, bias)
}

/// Adds `bias` (when given, the same length) to `row` and turns it into its
/// softmax. A fully masked row (every value at `f32::MIN`) becomes uniform,
/// as the composed `softmax(x + bias)` makes it.
pub fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { softmax_row_avx2(row, bias) };
    }
    softmax_row_body(row, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut worst = 0.0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 0.000_37;
            let (ours, std) = (exp(x) as f64, x.exp() as f64);
            let ulp = (x.exp().next_up() - x.exp()) as f64;
            worst = worst.max((ours - std).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_matches_the_composed_form_with_and_without_masks() {
        for len in [1usize, 5, 8, 13, 64, 257] {
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 11) as f32 * 0.9 - 4.0)
                .collect();
            let bias: Vec<f32> = (0..len)
                .map(|i| if i % 3 == 1 { f32::MIN } else { 0.0 })
                .collect();
            for mask in [None, Some(bias.as_slice())] {
                let mut ours = values.clone();
                softmax_row(&mut ours, mask);
                let shifted: Vec<f64> = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| *v as f64 + mask.map_or(0.0, |b| b[i] as f64))
                    .collect();
                let max = shifted.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = shifted.iter().map(|v| (v - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (i, (o, e)) in ours.iter().zip(&exps).enumerate() {
                    let want = e / total;
                    assert!(
                        (*o as f64 - want).abs() <= 1e-6,
                        "len {len}, mask {}, index {i}: {o} vs {want}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn a_fully_masked_row_becomes_uniform() {
        let mut row = vec![f32::MIN; 6];
        softmax_row(&mut row, None);
        for x in row {
            assert!((x - 1.0 / 6.0).abs() < 1e-7, "{x}");
        }
    }
}
