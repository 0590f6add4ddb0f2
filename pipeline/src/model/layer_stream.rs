//! A decoder retriever run one layer at a time, for models larger than
//! memory (issue #18: a 7B model in bf16 on a 24 GB machine).
//!
//! The weights stay memory-mapped in their stored dtype
//! ([`WeightStore`]). Every batch of the pass is tokenized up front; the
//! token embeddings are read row by row from the table; then each layer
//! is loaded (converted to float32), run on every batch, and dropped
//! before the next is loaded. Peak memory is one layer in float32 plus
//! the batches' residual streams, masks and rotary tables, whatever the
//! model's depth; embedding many texts goes in groups of
//! [`EMBED_GROUP_TOKENS`].
//!
//! The layers, norms, masks and rotary tables are built by the same code
//! as the whole-model [`crate::Embedder`]'s ([`DecoderParts`]), and each
//! batch meets the same operations in the same order, so a streamed pass
//! computes bit for bit what a whole-model pass computes. Hooks see each
//! layer's batches in turn ([`ForwardHooks::begin_batch`] before each).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use ndarray::Array2;

use crate::error::{Error, Result};
use crate::io::weight_store::WeightStore;
use crate::model::arch::decoder::DecoderParts;
use crate::model::arch::{ForwardHooks, ModelInput};
use crate::model::embedder::{LayerParameterReport, ParameterReport};
use crate::model::encoder_setup::{EncoderSetup, LoadOptions};
use crate::model::head::EmbeddingHead;
use crate::model::shape::ModelShape;

/// Padded tokens whose residual streams [`LayerStream::embed`] holds at
/// once: texts beyond it are embedded in further passes over the layers
/// (each reads the weights again), so a corpus never has to fit in memory.
pub const EMBED_GROUP_TOKENS: usize = 16_384;

/// Consecutive runs of `batches` of at most `budget` padded tokens each
/// (a larger batch is a run of its own).
fn token_groups(batches: &[StreamBatch], budget: usize) -> Vec<&[StreamBatch]> {
    let mut groups = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, batch) in batches.iter().enumerate() {
        let n = batch.input.input_ids.elem_count();
        if i > start && tokens + n > budget {
            groups.push(&batches[start..i]);
            (start, tokens) = (i, 0);
        }
        tokens += n;
    }
    if start < batches.len() {
        groups.push(&batches[start..]);
    }
    groups
}

/// One padded batch and the indices of its texts.
pub struct StreamBatch {
    pub input: ModelInput,
    pub indices: Vec<usize>,
}

/// A decoder model read layer by layer from its files.
pub struct LayerStream {
    setup: EncoderSetup,
    shape: ModelShape,
    store: Arc<WeightStore>,
    /// Reads each tensor from `store` when a part is loaded.
    vb: candle_nn::VarBuilder<'static>,
    parts: DecoderParts,
    dimension: usize,
}

impl LayerStream {
    /// Opens the model in `dir` without loading any weight.
    pub fn open(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let setup = EncoderSetup::load(dir, options)?;
        let shape = ModelShape::load_or(dir, setup.config.described_shape())?;
        let spec = setup.config.decoder_spec().ok_or_else(|| {
            Error::unsupported(
                dir,
                format!(
                    "layer-at-a-time passes of a {} encoder (streaming covers decoder LLMs; \
                     encoders of this kind fit in memory: drop --stream)",
                    setup.architecture()
                ),
            )
        })?;
        let store = Arc::new(WeightStore::open(dir)?);
        let vb = store.var_builder(DType::F32);
        let parts = DecoderParts::new(&vb, spec, &shape).map_err(|e| Error::weights(dir, e))?;
        tracing::info!(
            model = %dir.display(),
            layers = shape.layers.len(),
            stored_bytes = store.stored_bytes(),
            "streaming the model layer by layer"
        );
        let mut stream = Self {
            setup,
            shape,
            store,
            vb,
            parts,
            dimension: 0,
        };
        stream.dimension = stream.head()?.dimension();
        Ok(stream)
    }

    pub fn setup(&self) -> &EncoderSetup {
        &self.setup
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    /// `texts` (with `prefix`) tokenized and batched exactly as
    /// [`EncoderSetup::for_each_batch`] batches them.
    pub fn batches<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
    ) -> Result<Vec<StreamBatch>> {
        let mut batches = Vec::new();
        self.setup.for_each_batch(
            texts,
            prefix,
            batch_size,
            &Device::Cpu,
            &mut |input, indices| {
                batches.push(StreamBatch {
                    input: input.clone(),
                    indices: indices.to_vec(),
                });
                Ok(())
            },
        )?;
        Ok(batches)
    }

