//! Row softmax with an additive mask, in place, with the vectorisable
//! [`exp`], compiled for AVX-512 or AVX2/FMA where the CPU has them (detected at run
//! time).

use super::exp::exp;

const LANES: usize = 16;

/// Adds `bias` (when given) to `row`, then replaces it by its softmax.
#[inline(always)]
fn softmax_row_body(row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        add_in_place(row, bias);
    }
    let max = row_max(row);
    // The exponentials and their sum in one pass, sixteen running sums.
    let mut sum = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sum.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    for (s, x) in sum.iter_mut().zip(chunks.into_remainder()) {
        *x = exp(*x - max);
        *s += *x;
    }
    let inv = 1.0 / sum.iter().sum::<f32>();
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[inline(always)]
fn add_in_place(row: &mut [f32], bias: &[f32]) {
    for (x, b) in row.iter_mut().zip(bias) {
        *x += b;
    }
}

/// The row's largest value, over sixteen running maxima (one AVX-512
/// register). `if x > m` rather than `f32::max`, whose NaN rule costs a
/// compare and a blend per element; a NaN score still makes the whole row
/// NaN, through the sum of the exponentials.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, x) in max.iter_mut().zip(chunk) {
            *m = larger(*m, *x);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&max)
        .fold(f32::NEG_INFINITY, |m, x| larger(m, *x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], bias: Option<&[f32]>) {
    softmax_row_body(row, bias)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32], bias: Option<&[f32]>) {
    softmax_row_body(row, bias)
}

/// Adds `bias` (when given, the same length) to `row` and turns it into its
/// softmax. A fully masked row (every value at `f32::MIN`) becomes uniform,
/// as the composed `softmax(x + bias)` makes it.
pub fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    match super::exp::simd_level() {
        // SAFETY: the CPU has the features, as `simd_level` detected.
        super::exp::SimdLevel::Avx512 => return unsafe { softmax_row_avx512(row, bias) },
        super::exp::SimdLevel::Avx2 => return unsafe { softmax_row_avx2(row, bias) },
        super::exp::SimdLevel::Baseline => {}
    }
    softmax_row_body(row, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Softmax = fn(&mut [f32], Option<&[f32]>);

    /// Every build of the kernel this CPU can run: the portable one, AVX2, AVX-512.
    fn builds() -> Vec<(&'static str, Softmax)> {
        let mut builds: Vec<(&'static str, Softmax)> =
            vec![("portable", |r, b| softmax_row_body(r, b))];
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::exp::{simd_level, SimdLevel};
            if simd_level() != SimdLevel::Baseline {
                builds.push(("avx2", |r, b| unsafe { softmax_row_avx2(r, b) }));
            }
            if simd_level() == SimdLevel::Avx512 {
                builds.push(("avx512", |r, b| unsafe { softmax_row_avx512(r, b) }));
            }
        }
        builds
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
            for (mask, (build, softmax)) in [None, Some(bias.as_slice())]
                .into_iter()
                .flat_map(|m| builds().into_iter().map(move |b| (m, b)))
            {
                let mut ours = values.clone();
                softmax(&mut ours, mask);
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
                        "{build}: len {len}, mask {}, index {i}: {o} vs {want}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn a_nan_score_makes_the_whole_row_nan() {
        for (build, softmax) in builds() {
            for at in [0usize, 7, 20] {
                let mut row: Vec<f32> = (0..21).map(|i| i as f32 * 0.1).collect();
                row[at] = f32::NAN;
                softmax(&mut row, None);
                assert!(
                    row.iter().all(|x| x.is_nan()),
                    "{build}, NaN at {at}: {row:?}"
                );
            }
        }
    }

    #[test]
    fn a_fully_masked_row_becomes_uniform() {
        for (build, softmax) in builds() {
            let mut row = vec![f32::MIN; 6];
            softmax(&mut row, None);
            for x in row {
                assert!((x - 1.0 / 6.0).abs() < 1e-7, "{build}: {x}");
            }
        }
    }
}
