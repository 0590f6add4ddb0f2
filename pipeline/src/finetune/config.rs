//! A fine-tuning run's settings (`configs/finetune-*.yaml`), checked before
//! any work.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::finetune::lora::LoraSettings;
use crate::finetune::optimizer::Decay;

/// Distillation from a teacher model's scores over each query's candidates
/// (its positive and hard negatives).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillationSettings {
    /// The teacher model directory (the unpruned model).
    pub teacher: PathBuf,
    /// Weight of the KL term beside InfoNCE.
    #[serde(default = "one")]
    pub weight: f64,
    /// Temperature of both score distributions.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
}

/// What a run minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// InfoNCE over labeled query–document pairs (and, with `distillation`,
    /// KL to the teacher's scores over each query's candidates).
    #[default]
    Contrastive,
    /// Label-free: the student's embeddings of unlabeled text
    /// (`--train-texts`, `--train-queries`) match the teacher's
    /// (`embedding_distillation`).
    Distill,
    /// Both: the contrastive loss, plus the embedding-distillation terms on
    /// every text of the contrastive batch, so in-domain gains stay anchored
    /// to the teacher.
    Combined,
}

/// How far the student's sentence embeddings are from the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingLoss {
    /// `1 − cos(student, teacher)`, mean over texts.
    #[default]
    Cosine,
    /// Squared distance between the unit-length embeddings, mean over texts.
    Mse,
}

/// Label-free distillation: the teacher's sentence embeddings of the same
/// texts, and the similarities between the texts of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingDistillationSettings {
    /// The teacher model directory (the unpruned model); it must share the
    /// student's tokenizer and embedding size.
    pub teacher: PathBuf,
    #[serde(default)]
    pub loss: EmbeddingLoss,
    /// Weight of the embedding term.
    #[serde(default = "one")]
    pub weight: f64,
    /// Weight of the KL between the teacher's and the student's in-batch
    /// similarity distributions (each text against every other).
    #[serde(default = "one")]
    pub similarity_weight: f64,
    /// Temperature of both similarity distributions.
    #[serde(default = "default_temperature")]
    pub similarity_temperature: f64,
    /// Weight of the contrastive loss beside these terms (`combined` only).
    #[serde(default = "one")]
    pub contrastive_weight: f64,
    /// Weight of the token term: the mean over every text's tokens of
    /// `1 − cos` between the student's and the teacher's last hidden states,
    /// so the student learns the teacher's function token by token, not
    /// only its pooled embedding. It needs a teacher with the student's
    /// tokenizer and hidden size, `objective: distill` and no gradient
    /// checkpointing. 0 (the default) leaves it out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_weight: f64,
    /// Unlabeled texts (`--train-texts`, `--train-queries`) added to each
    /// micro-batch of a `combined` run: the embedding and similarity terms
    /// are computed on them too (the similarities among themselves), so the
    /// labeled stage keeps the teacher's embeddings of text beyond its own
    /// batches (replay of the label-free recipe's text). 0 (the default):
    /// the terms see the labeled batch's texts only.
    #[serde(default, skip_serializing_if = "is_zero_count")]
    pub text_batch_size: usize,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_count(n: &usize) -> bool {
    *n == 0
}

/// Evaluation on a development split every `every` steps; the best
/// checkpoint becomes the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSettings {
    pub data: PathBuf,
    pub split: String,
    #[serde(default)]
    pub doc_sample: Option<usize>,
    pub every: usize,
    /// Metric to maximise.
    #[serde(default = "default_metric")]
    pub metric: String,
}

/// Finite and above zero (false for NaN).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn one() -> f64 {
    1.0
}
fn default_temperature() -> f64 {
    0.05
}
fn default_metric() -> String {
    "ndcg@10".into()
}

/// Which weights full fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainedWeights {
    /// Every float weight (less the token embeddings when frozen).
    #[default]
    All,
    /// Only the MLP sub-layers' weights (projections, biases, the residual
    /// block's norms): what pruning narrowed. Attention and embeddings keep
    /// the source model's values.
    Mlp,
}

