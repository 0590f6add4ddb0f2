//! effir's pipeline library: retrieval models in candle (loading, embedding)
//! and, as the pipeline grows, analysis, pruning, training and evaluation.
//!
//! The entry point is [`Embedder`]: it loads a Hugging Face /
//! sentence-transformers directory (BERT, Gemma3, Llama, Mistral, Qwen2,
//! Qwen3), including pruned ones whose [`ModelShape`] differs per layer, and
//! embeds text.

pub mod atomic_file;
pub mod embedder;
pub mod encoder_setup;
pub mod error;
pub mod head;
pub mod json_file;
pub mod models;
pub mod pooling;
pub mod sentence_transformers;
pub mod shape;
pub mod text_encoder;
pub mod weights;

pub use embedder::{Embedder, LoadOptions, ParameterReport, Prompt};
pub use encoder_setup::EncoderSetup;
pub use error::{Error, Result};
pub use models::Architecture;
pub use pooling::Pooling;
pub use shape::{LayerShape, MlpShape, ModelShape};
pub use text_embedder::TextEmbedder;
pub mod analysis;
pub mod beir;
pub mod calibration;
pub mod chart;
pub mod decilm;
pub mod drop_study;
pub mod embedding_cache;
pub mod evaluation;
pub mod finetune;
pub mod metrics;
pub mod model_files;
pub mod npy;
pub mod prune;
pub mod sampling;
pub mod search;
pub mod text_embedder;
pub mod text_input;
