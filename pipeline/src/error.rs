//! Errors of the effir pipeline library.
//!
//! Every variant that comes from a file names that file, so the CLI can print
//! an error a user can act on without a backtrace.

use std::path::PathBuf;

/// Result alias used throughout the pipeline crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: file not found")]
    MissingFile { path: PathBuf },

    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: malformed JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },

    #[error("{path}: unsupported model_type `{model_type}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },

    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },

    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: cannot load weights: {error}")]
    Weights {
        path: PathBuf,
        error: candle_core::Error,
    },

    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("tokenization failed: {message}")]
    Tokenization { message: String },

    #[error("{path}:{line}: {message}")]
    Input {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{path}: {message}")]
    EmptyInput { path: PathBuf, message: String },

    /// A tensor the architecture's checkpoint map names is not in the
    /// checkpoint of the model directory `path`.
    #[error("{path}: no tensor `{tensor}` in the checkpoint")]
    MissingTensor { path: PathBuf, tensor: String },

    /// A tensor's shape is not the one the config (or the pruned shape) implies.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A pruning plan that cannot be carried out on the model.
    #[error("pruning plan: {0}")]
    InvalidPlan(String),

    /// A training checkpoint that does not belong to this run.
    #[error("{path}: {message}")]
    CheckpointMismatch { path: PathBuf, message: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path }
        } else {
            Error::Io {
                path,
                error: source,
            }
        }
    }

    /// A weight-loading error, without the backtrace candle attaches when
    /// `RUST_BACKTRACE` is set (it would be printed inside the message).
    pub(crate) fn weights(path: impl Into<PathBuf>, error: candle_core::Error) -> Self {
        Error::Weights {
            path: path.into(),
            error: strip_backtrace(error),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}

fn strip_backtrace(error: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match error {
        E::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(strip_backtrace(*inner)),
            path,
        },
        E::Context { inner, context } => E::Context {
            inner: Box::new(strip_backtrace(*inner)),
            context,
        },
        other => other,
    }
}
