//! From a model directory to an ONNX `ModelProto`: one emitter per
//! architecture (`bert.rs`, `decoder.rs`), the sentence-transformers head
//! (`head.rs`), and the interface profiles serving stacks read.

pub mod bert;
pub mod decoder;
pub mod head;
pub mod layers;

use std::path::Path;

use candle_onnx::onnx::{ModelProto, OperatorSetIdProto, StringStringEntryProto};
use effir_pipeline::model::arch::BackboneConfig;
use effir_pipeline::{EncoderSetup, LoadOptions, ModelShape};

use crate::error::{Error, Result};
use crate::graph::{Dim, ElementType, GraphBuilder, WeightStorage};
use crate::graph_file::ExternalDataFile;
use crate::interface::{
    ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE, SENTENCE_EMBEDDING, TOKEN_TYPE_IDS,
};
use crate::quantize::MatmulPrecision;
use effir_pipeline::io::weight_store::WeightStore;
pub use layers::AttentionMask;
use layers::{BackboneInputs, Weights};

/// The opsets effir emits: 17 (LayerNormalization) and later.
pub const MIN_OPSET: i64 = 17;
pub const MAX_OPSET: i64 = 21;
pub const DEFAULT_OPSET: i64 = 17;

/// Which inputs and outputs the graph has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// `input_ids`, `attention_mask` (+ `token_type_ids` for BERT) ->
    /// `last_hidden_state`, as `optimum-cli export onnx` writes it (Vespa,
    /// fastembed).
    Optimum,
    /// The Optimum interface plus `sentence_embedding`: pooling, Dense and
    /// Normalize inside the graph (text-embeddings-inference).
    SentenceTransformers,
}

impl Profile {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "optimum" => Some(Self::Optimum),
            "sentence-transformers" | "st" => Some(Self::SentenceTransformers),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Optimum => "optimum",
            Self::SentenceTransformers => "sentence-transformers",
        }
    }
}

/// Choices of one emission.
#[derive(Debug, Clone)]
pub struct EmitOptions {
    pub profile: Profile,
    pub opset: i64,
    pub storage: WeightStorage,
    /// The arithmetic of the transformer's linear layers; the embedding
    /// tables and the sentence-transformers head stay float32.
    pub precision: MatmulPrecision,
    /// Dynamic int8 only: the smoothing strength α ([`crate::smoothing`]).
    /// The products are emitted in float32 and converted once their input
    /// channels are measured on calibration text (`export`).
    pub int8_smoothing: Option<f32>,
    /// BERT only: how the padding mask reaches the scores; `None` is
    /// [`AttentionMask::default_for`] the precision.
    pub attention_mask: Option<AttentionMask>,
}

impl Default for EmitOptions {
    fn default() -> Self {
        Self {
            profile: Profile::Optimum,
            opset: DEFAULT_OPSET,
            storage: WeightStorage::Float32,
            precision: MatmulPrecision::Float32,
            int8_smoothing: None,
            attention_mask: None,
        }
    }
}

/// The graph metadata entry naming the [`AttentionMask`] form.
pub const ATTENTION_MASK_KEY: &str = "effir.attention_mask";

/// Emits the model in `dir` (unpruned or pruned: its `effir_shape.json`
/// gives every layer's MLP width or its absence).
pub fn emit_model(dir: &Path, options: &EmitOptions) -> Result<ModelProto> {
    check_options(options)?;
    let setup = EncoderSetup::load(dir, &LoadOptions::default())?;
    let tensors = effir_pipeline::io::weights::load_all_tensors(dir)?;
    let prefix = setup.config.checkpoint().prefix(tensors.keys());
    let weights = Weights::new(tensors, prefix, dir);
    let g = GraphBuilder::new(options.opset, options.storage);
    emit(setup, &weights, g, options).map(|emitted| emitted.model)
}

/// [`emit_model`] for models larger than memory: each tensor is read from
/// the memory-mapped files when the emitter reaches it, and each
/// initializer goes into `data` as soon as it is made, so neither the
/// source's weights nor the graph's are ever held whole. Returns the
/// graph (its initializers pointing into `data`) and the initializers'
/// bytes.
pub fn emit_model_streamed(
    dir: &Path,
    options: &EmitOptions,
    data: ExternalDataFile,
) -> Result<(ModelProto, usize)> {
    check_options(options)?;
    let setup = EncoderSetup::load(dir, &LoadOptions::default())?;
    let store = WeightStore::open(dir)?;
    let prefix = setup.config.checkpoint().prefix(store.names().iter());
    let weights = Weights::streamed(store, prefix);
    let g = GraphBuilder::new(options.opset, options.storage).with_external_data(data);
    let emitted = emit(setup, &weights, g, options)?;
    emitted
        .external_data
        .expect("the builder writes external data")
        .close()?;
    Ok((emitted.model, emitted.initializer_bytes))
}

/// Refuses options no emission can honour (also run by `export` before
/// it asks for calibration text).
pub(crate) fn check_options(options: &EmitOptions) -> Result<()> {
    if !(MIN_OPSET..=MAX_OPSET).contains(&options.opset) {
        return Err(Error::InvalidArgument(format!(
            "opset {} is not supported; effir emits opsets {MIN_OPSET} to {MAX_OPSET}",
            options.opset
        )));
    }
    if let Some(alpha) = options.int8_smoothing {
        crate::precision::check_int8_smoothing(options.precision, alpha)?;
    }
    if let Some(mask) = options.attention_mask {
        mask.check(options.precision)?;
    }
    Ok(())
}

