//! Retrieval training objectives: InfoNCE over in-batch and hard negatives,
//! KL distillation from a teacher's scores over each query's own
//! candidates, and the label-free terms: the distance between the student's
//! and the teacher's embeddings of a text, the KL between their in-batch
//! similarity distributions, and the distance between their last hidden
//! states token by token.

use candle_core::{Result, Tensor, D};

use super::config::EmbeddingLoss;

/// Vectors along the last axis scaled to unit length (cosine similarity by
/// dot product): the rows of `(N, D)` embeddings, the tokens of `(B, T, H)`
/// hidden states.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(
        &x.sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?,
    )
}

/// InfoNCE: `queries` `(B, D)`; `documents` `(B + N, D)` whose first `B`
/// rows are the queries' positives in order, the rest hard negatives shared
/// by the batch. Mean over queries of `-log softmax(cos / temperature)` at
/// the positive.
pub fn info_nce(queries: &Tensor, documents: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (normalize(queries)?.matmul(&normalize(documents)?.t()?)? / temperature)?;
    let b = logits.dim(0)?;
    let labels = Tensor::arange(0u32, b as u32, logits.device())?;
    candle_nn::loss::cross_entropy(&logits, &labels)
}

/// Cosine scores of each query against its own candidates: `queries`
/// `(B, D)`, `candidates` `(B * C, D)` grouped by query -> `(B, C)`.
pub fn candidate_scores(queries: &Tensor, candidates: &Tensor, per_query: usize) -> Result<Tensor> {
    let (b, d) = queries.dims2()?;
    let q = normalize(queries)?.reshape((b, 1, d))?;
    let c = normalize(candidates)?.reshape((b, per_query, d))?;
    q.broadcast_mul(&c)?.sum(D::Minus1)
}

/// KL(teacher || student) of the softmax distributions of `(B, C)` scores
/// at `temperature`, mean over queries.
pub fn distillation_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_p_student = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let log_p_teacher = candle_nn::ops::log_softmax(&(teacher / temperature)?, D::Minus1)?;
    let p_teacher = log_p_teacher.exp()?;
    let kl = (p_teacher * (log_p_teacher - log_p_student)?)?.sum(D::Minus1)?;
    kl.mean_all()
}

/// How far the student's embeddings `(N, D)` are from the teacher's, row by
/// row, mean over rows: `1 − cos` or the squared distance of the unit rows.
pub fn embedding_distance(
    student: &Tensor,
    teacher: &Tensor,
    loss: EmbeddingLoss,
) -> Result<Tensor> {
    let (s, t) = (normalize(student)?, normalize(teacher)?);
    match loss {
        EmbeddingLoss::Cosine => (1.0 - (s * t)?.sum(D::Minus1)?.mean_all()?)?.affine(1.0, 0.0),
        EmbeddingLoss::Mse => (s - t)?.sqr()?.sum(D::Minus1)?.mean_all(),
    }
}

/// How far the student's hidden states `(B, T, H)` are from the teacher's,
/// token by token: the mean of `1 − cos` over the tokens `mask` `(B, T)`
/// marks (1 for a token, 0 for padding, which is left out).
pub fn token_distance(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let cos = (normalize(student)? * normalize(teacher)?)?.sum(D::Minus1)?;
    let mask = mask.to_dtype(cos.dtype())?;
    let tokens = mask.sum_all()?.clamp(1.0, f64::INFINITY)?;
    ((1.0 - cos)? * mask)?.sum_all()?.div(&tokens)
}

