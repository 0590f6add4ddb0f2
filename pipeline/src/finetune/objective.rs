//! Retrieval training objectives: InfoNCE over in-batch and hard negatives,
//! and KL distillation from a teacher's scores over each query's own
//! candidates.

use candle_core::{Result, Tensor, D};

/// Rows scaled to unit length (cosine similarity by dot product).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(
        &x.sqr()?
            .sum_keepdim(1)?
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
}
