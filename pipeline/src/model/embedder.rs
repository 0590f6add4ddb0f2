//! A loaded embedding model: backbone, head and text encoder, from a Hugging
//! Face / sentence-transformers directory.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;

use crate::error::{Error, Result};
use crate::io::weights;
use crate::model::arch::{
    Architecture, Backbone, ForwardHooks, LayerContext, LayerParameters, ModelInput,
    SkippedSublayers, WithSkipped,
};
use crate::model::encoder_setup::{EncoderSetup, LoadOptions, Prompt};
use crate::model::head::EmbeddingHead;
use crate::model::pooling::Pooling;
use crate::model::sentence_transformers::{SentenceConfig, Similarity};
use crate::model::shape::ModelShape;
use crate::model::text_encoder::{EncodedText, TextEncoder};

/// Summary of a model's size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParameterReport {
    pub embeddings: usize,
    pub layers: Vec<LayerParameterReport>,
    pub head: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LayerParameterReport {
    pub attention: usize,
    /// 0 when the MLP is dropped.
    pub mlp: usize,
    pub mlp_width: Option<usize>,
}

/// An embedding model ready to encode text.
pub struct Embedder {
    setup: EncoderSetup,
    shape: ModelShape,
    backbone: Backbone,
    head: EmbeddingHead,
    device: Device,
    /// Sub-layers bypassed at run time (drop studies); empty normally.
    skipped: SkippedSublayers,
}

