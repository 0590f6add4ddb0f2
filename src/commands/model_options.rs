//! Flags shared by every command that loads a model.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use effir_pipeline::model::text_encoder::PaddingSide;
use effir_pipeline::{LoadOptions, Pooling};
use serde::Deserialize;

/// Pooling choices on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingArg {
    Cls,
    Mean,
    Max,
    MeanSqrtLen,
    LastToken,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Cls => Pooling::Cls,
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::Max => Pooling::Max,
            PoolingArg::MeanSqrtLen => Pooling::MeanSqrtLen,
            PoolingArg::LastToken => Pooling::LastToken,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingSideArg {
    Left,
    Right,
}

/// Where the model is and how to read it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (Hugging Face / sentence-transformers layout).
    #[arg(long, env = "EFFIR_MODEL")]
    pub model: PathBuf,
    /// Maximum tokens per text [default: the model's own].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pooling [default: the model's 1_Pooling, else mean (encoders) or last-token (decoders)].
    #[arg(long, value_enum)]
    pub pooling: Option<PoolingArg>,
    /// Append EOS to every text [default: with last-token pooling].
    #[arg(long)]
    pub append_eos: Option<bool>,
    /// Padding side [default: the tokenizer's].
    #[arg(long, value_enum)]
    pub padding_side: Option<PaddingSideArg>,
}

impl ModelArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            max_length: self.max_length,
            pooling: self.pooling.map(Into::into),
            append_eos: self.append_eos,
            padding_side: self.padding_side.map(|p| match p {
                PaddingSideArg::Left => PaddingSide::Left,
                PaddingSideArg::Right => PaddingSide::Right,
            }),
        }
    }
}

/// The model of `model` as a text embedder: candle on the model directory,
/// or, with `onnx`, ONNX Runtime on the export (a directory or graph file)
/// under `providers`.
pub fn load_text_embedder(
    model: &ModelArgs,
    onnx: bool,
    providers: &super::provider_options::ProviderArgs,
) -> anyhow::Result<Box<dyn effir_pipeline::TextEmbedder>> {
    use anyhow::Context;
    let path = &model.model;
    Ok(if onnx {
        let location = effir_onnx::GraphLocation::resolve(path)?;
        let encoder =
            effir_onnx::OnnxEncoder::load(location, &model.load_options(), &providers.settings()?)
                .with_context(|| format!("opening the ONNX graph of {}", path.display()))?;
        Box::new(encoder)
    } else {
        let embedder = effir_pipeline::Embedder::load(path, &model.load_options())
            .with_context(|| format!("loading model {}", path.display()))?;
        Box::new(embedder)
    })
}

/// A model as a command holds it: loaded whole, or opened for
/// layer-at-a-time passes (`--stream`).
pub enum OpenedModel {
    Loaded(effir_pipeline::Embedder),
    Streamed(effir_pipeline::model::layer_stream::LayerStream),
}

impl OpenedModel {
    /// Opens the model of `model`, streamed when `stream` is set.
    pub fn open(model: &ModelArgs, stream: bool) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (dir, options) = (&model.model, model.load_options());
        Ok(if stream {
            Self::Streamed(
                effir_pipeline::model::layer_stream::LayerStream::open(dir, &options)
                    .with_context(|| format!("opening model {}", dir.display()))?,
            )
        } else {
            Self::Loaded(
                effir_pipeline::Embedder::load(dir, &options)
                    .with_context(|| format!("loading model {}", dir.display()))?,
            )
        })
    }

    pub fn setup(&self) -> &effir_pipeline::EncoderSetup {
        match self {
            Self::Loaded(e) => e.setup(),
            Self::Streamed(s) => s.setup(),
        }
    }

    pub fn shape(&self) -> &effir_pipeline::ModelShape {
        match self {
            Self::Loaded(e) => e.shape(),
            Self::Streamed(s) => s.shape(),
        }
    }

    pub fn parameters(&self) -> anyhow::Result<effir_pipeline::ParameterReport> {
        Ok(match self {
            Self::Loaded(e) => e.parameters(),
            Self::Streamed(s) => s.parameters()?,
        })
    }
}