impl TrainedWeights {
    fn is_all(&self) -> bool {
        *self == Self::All
    }
}

/// `configs/finetune*.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub objective: Objective,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    /// Queries per micro-batch (each with one positive and `hard_negatives`).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub decay: Decay,
    pub weight_decay: f64,
    /// Global gradient-norm bound (0: no clipping).
    pub max_grad_norm: f64,
    pub temperature: f64,
    /// Hard negatives per query in each batch.
    pub hard_negatives: usize,
    /// Negatives are drawn from the first this-many listed for each query.
    pub negative_pool: usize,
    /// Maximum tokens per text [default: the model's].
    pub max_length: Option<usize>,
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Token embeddings stay frozen (full fine-tuning).
    pub freeze_embeddings: bool,
    /// Which weights full fine-tuning updates (`all` or `mlp`); LoRA
    /// chooses its own (`lora.targets`).
    #[serde(skip_serializing_if = "TrainedWeights::is_all")]
    pub trained: TrainedWeights,
    /// Keep only each layer's input during the forward pass and recompute
    /// the layer in the backward pass: one more forward pass of compute for
    /// activation memory of one layer instead of all
    /// ([`crate::finetune::gradient_checkpointing`]). Results are unchanged,
    /// so a run may resume with it switched on or off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    pub lora: Option<LoraSettings>,
    pub distillation: Option<DistillationSettings>,
    pub embedding_distillation: Option<EmbeddingDistillationSettings>,
    pub dev: Option<DevSettings>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Contrastive,
            epochs: 1,
            max_steps: None,
            batch_size: 16,
            gradient_accumulation: 1,
            learning_rate: 2e-5,
            warmup_steps: 0,
            decay: Decay::Linear,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            temperature: 0.05,
            hard_negatives: 1,
            negative_pool: 8,
            max_length: None,
            seed: 0,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            freeze_embeddings: true,
            trained: TrainedWeights::All,
            gradient_checkpointing: false,
            lora: None,
            distillation: None,
            embedding_distillation: None,
            dev: None,
        }
    }
}

