//! Dense symmetric positive-definite solves in `f64`, for the normal
//! equations of [`crate::compress::reconstruct`]: a Cholesky factor and
//! forward/back substitution over many right-hand sides at once.
//!
//! Matrices are row-major `Vec<f64>`s; the systems are at most a few
//! thousand unknowns (one MLP's kept neurons), where the `n³/6` of a plain
//! factorisation takes seconds.

/// The matrix was not positive definite: pivot `row` was not positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotPositiveDefinite {
    pub row: usize,
    pub pivot: f64,
}

/// Solves `A X = B` for `X` in place of `b`, where `a` is an `n × n`
/// symmetric positive-definite matrix (only its lower triangle is read; it
/// is overwritten by the Cholesky factor) and `b` holds `m` right-hand
/// sides as an `n × m` row-major matrix.
pub fn solve_positive_definite(
    a: &mut [f64],
    n: usize,
    b: &mut [f64],
    m: usize,
) -> Result<(), NotPositiveDefinite> {
    assert_eq!(a.len(), n * n, "A must be n × n");
    assert_eq!(b.len(), n * m, "B must be n × m");
    // A = L Lᵀ, L in the lower triangle of `a`, row by row.
    for i in 0..n {
        for j in 0..=i {
            let (row_i, row_j) = (&a[i * n..i * n + j], &a[j * n..j * n + j]);
            let dot: f64 = row_i.iter().zip(row_j).map(|(x, y)| x * y).sum();
            let value = a[i * n + j] - dot;
            if i == j {
                if value.is_nan() || value <= 0.0 {
                    return Err(NotPositiveDefinite {
                        row: i,
                        pivot: value,
                    });
                }
                a[i * n + i] = value.sqrt();
            } else {
                a[i * n + j] = value / a[j * n + j];
            }
        }
    }
    // L Y = B.
    for i in 0..n {
        let (done, rest) = b.split_at_mut(i * m);
        let row = &mut rest[..m];
        for j in 0..i {
            let l = a[i * n + j];
            if l != 0.0 {
                axpy(row, -l, &done[j * m..(j + 1) * m]);
            }
        }
        let d = a[i * n + i];
        row.iter_mut().for_each(|v| *v /= d);
    }
    // Lᵀ X = Y.
    for i in (0..n).rev() {
        let (head, tail) = b.split_at_mut((i + 1) * m);
        let row = &mut head[i * m..];
        for j in i + 1..n {
            let l = a[j * n + i];
            if l != 0.0 {
                axpy(row, -l, &tail[(j - i - 1) * m..(j - i) * m]);
            }
        }
        let d = a[i * n + i];
        row.iter_mut().for_each(|v| *v /= d);
    }
    Ok(())
}

/// `y += alpha · x`.
pub fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * m];
        for i in 0..n {
            for p in 0..k {
                axpy(
                    &mut c[i * m..(i + 1) * m],
                    a[i * k + p],
                    &b[p * m..(p + 1) * m],
                );
            }
        }
        c
    }

    /// `A = Gᵀ G + I` for a pseudo-random `G` is positive definite; the
    /// solution reproduces every right-hand side.
    #[test]
    fn solves_a_positive_definite_system_for_every_right_hand_side() {
        let (n, m) = (37, 5);
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let g: Vec<f64> = (0..n * n).map(|_| next()).collect();
        let mut gt = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                gt[j * n + i] = g[i * n + j];
            }
        }
        let mut a = matmul(&gt, &g, n, n, n);
        for i in 0..n {
            a[i * n + i] += 1.0;
        }
        let b: Vec<f64> = (0..n * m).map(|_| next()).collect();
        let (mut factor, mut x) = (a.clone(), b.clone());
        solve_positive_definite(&mut factor, n, &mut x, m).unwrap();
        let back = matmul(&a, &x, n, n, m);
        let worst = back
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-10, "residual {worst}");
    }

    #[test]
    fn a_singular_matrix_is_refused_with_its_pivot() {
        // Rank one: the second pivot is zero.
        let mut a = vec![1.0, 2.0, 2.0, 4.0];
        let mut b = vec![1.0, 1.0];
        let err = solve_positive_definite(&mut a, 2, &mut b, 1).unwrap_err();
        assert_eq!(err.row, 1);
        assert!(err.pivot <= 0.0);
    }
}
