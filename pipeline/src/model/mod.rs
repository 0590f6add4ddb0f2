//! A loaded embedding model: the architectures ([`arch`]), the text encoder
//! and its settings, the sentence-transformers head and pooling, and the
//! per-layer widths of a pruned model ([`shape`]).

pub mod arch;
pub mod byte_level;
pub mod embedder;
pub mod encoder_setup;
pub mod head;
pub mod kernels;
pub mod layer_stream;
pub mod pooling;
pub mod sentence_transformers;
pub mod shape;
pub mod synthetic;
pub mod text_encoder;