impl Embedder {
    /// Loads the model in `dir` on the CPU.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        Self::load_on(dir, options, &Device::Cpu)
    }

    pub fn load_on(dir: &Path, options: &LoadOptions, device: &Device) -> Result<Self> {
        let _span = tracing::info_span!("load", model = %dir.display()).entered();
        let files = weights::weight_files(dir)?;
        let vb = weights::var_builder(&files, DType::F32, device)?;
        Self::from_var_builder(dir, options, vb, device)
    }

    /// Loads the model in `dir` with its backbone weights taken from
    /// `tensors` (checkpoint names, float32) instead of its files. Training
    /// passes `Var`s here, so gradients reach them.
    pub fn load_with_tensors(
        dir: &Path,
        options: &LoadOptions,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::from_var_builder(dir, options, vb, device)
    }

    fn from_var_builder(
        dir: &Path,
        options: &LoadOptions,
        vb: candle_nn::VarBuilder<'static>,
        device: &Device,
    ) -> Result<Self> {
        let setup = EncoderSetup::load(dir, options)?;
        let shape = ModelShape::load_or(dir, setup.config.described_shape())?;
        let backbone = Backbone::load(vb, &setup.config, &shape)?;
        let head = EmbeddingHead::load(
            &setup.sentence,
            setup.pooling,
            backbone.hidden_size(),
            device,
        )?;
        tracing::info!(
            architecture = %setup.architecture(),
            pooling = %setup.pooling,
            max_length = setup.text.max_length(),
            dimension = head.dimension(),
            "model loaded"
        );
        Ok(Self {
            setup,
            shape,
            backbone,
            head,
            device: device.clone(),
            skipped: SkippedSublayers::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.setup.dir
    }

    /// Configuration, pooling and tokenizer.
    pub fn setup(&self) -> &EncoderSetup {
        &self.setup
    }

    pub fn architecture(&self) -> Architecture {
        self.setup.architecture()
    }

    /// The embedding head (pooling, Dense, Normalize).
    pub fn head(&self) -> &EmbeddingHead {
        &self.head
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn sentence_config(&self) -> &SentenceConfig {
        &self.setup.sentence
    }

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.setup.text
    }

    pub fn pooling(&self) -> Pooling {
        self.head.pooling()
    }

    pub fn dimension(&self) -> usize {
        self.head.dimension()
    }

    pub fn similarity(&self) -> Similarity {
        self.setup.sentence.similarity
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The text prepended to inputs for `prompt`.
    pub fn prefix(&self, prompt: &Prompt) -> Result<String> {
        self.setup.prefix(prompt)
    }

    /// Tokenizes texts with `prefix` prepended.
    pub fn encode_texts<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
    ) -> Result<Vec<EncodedText>> {
        self.setup.text.encode(texts, prefix)
    }

    /// Pads encoded texts into one batch on the model's device.
    pub fn batch(&self, texts: &[&EncodedText]) -> Result<ModelInput> {
        self.setup.text.batch(texts, &self.device)
    }

    /// Bypasses `skipped` sub-layers in every later forward pass, as if
    /// they were removed (their residual blocks become the identity).
    pub fn set_skipped(&mut self, skipped: SkippedSublayers) -> Result<()> {
        let layers = self.shape.layers.len();
        if let Some(i) = skipped
            .attention
            .iter()
            .chain(&skipped.mlp)
            .find(|i| **i >= layers)
        {
            return Err(Error::InvalidArgument(format!(
                "layer {i} does not exist (the model has {layers} layers)"
            )));
        }
        self.skipped = skipped;
        Ok(())
    }

    pub fn skipped(&self) -> &SkippedSublayers {
        &self.skipped
    }

    /// Last hidden state of the backbone, `(B, T, H)`.
    pub fn hidden_states(&self, input: &ModelInput) -> Result<Tensor> {
        self.hidden_states_hooked(input, &mut crate::model::arch::NoHooks)
    }

    /// Last hidden state with `hooks` observing (and skipping, in addition
    /// to the embedder's own skipped sub-layers).
    pub fn hidden_states_hooked(
        &self,
        input: &ModelInput,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        self.backbone.forward_hooked(
            input,
            &mut WithSkipped {
                skipped: &self.skipped,
                hooks,
            },
        )
    }

    /// Embeddings of one batch with `hooks` observing the backbone.
    pub fn embed_batch_hooked(
        &self,
        input: &ModelInput,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states_hooked(input, hooks)?;
        self.head.forward(&hidden, &input.attention_mask)
    }

    /// Embeddings of one batch, `(B, D)`.
    pub fn embed_batch(&self, input: &ModelInput) -> Result<Tensor> {
        let hidden = self.hidden_states(input)?;
        self.head.forward(&hidden, &input.attention_mask)
    }

    /// [`Embedder::embed_batch`] in pieces, for passes that keep only what
    /// enters each layer (gradient checkpointing): the residual stream
    /// entering layer 0 and what the batch's layers share. Then
    /// [`Embedder::layer`] for each of [`Embedder::layer_count`] layers and
    /// [`Embedder::embed_last_layer`] give the same embeddings, operation
    /// for operation (the backbone's forward pass is these pieces).
    pub fn stem(&self, input: &ModelInput) -> Result<(Tensor, LayerContext)> {
        self.backbone.stem(input)
    }

    /// Layer `i` on the residual stream `x`, bypassing the embedder's
    /// skipped sub-layers.
    pub fn layer(&self, i: usize, x: Tensor, context: &LayerContext) -> Result<Tensor> {
        self.backbone.layer(
            i,
            x,
            context,
            &mut WithSkipped {
                skipped: &self.skipped,
                hooks: &mut crate::model::arch::NoHooks,
            },
        )
    }

    pub fn layer_count(&self) -> usize {
        self.backbone.layer_count()
    }

    /// Width of the residual stream (the last hidden state's last axis).
    pub fn hidden_size(&self) -> usize {
        self.backbone.hidden_size()
    }

    /// The embeddings `(B, D)` from the residual stream leaving the last
    /// layer: final norm (decoders), pooling and the head.
    pub fn embed_last_layer(&self, x: Tensor, input: &ModelInput) -> Result<Tensor> {
        let hidden = self.backbone.last_hidden(x)?;
        self.head.forward(&hidden, &input.attention_mask)
    }

    /// Embeds `texts` (with `prefix` prepended) in batches of `batch_size`
    /// texts of similar length; `progress` is called with the number of texts
    /// finished so far. Rows follow the order of `texts`.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        let _span = tracing::info_span!("embed", texts = texts.len()).entered();
        let mut out = Array2::<f32>::zeros((texts.len(), self.dimension()));
        let mut done = 0;
        self.for_each_batch(texts, prefix, batch_size, &mut |input, indices| {
            let rows: Vec<Vec<f32>> = self.embed_batch(input)?.to_vec2()?;
            for (&i, row) in indices.iter().zip(rows) {
                out.row_mut(i)
                    .assign(&ndarray::ArrayView1::from(row.as_slice()));
            }
            done += indices.len();
            progress(done);
            Ok(())
        })?;
        Ok(out)
    }

    /// Encodes `texts` (with `prefix`) and calls `f` on padded batches of
    /// similar length on the model's device; see
    /// [`EncoderSetup::for_each_batch`].
    pub fn for_each_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
        f: &mut dyn FnMut(&ModelInput, &[usize]) -> Result<()>,
    ) -> Result<()> {
        self.setup
            .for_each_batch(texts, prefix, batch_size, &self.device, f)
    }

    /// Parameter counts by component.
    pub fn parameters(&self) -> ParameterReport {
        let layers: Vec<LayerParameterReport> = self
            .backbone
            .layer_parameters()
            .into_iter()
            .zip(&self.shape.layers)
            .map(
                |(LayerParameters { attention, mlp }, shape)| LayerParameterReport {
                    attention,
                    mlp,
                    mlp_width: shape.mlp.map(|m| m.intermediate_size),
                },
            )
            .collect();
        let embeddings = self.backbone.embedding_parameters();
        let head = self.head.parameter_count();
        let total = embeddings + head + layers.iter().map(|l| l.attention + l.mlp).sum::<usize>();
        ParameterReport {
            embeddings,
            layers,
            head,
            total,
        }
    }
}