/// KL(teacher ‖ student) of each text's similarities to the other texts of
/// the batch (cosine, at `temperature`; a text's similarity to itself is
/// left out), mean over texts. `student`, `teacher`: `(N, D)`, N ≥ 2.
pub fn similarity_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = student.dim(0)?;
    if n < 2 {
        candle_core::bail!("in-batch similarity needs at least 2 texts, got {n}");
    }
    // -1e4 on the diagonal: after the temperature its probability is 0 for
    // both, so it adds nothing to the KL.
    let self_mask = (Tensor::eye(n, student.dtype(), student.device())? * -1e4)?;
    let similarities = |x: &Tensor| -> Result<Tensor> {
        let x = normalize(x)?;
        x.matmul(&x.t()?)? + &self_mask
    };
    distillation_kl(
        &similarities(student)?,
        &similarities(teacher)?,
        temperature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn info_nce_is_small_when_each_query_matches_its_positive() {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let good = info_nce(&q, &q, 0.05).unwrap().to_scalar::<f32>().unwrap();
        let swapped = Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &dev).unwrap();
        let bad = info_nce(&q, &swapped, 0.05)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(good < 1e-6 && bad > 10.0, "{good} {bad}");
    }

    #[test]
    fn kl_is_zero_for_equal_scores_and_positive_otherwise() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[0.9f32, 0.1, 0.3]], &dev).unwrap();
        let b = Tensor::new(&[[0.1f32, 0.9, 0.3]], &dev).unwrap();
        let same = distillation_kl(&a, &a, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = distillation_kl(&a, &b, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(same.abs() < 1e-6 && diff > 0.1, "{same} {diff}");
    }

    #[test]
    fn the_token_distance_is_zero_for_the_teacher_itself_and_ignores_padding() {
        let dev = Device::Cpu;
        // Two texts of three positions; the second has one padding position.
        let teacher = Tensor::new(
            &[
                [[1.0f32, 0.0], [0.0, 2.0], [3.0, 3.0]],
                [[1.0, 1.0], [2.0, 0.0], [5.0, -1.0]],
            ],
            &dev,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev).unwrap();
        let d = |s: &Tensor| {
            token_distance(s, &teacher, &mask)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(d(&teacher).abs() < 1e-6);
        // Scale does not count, direction does.
        assert!(d(&(&teacher * 3.0).unwrap()).abs() < 1e-6);
        // Anything at the padding position is ignored.
        let padded = Tensor::new(
            &[
                [[1.0f32, 0.0], [0.0, 2.0], [3.0, 3.0]],
                [[1.0, 1.0], [2.0, 0.0], [-7.0, 40.0]],
            ],
            &dev,
        )
        .unwrap();
        assert!(d(&padded).abs() < 1e-6);
        // One of the five tokens turned by 90°: 1 − cos = 1, mean 1/5.
        let turned = Tensor::new(
            &[
                [[0.0f32, 1.0], [0.0, 2.0], [3.0, 3.0]],
                [[1.0, 1.0], [2.0, 0.0], [5.0, -1.0]],
            ],
            &dev,
        )
        .unwrap();
        assert!((d(&turned) - 0.2).abs() < 1e-6, "{}", d(&turned));
    }

    #[test]
    fn embedding_terms_are_zero_for_the_teacher_itself_and_grow_with_distance() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.5, 0.5]], &dev).unwrap();
        let near =
            Tensor::new(&[[1f32, 0.1, 0.0], [0.0, 2.0, 0.1], [0.0, 0.5, 0.6]], &dev).unwrap();
        let far = Tensor::new(&[[0f32, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]], &dev).unwrap();
        let value = |x: Tensor| x.to_scalar::<f32>().unwrap();
        for loss in [EmbeddingLoss::Cosine, EmbeddingLoss::Mse] {
            let same = value(embedding_distance(&t, &t, loss).unwrap());
            let a = value(embedding_distance(&near, &t, loss).unwrap());
            let b = value(embedding_distance(&far, &t, loss).unwrap());
            assert!(same.abs() < 1e-6, "{loss:?}: {same}");
            assert!(0.0 < a && a < b, "{loss:?}: near {a}, far {b}");
            // Scale does not matter: both losses compare directions.
            let scaled = value(embedding_distance(&(&t * 3.0).unwrap(), &t, loss).unwrap());
            assert!(scaled.abs() < 1e-6, "{loss:?}: {scaled}");
        }
        // The similarity term sees only how the texts relate to each other:
        // `far` is `t` rotated (the same similarities), `mixed` is not.
        let same = value(similarity_kl(&t, &t, 0.05).unwrap());
        let rotated = value(similarity_kl(&far, &t, 0.05).unwrap());
        assert!(
            same.abs() < 1e-6 && rotated.abs() < 1e-6,
            "{same} {rotated}"
        );
        let mixed =
            Tensor::new(&[[1f32, 0.0, 0.0], [1.0, 0.3, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        let a = value(similarity_kl(&near, &t, 0.05).unwrap());
        let b = value(similarity_kl(&mixed, &t, 0.05).unwrap());
        assert!(same.abs() < 1e-6 && 0.0 < a && a < b, "{same} {a} {b}");
        assert!(similarity_kl(
            &t.narrow(0, 0, 1).unwrap(),
            &t.narrow(0, 0, 1).unwrap(),
            0.05
        )
        .is_err());
    }
}