/// What [`emit`] made.
struct Emitted {
    model: ModelProto,
    initializer_bytes: usize,
    /// The builder's external data file, still open.
    external_data: Option<ExternalDataFile>,
}

/// Emits the graph of the model `setup` describes, reading `weights`
/// through `g`.
fn emit(
    setup: EncoderSetup,
    weights: &Weights,
    mut g: GraphBuilder,
    options: &EmitOptions,
) -> Result<Emitted> {
    let dir = setup.dir.as_path();
    let config = &setup.config;
    let shape = ModelShape::load_or(dir, config.described_shape())?;
    let arch = config.architecture();
    let map = config.checkpoint();
    tracing::info!(architecture = %arch, layers = shape.layers.len(), mlps = shape.mlp_count(), profile = options.profile.name(), "emitting ONNX graph");

    // Smoothed int8 products are converted after emission (`export`).
    g.set_matmul_precision(match options.int8_smoothing {
        Some(_) => MatmulPrecision::Float32,
        None => options.precision,
    });
    let batch_seq = [
        Dim::Dynamic("batch_size".into()),
        Dim::Dynamic("sequence_length".into()),
    ];
    let inputs = BackboneInputs {
        input_ids: g.input(INPUT_IDS, ElementType::Int64, &batch_seq),
        attention_mask: g.input(ATTENTION_MASK, ElementType::Int64, &batch_seq),
        token_type_ids: map
            .embeddings
            .token_types
            .is_some()
            .then(|| g.input(TOKEN_TYPE_IDS, ElementType::Int64, &batch_seq)),
    };
    let (hidden, hidden_size, attention_mask) = match &config.backbone {
        BackboneConfig::Bert(cfg) => {
            let mask = options
                .attention_mask
                .unwrap_or_else(|| AttentionMask::default_for(options.precision));
            (
                bert::emit(&mut g, weights, cfg, map, &shape, &inputs, mask)?,
                cfg.hidden_size,
                mask,
            )
        }
        BackboneConfig::Decoder(spec) => {
            if options.attention_mask == Some(AttentionMask::Folded) {
                return Err(Error::InvalidArgument(format!(
                    "--attention-mask folded applies to BERT-style encoders; {}'s attention mask \
                     depends on the query as well as the key (causal or windowed), so it stays added",
                    arch.model_type()
                )));
            }
            (
                decoder::emit(&mut g, weights, spec, &shape, &inputs)?,
                spec.hidden_size,
                AttentionMask::Added,
            )
        }
    };
    let hidden_dims = [
        Dim::Dynamic("batch_size".into()),
        Dim::Dynamic("sequence_length".into()),
        Dim::Fixed(hidden_size as i64),
    ];
    g.output(
        &hidden,
        LAST_HIDDEN_STATE,
        ElementType::Float32,
        &hidden_dims,
    );
    if options.profile == Profile::SentenceTransformers {
        g.set_matmul_precision(MatmulPrecision::Float32);
        let (embedding, dimension) = head::emit(
            &mut g,
            &hidden,
            hidden_size,
            &inputs,
            setup.pooling,
            &setup.sentence,
        )?;
        g.output(
            &embedding,
            SENTENCE_EMBEDDING,
            ElementType::Float32,
            &[
                Dim::Dynamic("batch_size".into()),
                Dim::Fixed(dimension as i64),
            ],
        );
    }

    let shape_json = serde_json::to_string(&shape).map_err(|e| Error::Export(e.to_string()))?;
    let mut metadata = vec![
        ("effir.version", env!("CARGO_PKG_VERSION").to_string()),
        ("effir.architecture", arch.model_type().to_string()),
        ("effir.profile", options.profile.name().to_string()),
        ("effir.pooling", setup.pooling.to_string()),
        ("effir.max_length", setup.text.max_length().to_string()),
        ("effir.vocab_size", config.vocab_size().to_string()),
        ("effir.shape", shape_json),
        ("effir.weights", options.storage.name().to_string()),
    ];
    metadata.push(("effir.precision", options.precision.name().to_string()));
    metadata.push((ATTENTION_MASK_KEY, attention_mask.name().to_string()));
    if let Some(kernel) = options.precision.int8_kernel() {
        metadata.push(("effir.int8_kernel", kernel.name().to_string()));
    }
    if let Some(form) = options.precision.int8_form() {
        metadata.push(("effir.int8_form", form.to_string()));
    }
    if let Some(alpha) = options.int8_smoothing {
        metadata.push(("effir.int8_smoothing", alpha.to_string()));
    }
    if let Ok(plan) = std::fs::read_to_string(dir.join(effir_pipeline::compress::prune::PLAN_FILE))
    {
        metadata.push(("effir.pruning_plan", plan));
    }
    let initializer_bytes = g.initializer_bytes();
    let external_data = g.take_external_data();
    let model = ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
        }],
        producer_name: "effir".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        // The source model is in the metadata, relative to the graph.
        doc_string: format!(
            "{} retriever exported by effir (source: metadata effir.source_model)",
            arch.model_type()
        ),
        graph: Some(g.finish(&format!("effir_{}", arch.model_type()))),
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.to_string(),
                value,
            })
            .collect(),
        ..Default::default()
    };
    Ok(Emitted {
        model,
        initializer_bytes,
        external_data,
    })
}

/// The IR version that goes with an opset (onnx's versioning table).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}