impl FinetuneConfig {
    /// Rejects settings that cannot train, before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("finetune config: {m}")));
        if !positive(self.learning_rate) {
            return bad(format!(
                "learning_rate must be > 0, got {}",
                self.learning_rate
            ));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.gradient_accumulation == 0 {
            return bad("gradient_accumulation must be at least 1".into());
        }
        if self.batch_size == 1 && self.hard_negatives == 0 && self.objective != Objective::Distill
        {
            return bad("batch_size 1 without hard negatives leaves no negative".into());
        }
        if !positive(self.temperature) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs must be at least 1 (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1".into());
        }
        if self.max_grad_norm < 0.0 || self.weight_decay < 0.0 {
            return bad("max_grad_norm and weight_decay must be >= 0".into());
        }
        if self.trained == TrainedWeights::Mlp && !self.freeze_embeddings {
            return bad(
                "trained: mlp keeps the embeddings as they are; freeze_embeddings: false contradicts it"
                    .into(),
            );
        }
        if self.lora.is_some() && self.trained != TrainedWeights::All {
            return bad(
                "trained: mlp is for full fine-tuning; with LoRA, lora.targets chooses the adapted projections"
                    .into(),
            );
        }
        if self.hard_negatives > self.negative_pool {
            return bad(format!(
                "hard_negatives ({}) exceeds negative_pool ({})",
                self.hard_negatives, self.negative_pool
            ));
        }
        if let Some(d) = &self.distillation {
            if !(positive(d.weight) || d.weight == 0.0) || !positive(d.temperature) {
                return bad("distillation weight must be >= 0 and temperature > 0".into());
            }
        }
        match (self.objective, &self.embedding_distillation) {
            (Objective::Distill | Objective::Combined, None) => {
                return bad(format!(
                    "objective {:?} needs an embedding_distillation section naming the teacher",
                    self.objective
                ));
            }
            (Objective::Contrastive, Some(_)) => {
                return bad(
                    "embedding_distillation is set but objective is contrastive; \
                     set objective: distill or combined"
                        .into(),
                );
            }
            (_, Some(e)) => {
                let weights = [
                    e.weight,
                    e.similarity_weight,
                    e.contrastive_weight,
                    e.token_weight,
                ];
                if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
                    || e.weight + e.similarity_weight + e.token_weight <= 0.0
                    || !positive(e.similarity_temperature)
                {
                    return bad(
                        "embedding_distillation weights must be >= 0 (weight, \
                         similarity_weight or token_weight above 0) and similarity_temperature > 0"
                            .into(),
                    );
                }
                if e.token_weight > 0.0 && self.objective != Objective::Distill {
                    return bad(format!(
                        "embedding_distillation token_weight trains on unlabeled text: it needs \
                         objective distill, not {:?}",
                        self.objective
                    ));
                }
                if e.text_batch_size > 0 && self.objective != Objective::Combined {
                    return bad(format!(
                        "embedding_distillation text_batch_size adds unlabeled texts to the \
                         labeled batches of objective combined; objective {:?} has none (distill \
                         trains on unlabeled texts alone, batch_size of them a batch)",
                        self.objective
                    ));
                }
                if e.token_weight > 0.0 && self.gradient_checkpointing {
                    return bad(
                        "embedding_distillation token_weight needs every token's last hidden \
                         state, which gradient_checkpointing does not keep; switch one off"
                            .into(),
                    );
                }
                if e.weight == 0.0 && e.token_weight == 0.0 && e.text_batch_size == 1 {
                    return bad(
                        "with embedding_distillation weight 0 only in-batch similarities \
                         are learned: text_batch_size must be 0 or at least 2 (one unlabeled \
                         text a batch has no similarities)"
                            .into(),
                    );
                }
                if e.weight == 0.0 && e.token_weight == 0.0 && self.batch_size < 2 {
                    return bad(
                        "with embedding_distillation weight 0 only in-batch similarities \
                         are learned: batch_size must be at least 2"
                            .into(),
                    );
                }
            }
            (Objective::Contrastive, None) => {}
        }
        if self.objective == Objective::Distill && self.distillation.is_some() {
            return bad(
                "distillation (teacher scores over labeled candidates) needs labeled data; \
                 objective distill has none"
                    .into(),
            );
        }
        if let (Some(d), Some(e)) = (&self.distillation, &self.embedding_distillation) {
            if d.teacher != e.teacher {
                return bad(format!(
                    "distillation and embedding_distillation name different teachers ({} and {})",
                    d.teacher.display(),
                    e.teacher.display()
                ));
            }
        }
        if let Some(dev) = &self.dev {
            if dev.every == 0 {
                return bad("dev.every must be at least 1".into());
            }
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 || !positive(l.alpha) || l.targets.is_empty() {
                return bad("lora needs rank >= 1, alpha > 0 and at least one target".into());
            }
        }
        Ok(())
    }

