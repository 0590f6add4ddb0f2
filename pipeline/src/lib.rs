//! effir's pipeline library: retrieval models in candle and the research
//! stages around them, grouped by what each part is for:
//!
//! - [`io`]: files on disk (atomic writes, JSON, npy, text input, weights,
//!   copying model files);
//! - [`model`]: a loaded embedding model ([`Embedder`]: encoder setup, text
//!   encoder, head, pooling, sentence-transformers files, [`ModelShape`]) and
//!   [`model::arch`]: the architectures, each described to every stage by one
//!   [`model::arch::CheckpointMap`];
//! - [`data`]: BEIR datasets, document samples, calibration text, text formats;
//! - [`eval`]: retrieval evaluation, metrics, exact search, the embedding cache;
//! - [`compress`]: sub-layer analysis, drop studies, pruning, the DeciLM
//!   translation, charts;
//! - [`finetune`]: recovery training;
//! - [`import`]: models from other formats (GGUF) as Hugging Face directories.
//!
//! Each folder uses only the ones listed before it (and [`error`]).

pub mod compress;
pub mod data;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod import;
pub mod io;
pub mod model;

pub use error::{Error, Result};
pub use eval::text_embedder::TextEmbedder;
pub use model::arch::Architecture;
pub use model::embedder::{Embedder, ParameterReport};
pub use model::encoder_setup::{EncoderSetup, LoadOptions, Prompt};
pub use model::pooling::Pooling;
pub use model::shape::{LayerShape, MlpShape, ModelShape};
