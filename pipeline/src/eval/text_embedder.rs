//! The interface evaluation needs from a model: texts in, embeddings out.
//! The candle [`Embedder`] implements it, and so does the ONNX Runtime
//! encoder of `effir-onnx`, so one evaluation code path scores both.

use std::path::Path;

use ndarray::Array2;

use crate::error::Result;
use crate::eval::embedding_cache::{fingerprint_dir, Fingerprint};
use crate::model::embedder::Embedder;
use crate::model::encoder_setup::EncoderSetup;
use crate::model::layer_stream::LayerStream;

pub trait TextEmbedder {
    /// The model directory or graph file, as reports name it.
    fn source(&self) -> &Path;

    /// Configuration, prompts, pooling and tokenizer.
    fn setup(&self) -> &EncoderSetup;

    /// Size of an embedding.
    fn dimension(&self) -> usize;

    /// Identity of what computes the embeddings (weights, graph), for the
    /// embedding cache.
    fn fingerprint(&self) -> Result<Fingerprint>;

    /// Run-time settings beyond the weights that change embeddings (for the
    /// embedding cache); empty when there are none.
    fn variant(&self) -> String;

    /// Embeds `texts` with `prefix` prepended, in batches of at most
    /// `batch_size`; `progress` gets the number of texts done. Rows follow
    /// the order of `texts`.
    fn embed_texts(
        &self,
        texts: &[&str],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>>;
}

impl TextEmbedder for Embedder {
    fn source(&self) -> &Path {
        self.dir()
    }

    fn setup(&self) -> &EncoderSetup {
        Embedder::setup(self)
    }

    fn dimension(&self) -> usize {
        Embedder::dimension(self)
    }

    fn fingerprint(&self) -> Result<Fingerprint> {
        fingerprint_dir(self.dir())
    }

    fn variant(&self) -> String {
        if self.skipped().is_empty() {
            String::new()
        } else {
            format!("skipped={:?}", self.skipped())
        }
    }

    fn embed_texts(
        &self,
        texts: &[&str],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        self.embed(texts, prefix, batch_size, progress)
    }
}

/// The layer-at-a-time pass: the same embeddings as [`Embedder`], bit for
/// bit, for models larger than memory.
impl TextEmbedder for LayerStream {
    fn source(&self) -> &Path {
        &self.setup().dir
    }

    fn setup(&self) -> &EncoderSetup {
        LayerStream::setup(self)
    }

    fn dimension(&self) -> usize {
        self.dimension()
    }

    fn fingerprint(&self) -> Result<Fingerprint> {
        fingerprint_dir(&self.setup().dir)
    }

    fn variant(&self) -> String {
        String::new()
    }

    fn embed_texts(
        &self,
        texts: &[&str],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        self.embed(texts, prefix, batch_size, progress)
    }
}
