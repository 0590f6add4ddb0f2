//! One module per `effir` subcommand.

pub mod analyze;
pub mod bench;
pub mod document_sample;
pub mod drop_study;
pub mod embed;
pub mod encode;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod frontier;
pub mod import_gguf;
pub mod inspect;
pub mod lint_onnx;
pub mod model_options;
pub mod progress;
pub mod provider_options;
pub mod prune;
pub mod rewrite;
pub mod validate;