    /// Each batch's last hidden state (after the final norm), `(B, T, H)`,
    /// with `hooks` skipping and observing as in a whole-model pass;
    /// `progress` gets the number of layers done.
    pub fn hidden_states(
        &self,
        batches: &[StreamBatch],
        hooks: &mut dyn ForwardHooks,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Tensor>> {
        let dir = self.store.dir();
        let weights_err = |e| Error::weights(dir, e);
        let table = self.parts.token_table_name();
        let mut streams = Vec::with_capacity(batches.len());
        let mut contexts = Vec::with_capacity(batches.len());
        for batch in batches {
            let ids: Vec<u32> = batch.input.input_ids.flatten_all()?.to_vec1()?;
            let rows = self.store.rows(&table, &ids)?;
            streams.push(self.parts.embed(rows, &batch.input).map_err(weights_err)?);
            contexts.push(self.parts.context(&batch.input).map_err(weights_err)?);
        }
        for i in 0..self.parts.layer_count() {
            let _span = tracing::debug_span!("layer", i).entered();
            let layer = self.parts.load_layer(&self.vb, i).map_err(weights_err)?;
            for ((x, batch), context) in streams.iter_mut().zip(batches).zip(&contexts) {
                hooks.begin_batch(&batch.input)?;
                *x = layer
                    .forward(i, x.clone(), context, hooks)
                    .map_err(weights_err)?;
            }
            drop(layer);
            progress(i + 1);
        }
        let norm = self.parts.load_final_norm(&self.vb).map_err(weights_err)?;
        streams
            .iter()
            .map(|x| norm.forward(x).map_err(weights_err))
            .collect()
    }

    /// Size of an embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The embedding head (pooling, Dense, Normalize) on this backbone.
    fn head(&self) -> Result<EmbeddingHead> {
        let spec = self
            .setup
            .config
            .decoder_spec()
            .expect("a stream is a decoder");
        EmbeddingHead::load(
            &self.setup.sentence,
            self.setup.pooling,
            spec.hidden_size,
            &Device::Cpu,
        )
    }

    /// Parameter counts by component, from the stored tensors' shapes (no
    /// weight is read), counted as [`crate::Embedder::parameters`] counts
    /// them: each layer's attention projections, q/k norms and attention
    /// norms; its MLP projections and MLP norms; the token table and final
    /// norm as embeddings. Stored tensors no part loads (rotary
    /// `inv_freq` buffers, an untied LM head) are not parameters of the
    /// encoder.
    pub fn parameters(&self) -> Result<ParameterReport> {
        use crate::model::arch::Sublayer;
        let map = self.setup.config.checkpoint();
        let store = &self.store;
        let prefix = map.prefix(store.names().iter());
        let elements = |name: &str| store.info(name).map_or(0, |t| t.elements());
        let modules = |sublayer: Sublayer| -> Vec<&'static str> {
            let mut modules: Vec<&'static str> = map
                .projections()
                .into_iter()
                .filter(|(role, _)| role.sublayer() == sublayer)
                .map(|(_, module)| module)
                .collect();
            modules.extend(map.norms(sublayer).all().map(|(_, norm)| norm));
            if sublayer == Sublayer::Attention {
                modules.extend(map.attention.query_norm);
                modules.extend(map.attention.key_norm);
            }
            modules
        };
        let (attention_modules, mlp_modules) =
            (modules(Sublayer::Attention), modules(Sublayer::Mlp));
        let count = |layer: usize, modules: &[&str]| -> usize {
            modules
                .iter()
                .flat_map(|m| {
                    ["weight", "bias"]
                        .map(|t| format!("{prefix}{}.{t}", map.layer_module(layer, m)))
                })
                .map(|name| elements(&name))
                .sum()
        };
        let layers: Vec<LayerParameterReport> = self
            .shape
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer_shape)| LayerParameterReport {
                attention: count(i, &attention_modules),
                mlp: layer_shape.mlp.map_or(0, |_| count(i, &mlp_modules)),
                mlp_width: layer_shape.mlp.map(|m| m.intermediate_size),
            })
            .collect();
        let final_norm = map
            .final_norm
            .map_or(0, |norm| elements(&format!("{prefix}{norm}.weight")));
        let embeddings = elements(&self.parts.token_table_name()) + final_norm;
        let head = self.head()?.parameter_count();
        let in_layers: usize = layers.iter().map(|l| l.attention + l.mlp).sum();
        Ok(ParameterReport {
            embeddings,
            total: embeddings + in_layers + head,
            layers,
            head,
        })
    }

    /// Sentence embeddings of `texts` (with `prefix`), rows in the order of
    /// `texts`, as [`crate::Embedder::embed`] computes them; `progress` gets
    /// the texts done.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        self.embed_in_groups(texts, prefix, batch_size, EMBED_GROUP_TOKENS, progress)
    }

    /// [`LayerStream::embed`], holding the residual streams of at most
    /// `group_tokens` padded tokens at once (one pass over the layers per
    /// group; the embeddings do not depend on it).
    pub fn embed_in_groups<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
        group_tokens: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        let head = self.head()?;
        let batches = self.batches(texts, prefix, batch_size)?;
        let mut out = Array2::<f32>::zeros((texts.len(), head.dimension()));
        let mut done = 0;
        for group in token_groups(&batches, group_tokens) {
            let hidden =
                self.hidden_states(group, &mut crate::model::arch::NoHooks, &mut |_| {})?;
            for (batch, hidden) in group.iter().zip(hidden) {
                let rows: Vec<Vec<f32>> = head
                    .forward(&hidden, &batch.input.attention_mask)?
                    .to_vec2()?;
                for (&i, row) in batch.indices.iter().zip(rows) {
                    out.row_mut(i)
                        .assign(&ndarray::ArrayView1::from(row.as_slice()));
                }
                done += batch.indices.len();
            }
            progress(done);
        }
        Ok(out)
    }
}