    /// Optimizer steps for `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        self.max_steps.unwrap_or_else(|| {
            let per_step = self.batch_size * self.gradient_accumulation;
            (self.epochs * examples).div_ceil(per_step).max(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teacher(dir: &str) -> EmbeddingDistillationSettings {
        EmbeddingDistillationSettings {
            teacher: dir.into(),
            loss: EmbeddingLoss::Cosine,
            weight: 1.0,
            similarity_weight: 1.0,
            similarity_temperature: 0.05,
            contrastive_weight: 1.0,
            token_weight: 0.0,
            text_batch_size: 0,
        }
    }

    fn config(objective: Objective, e: Option<EmbeddingDistillationSettings>) -> FinetuneConfig {
        FinetuneConfig {
            objective,
            embedding_distillation: e,
            ..Default::default()
        }
    }

    /// The objective and its sections must agree, before anything loads.
    #[test]
    fn objectives_and_their_sections_are_checked() {
        config(Objective::Distill, Some(teacher("t")))
            .validate()
            .unwrap();
        config(Objective::Combined, Some(teacher("t")))
            .validate()
            .unwrap();
        // Unlabeled texts beside a combined run's labeled batches.
        config(
            Objective::Combined,
            Some(EmbeddingDistillationSettings {
                text_batch_size: 8,
                ..teacher("t")
            }),
        )
        .validate()
        .unwrap();
        // The token term alone is an objective too.
        config(
            Objective::Distill,
            Some(EmbeddingDistillationSettings {
                weight: 0.0,
                similarity_weight: 0.0,
                token_weight: 1.0,
                ..teacher("t")
            }),
        )
        .validate()
        .unwrap();
        let scores = |dir: &str| DistillationSettings {
            teacher: dir.into(),
            weight: 1.0,
            temperature: 0.05,
        };
        let cases = [
            (
                config(Objective::Distill, None),
                "needs an embedding_distillation section",
            ),
            (
                config(Objective::Combined, None),
                "needs an embedding_distillation section",
            ),
            (
                config(Objective::Contrastive, Some(teacher("t"))),
                "objective is contrastive",
            ),
            (
                config(
                    Objective::Distill,
                    Some(EmbeddingDistillationSettings {
                        weight: 0.0,
                        similarity_weight: 0.0,
                        ..teacher("t")
                    }),
                ),
                "weight, similarity_weight or token_weight above 0",
            ),
            (
                config(
                    Objective::Distill,
                    Some(EmbeddingDistillationSettings {
                        similarity_temperature: 0.0,
                        ..teacher("t")
                    }),
                ),
                "similarity_temperature > 0",
            ),
            (
                config(
                    Objective::Combined,
                    Some(EmbeddingDistillationSettings {
                        contrastive_weight: -1.0,
                        ..teacher("t")
                    }),
                ),
                "weights must be >= 0",
            ),
            (
                config(
                    Objective::Combined,
                    Some(EmbeddingDistillationSettings {
                        token_weight: 1.0,
                        ..teacher("t")
                    }),
                ),
                "token_weight trains on unlabeled text",
            ),
            (
                config(
                    Objective::Distill,
                    Some(EmbeddingDistillationSettings {
                        text_batch_size: 8,
                        ..teacher("t")
                    }),
                ),
                "text_batch_size adds unlabeled texts to the labeled batches of objective combined",
            ),
            (
                config(
                    Objective::Combined,
                    Some(EmbeddingDistillationSettings {
                        weight: 0.0,
                        text_batch_size: 1,
                        ..teacher("t")
                    }),
                ),
                "text_batch_size must be 0 or at least 2",
            ),
            (
                FinetuneConfig {
                    gradient_checkpointing: true,
                    ..config(
                        Objective::Distill,
                        Some(EmbeddingDistillationSettings {
                            token_weight: 1.0,
                            ..teacher("t")
                        }),
                    )
                },
                "which gradient_checkpointing does not keep",
            ),
            (
                config(
                    Objective::Distill,
                    Some(EmbeddingDistillationSettings {
                        token_weight: f64::NAN,
                        ..teacher("t")
                    }),
                ),
                "weights must be >= 0",
            ),
            (
                FinetuneConfig {
                    batch_size: 1,
                    ..config(
                        Objective::Distill,
                        Some(EmbeddingDistillationSettings {
                            weight: 0.0,
                            ..teacher("t")
                        }),
                    )
                },
                "batch_size must be at least 2",
            ),
            (
                FinetuneConfig {
                    distillation: Some(scores("t")),
                    ..config(Objective::Distill, Some(teacher("t")))
                },
                "needs labeled data",
            ),
            (
                FinetuneConfig {
                    distillation: Some(scores("other")),
                    ..config(Objective::Combined, Some(teacher("t")))
                },
                "name different teachers",
            ),
        ];
        for (bad, needle) in cases {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        // A one-text batch has no in-batch negatives; distillation needs none.
        FinetuneConfig {
            batch_size: 1,
            hard_negatives: 0,
            ..config(Objective::Distill, Some(teacher("t")))
        }
        .validate()
        .unwrap();
    }
}
