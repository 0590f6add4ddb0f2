//! What the kernels' tests share: seeded inputs, gradients through candle's
//! autograd, and a closeness check.

use candle_core::{Device, Result, Tensor, Var};

/// Values in `[-1, 1)` from a seeded linear congruential generator.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The largest magnitude in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest absolute difference between `a` and `b`.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Fails unless `got` and `want` have one shape and differ by at most
/// `tolerance` times the largest magnitude in `want` (at least 1).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let scale = max_abs(want).max(1.0);
    let diff = max_diff(got, want);
    assert!(
        diff <= tolerance * scale,
        "{what}: max |diff| {diff:e} above {tolerance:e} × {scale}"
    );
}

/// The gradients of `Σ f(inputs) ⊙ upstream` with respect to each input.
pub fn gradients(
    inputs: &[&Tensor],
    upstream: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors).unwrap();
    let loss = (out * upstream).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    tensors
        .iter()
        .map(|t| grads.get(t).expect("a gradient for every input").clone())
        .collect()
}
