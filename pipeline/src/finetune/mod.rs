//! Retrieval-specific fine-tuning in candle (EffiR's recovery step): InfoNCE
//! over in-batch and hard negatives, optional KL distillation from the
//! unpruned model's scores, label-free distillation of its embeddings on
//! unlabeled text, full fine-tuning or LoRA, AdamW with warmup and decay,
//! gradient clipping and accumulation, atomic checkpoints with exact resume.
//!
//! - [`config`]: the run's settings;
//! - [`data`]: training examples from BEIR qrels, hard-negative files or JSONL;
//! - [`texts`]: unlabeled text for label-free distillation;
//! - [`objective`]: the losses;
//! - [`optimizer`]: AdamW, schedule, clipping;
//! - [`lora`]: adapters and merging;
//! - [`checkpoint`]: saving and restoring the whole training state;
//! - [`gradient_checkpointing`]: recomputing layers in the backward pass
//!   instead of keeping their activations;
//! - [`teacher`]: the distillation teacher's cached embeddings;
//! - [`trainer`]: the loop;
//! - [`record`]: what a run writes into its output (`effir_finetune.json`).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod gradient_checkpointing;
pub mod lora;
pub mod objective;
pub mod optimizer;
pub mod record;
pub mod teacher;
pub mod texts;
pub mod trainer;

pub use config::{
    DevSettings, DistillationSettings, EmbeddingDistillationSettings, EmbeddingLoss,
    FinetuneConfig, Objective, TrainedWeights,
};
pub use lora::LoraSettings;
pub use optimizer::Decay;
pub use record::FinetuneRecord;
pub use trainer::{finetune, StepReport, TrainingOutcome};
