//! Errors of ONNX emission, ONNX Runtime sessions and validation.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pipeline(#[from] effir_pipeline::Error),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The ONNX Runtime library could not be found or loaded.
    #[error("ONNX Runtime library: {0}")]
    RuntimeLibrary(String),
    /// ONNX Runtime failed on a graph or a run; `source` is its error.
    #[error("ONNX Runtime, {context}: {source}")]
    Runtime {
        context: String,
        #[source]
        source: ort::Error,
    },
    /// An execution provider is unknown or could not be registered.
    #[error("execution provider: {0}")]
    Provider(String),
    /// A graph file that cannot be read or is not what it should be.
    #[error("{path}: {message}")]
    Graph { path: PathBuf, message: String },
    /// The graph's inputs or outputs do not fit the model's tokenizer.
    #[error("{path}: interface mismatch: {message}")]
    Interface { path: PathBuf, message: String },
    /// The model cannot be expressed in the requested form.
    #[error("export: {0}")]
    Export(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn runtime(context: impl Into<String>, error: impl Into<ort::Error>) -> Self {
        Self::Runtime {
            context: context.into(),
            source: error.into(),
        }
    }

    pub(crate) fn graph(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Graph {
            path: path.into(),
            message: message.into(),
        }
    }
}
