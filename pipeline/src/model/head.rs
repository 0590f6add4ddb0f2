//! The embedding head: pooling, then the sentence-transformers `Dense` and
//! `Normalize` modules in `modules.json` order.

use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::io::weights;
use crate::model::arch::layers::Linear;
use crate::model::pooling::Pooling;
use crate::model::sentence_transformers::{DenseActivation, PostPooling, SentenceConfig};

enum Step {
    Dense {
        linear: Linear,
        activation: DenseActivation,
    },
    Normalize,
}

/// Pooling plus the modules after it.
pub struct EmbeddingHead {
    pooling: Pooling,
    steps: Vec<Step>,
    dimension: usize,
}

impl EmbeddingHead {
    /// Builds the head that `sentence` describes, on top of a backbone of
    /// width `hidden_size`; `pooling` overrides the configured pooling.
    pub fn load(
        sentence: &SentenceConfig,
        pooling: Pooling,
        hidden_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut dimension = hidden_size;
        let mut steps = Vec::with_capacity(sentence.post_pooling.len());
        for module in &sentence.post_pooling {
            match module {
                PostPooling::Normalize => steps.push(Step::Normalize),
                PostPooling::Dense(dense) => {
                    if dense.in_features != dimension {
                        return Err(Error::config(
                            dense.dir.join("config.json"),
                            format!(
                                "Dense in_features {} does not match the {dimension} features before it",
                                dense.in_features
                            ),
                        ));
                    }
                    let files = weights::weight_files(&dense.dir)?;
                    let vb = weights::var_builder(&files, DType::F32, device)?;
                    let linear = Linear::load(
                        vb.pp("linear"),
                        dense.in_features,
                        dense.out_features,
                        dense.bias,
                    )
                    .map_err(|error| Error::weights(&files[0], error))?;
                    dimension = dense.out_features;
                    steps.push(Step::Dense {
                        linear,
                        activation: dense.activation,
                    });
                }
            }
        }
        Ok(Self {
            pooling,
            steps,
            dimension,
        })
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Size of the final embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Whether the last step normalises embeddings to unit length.
    pub fn normalizes(&self) -> bool {
        matches!(self.steps.last(), Some(Step::Normalize))
    }

    pub fn parameter_count(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Dense { linear, .. } => linear.parameter_count(),
                Step::Normalize => 0,
            })
            .sum()
    }

    /// `hidden` `(B, T, H)`, `attention_mask` `(B, T)` -> embeddings `(B, D)`.
    pub fn forward(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mut x = self.pooling.pool(hidden, attention_mask)?;
        for step in &self.steps {
            x = match step {
                Step::Dense { linear, activation } => {
                    let y = linear.forward(&x)?;
                    match activation {
                        DenseActivation::Identity => y,
                        DenseActivation::Tanh => y.tanh()?,
                    }
                }
                // torch.nn.functional.normalize: x / max(||x||, 1e-12).
                Step::Normalize => {
                    let norm = x
                        .sqr()?
                        .sum_keepdim(1)?
                        .sqrt()?
                        .clamp(1e-12, f64::INFINITY)?;
                    x.broadcast_div(&norm)?
                }
            };
        }
        Ok(x)
    }
}
