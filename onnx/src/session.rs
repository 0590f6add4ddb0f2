//! An embedding model served by ONNX Runtime: the model directory's
//! tokenizer and sentence-transformers settings around an ONNX graph. It
//! implements [`TextEmbedder`], so `eval` and `validate` score it exactly as
//! they score the candle model.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use candle_onnx::onnx::tensor_proto::DataType;
use effir_pipeline::eval::embedding_cache::{fingerprint_file, Fingerprint};
use effir_pipeline::model::arch::ModelInput;
use effir_pipeline::model::head::EmbeddingHead;
use effir_pipeline::{EncoderSetup, LoadOptions, TextEmbedder};
use ndarray::{Array2, ArrayViewD};
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use crate::error::{Error, Result};
use crate::graph_file::GraphFile;
use crate::interface::{
    ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE, SENTENCE_EMBEDDING, TOKEN_INPUTS, TOKEN_TYPE_IDS,
};
use crate::providers::{register, GraphOptimization, Provider, ProviderSettings};

/// Opens `graph` under the execution providers of `settings` (and its
/// thread count); `inputs` are the graph's input names, which TensorRT's
/// shape profiles name. Every ONNX Runtime session effir runs is built here.
/// Returns the session and the providers registered, in order.
pub fn open_session(
    graph: &Path,
    settings: &ProviderSettings,
    inputs: &[String],
) -> Result<(Session, Vec<Provider>)> {
    let env = crate::runtime::environment()?;
    let mut builder = Session::builder(env).map_err(|e| Error::runtime("creating a session", e))?;
    if settings.threads > 0 {
        builder = builder
            .with_intra_threads(settings.threads)
            .map_err(ort::Error::<()>::from)
            .map_err(|e| Error::runtime("setting threads", e))?;
    }
    if settings.graph_optimization == GraphOptimization::None {
        builder = builder
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
            .map_err(ort::Error::<()>::from)
            .map_err(|e| Error::runtime("switching graph optimizations off", e))?;
    }
    let (mut builder, providers) = register(builder, settings, inputs)?;
    let session = builder
        .commit_from_file(graph)
        .map_err(|e| Error::runtime(format!("loading {}", graph.display()), e))?;
    Ok((session, providers))
}

/// The operators ONNX Runtime runs for `graph` on the CPU after its graph
/// optimizations, keyed as [`GraphFile::op_counts`] keys them
/// (`com.microsoft::Gelu` for a fusion's operator): what a serving session
/// executes, which the file alone does not show. ONNX Runtime writes the
/// optimized graph to a temporary file, read back and removed.
pub fn runtime_operators(graph: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    let env = crate::runtime::environment()?;
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let optimized = dir.path().join("optimized.onnx");
    let mut builder = Session::builder(env)
        .map_err(|e| Error::runtime("creating a session", e))?
        .with_optimized_model_path(&optimized)
        .map_err(ort::Error::<()>::from)
        .map_err(|e| Error::runtime("asking for the optimized graph", e))?;
    builder
        .commit_from_file(graph)
        .map_err(|e| Error::runtime(format!("loading {}", graph.display()), e))?;
    Ok(GraphFile::read(&optimized)?.op_counts())
}

/// What the graph returns that effir turns into embeddings.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EmbeddingOutput {
    /// `sentence_embedding`, `(B, D)`: used as it is.
    Sentence(String),
    /// `last_hidden_state`, `(B, T, H)`: pooled by the model's head.
    Hidden(String),
}

/// Where to find the graph and the files around it.
#[derive(Debug, Clone)]
pub struct GraphLocation {
    pub graph: PathBuf,
    /// Tokenizer, `config.json` and sentence-transformers files.
    pub model_dir: PathBuf,
}

impl GraphLocation {
    /// The graph `path` names: the file itself, or `model.onnx`,
    /// `onnx/model.onnx` or (a Triton model directory) `1/model.onnx` in
    /// the directory.
    pub fn find_graph(path: &Path) -> Result<PathBuf> {
        if path.is_dir() {
            [
                path.join("model.onnx"),
                path.join("onnx/model.onnx"),
                path.join("1/model.onnx"),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::graph(
                    path,
                    "no model.onnx, onnx/model.onnx or 1/model.onnx in this directory",
                )
            })
        } else if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(Error::graph(path, "does not exist"))
        }
    }

    /// `path` is a `.onnx` file or a directory holding `model.onnx` or
    /// `onnx/model.onnx`; the model files are next to the graph or one level
    /// up (the `onnx/` layout).
    pub fn resolve(path: &Path) -> Result<Self> {
        let graph = Self::find_graph(path)?;
        let parent = graph.parent().unwrap_or(Path::new(".")).to_path_buf();
        let model_dir = if parent.join("config.json").is_file() {
            parent
        } else {
            match parent.parent() {
                Some(up) if up.join("config.json").is_file() => up.to_path_buf(),
                _ => {
                    return Err(Error::graph(
                        &graph,
                        "no config.json (and tokenizer) next to the graph or one directory up",
                    ))
                }
            }
        };
        Ok(Self { graph, model_dir })
    }
}

/// A model served by ONNX Runtime.
pub struct OnnxEncoder {
    location: GraphLocation,
    setup: EncoderSetup,
    session: Mutex<Session>,
    input_names: Vec<String>,
    output: EmbeddingOutput,
    /// Pooling and Dense/Normalize for a graph that returns hidden states.
    head: Option<EmbeddingHead>,
    dimension: usize,
    providers: Vec<Provider>,
    /// Whether ONNX Runtime optimized the graph (fusions change the last
    /// bits of the embeddings).
    graph_optimization: GraphOptimization,
    /// The graph's `metadata_props`.
    metadata: std::collections::BTreeMap<String, String>,
}

impl OnnxEncoder {
    /// Opens `location.graph` under the execution providers of `settings`,
    /// checking its interface against the model directory's tokenizer.
    pub fn load(
        location: GraphLocation,
        options: &LoadOptions,
        settings: &ProviderSettings,
    ) -> Result<Self> {
        let setup = EncoderSetup::load(&location.model_dir, options)?;
        let file = GraphFile::read(&location.graph)?;
        let (input_names, output) = check_interface(&file, &setup)?;

        let (session, providers) = open_session(&location.graph, settings, &input_names)?;
        tracing::info!(graph = %location.graph.display(), providers = ?providers, "ONNX Runtime session ready");

        let hidden_size = file.hidden_size();
        let (head, dimension) = match &output {
            EmbeddingOutput::Sentence(_) => (None, file.embedding_size().unwrap_or(0)),
            EmbeddingOutput::Hidden(_) => {
                let hidden = hidden_size.ok_or_else(|| Error::Interface {
                    path: location.graph.clone(),
                    message: "last_hidden_state has no fixed hidden size".into(),
                })?;
                let head =
                    EmbeddingHead::load(&setup.sentence, setup.pooling, hidden, &Device::Cpu)?;
                let d = head.dimension();
                (Some(head), d)
            }
        };
        let metadata = file
            .model
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        let mut encoder = Self {
            metadata,
            location,
            setup,
            session: Mutex::new(session),
            input_names,
            output,
            head,
            dimension,
            providers,
            graph_optimization: settings.graph_optimization,
        };
        if encoder.dimension == 0 {
            // The graph does not declare the embedding size: run one text.
            let probe = encoder.setup.text.encode(&["dimension probe"], "")?;
            let input = encoder.setup.text.batch(&[&probe[0]], &Device::Cpu)?;
            encoder.dimension = encoder.embed_batch(&input)?.ncols();
        }
        Ok(encoder)
    }

    pub fn graph(&self) -> &Path {
        &self.location.graph
    }

    /// A `metadata_props` entry of the graph (`effir.source_model`, ...).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The execution providers registered, in priority order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Embeddings of one padded batch, `(B, D)`.
    pub fn embed_batch(&self, input: &ModelInput) -> Result<Array2<f32>> {
        let feeds = token_feeds(&self.input_names, input)?;
        let mut session = self.session.lock().expect("session lock");
        let outputs = session
            .run(feeds)
            .map_err(|e| Error::runtime(format!("running {}", self.location.graph.display()), e))?;
        let read = |name: &str| -> Result<ArrayViewD<'_, f32>> {
            outputs[name]
                .try_extract_array::<f32>()
                .map_err(|e| Error::runtime(format!("reading output {name}"), e))
        };
        match &self.output {
            EmbeddingOutput::Sentence(name) => {
                let view = read(name)?;
                Ok(view
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| Error::Interface {
                        path: self.location.graph.clone(),
                        message: format!("output `{name}` is not (batch, dimension): {e}"),
                    })?
                    .to_owned())
            }
            EmbeddingOutput::Hidden(name) => {
                let view = read(name)?;
                let shape = view.shape().to_vec();
                let data: Vec<f32> = view.iter().copied().collect();
                let hidden = Tensor::from_vec(data, shape, &Device::Cpu)?;
                let head = self.head.as_ref().expect("head of a hidden-state graph");
                let mask = input.attention_mask.clone();
                let rows: Vec<Vec<f32>> = head.forward(&hidden, &mask)?.to_vec2()?;
                let d = rows.first().map_or(self.dimension, Vec::len);
                Ok(Array2::from_shape_vec((rows.len(), d), rows.concat()).expect("rows"))
            }
        }
    }
}

impl TextEmbedder for OnnxEncoder {
    fn source(&self) -> &Path {
        &self.location.graph
    }

    fn setup(&self) -> &EncoderSetup {
        &self.setup
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn fingerprint(&self) -> effir_pipeline::Result<Fingerprint> {
        let graph = fingerprint_file(&self.location.graph)?;
        // External weights live beside the graph.
        let data = self.location.graph.with_extension("onnx_data");
        Ok(if data.is_file() {
            Fingerprint(format!("{}+{}", graph.0, fingerprint_file(&data)?.0))
        } else {
            graph
        })
    }

    /// The output read, the providers registered and the optimization
    /// level: each changes the embeddings (a CUDA run differs from a CPU
    /// run in the last bits), so cached embeddings and corpus shards made
    /// under one are not reused under another.
    fn variant(&self) -> String {
        format!(
            "onnx output={:?} providers={:?} graph_optimization={:?}",
            self.output, self.providers, self.graph_optimization
        )
    }

    fn embed_texts(
        &self,
        texts: &[&str],
        prefix: &str,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> effir_pipeline::Result<Array2<f32>> {
        let mut out = Array2::<f32>::zeros((texts.len(), self.dimension));
        let mut done = 0;
        self.setup.for_each_batch(
            texts,
            prefix,
            batch_size,
            &Device::Cpu,
            &mut |input, chunk| {
                let rows = self.embed_batch(input).map_err(into_pipeline)?;
                for (row, &i) in rows.rows().into_iter().zip(chunk) {
                    out.row_mut(i).assign(&row);
                }
                done += chunk.len();
                progress(done);
                Ok(())
            },
        )?;
        Ok(out)
    }
}

/// The feeds of one padded batch for a graph taking `input_names` (token
/// ids, attention mask, token types: zeros when the tokenizer has none).
pub(crate) fn token_feeds(
    input_names: &[String],
    input: &ModelInput,
) -> Result<Vec<(String, OrtTensor<i64>)>> {
    let (b, t) = input.input_ids.dims2()?;
    let as_i64 = |x: &Tensor| -> Result<Array2<i64>> {
        let v: Vec<u32> = x.flatten_all()?.to_vec1()?;
        Ok(
            Array2::from_shape_vec((b, t), v.into_iter().map(i64::from).collect())
                .expect("batch shape"),
        )
    };
    let mut feeds = Vec::with_capacity(input_names.len());
    for name in input_names {
        let array = match name.as_str() {
            INPUT_IDS => as_i64(&input.input_ids)?,
            ATTENTION_MASK => as_i64(&input.attention_mask)?,
            TOKEN_TYPE_IDS => match &input.token_type_ids {
                Some(types) => as_i64(types)?,
                None => Array2::zeros((b, t)),
            },
            other => {
                return Err(Error::InvalidArgument(format!(
                    "graph input `{other}` is not one the tokenizer produces"
                )))
            }
        };
        let value = OrtTensor::from_array(array)
            .map_err(|e| Error::runtime("creating an input tensor", e))?;
        feeds.push((name.clone(), value));
    }
    Ok(feeds)
}

/// Carries an ONNX error through the pipeline's error type.
pub(crate) fn into_pipeline(error: Error) -> effir_pipeline::Error {
    match error {
        Error::Pipeline(e) => e,
        other => effir_pipeline::Error::InvalidArgument(other.to_string()),
    }
}

/// Checks the graph's inputs and outputs against what the tokenizer
/// produces; returns the inputs to feed and the output to read.
fn check_interface(
    file: &GraphFile,
    setup: &EncoderSetup,
) -> Result<(Vec<String>, EmbeddingOutput)> {
    let mismatch = |message: String| Error::Interface {
        path: file.path().to_path_buf(),
        message,
    };
    let inputs = file.inputs();
    for input in &inputs {
        if !TOKEN_INPUTS.contains(&input.name.as_str()) {
            return Err(mismatch(format!(
                "input `{}` is not one the tokenizer produces (input_ids, attention_mask, token_type_ids)",
                input.name
            )));
        }
        if input.elem_type != DataType::Int64 as i32 {
            return Err(mismatch(format!(
                "input `{}` has element type {}, expected int64",
                input.name,
                DataType::try_from(input.elem_type).map_or("unknown", |t| t.as_str_name())
            )));
        }
    }
    for required in [INPUT_IDS, ATTENTION_MASK] {
        if !inputs.iter().any(|i| i.name == required) {
            return Err(mismatch(format!("the graph has no `{required}` input")));
        }
    }
    let has_token_types = setup.config.checkpoint().embeddings.token_types.is_some();
    if inputs.iter().any(|i| i.name == TOKEN_TYPE_IDS) && !has_token_types {
        return Err(mismatch(format!(
            "the graph takes token_type_ids, but the model in {} is a {} without token types",
            setup.dir.display(),
            setup.architecture()
        )));
    }
    if let Some(exported) = file.metadata("effir.architecture") {
        if exported != setup.architecture().model_type() {
            return Err(mismatch(format!(
                "the graph was exported from a `{exported}` model, but {} holds a `{}`",
                setup.dir.display(),
                setup.architecture().model_type()
            )));
        }
    }
    // The token embedding table must be the tokenizer's model's.
    if let Some(rows) = file.embedding_rows(INPUT_IDS) {
        let vocab = setup.config.vocab_size();
        if vocab != rows {
            return Err(mismatch(format!(
                "the graph's token embedding table has {rows} rows, but the tokenizer's model in {} has a vocabulary of {vocab}",
                setup.dir.display()
            )));
        }
    }
    let outputs = file.outputs();
    let output = if outputs.iter().any(|o| o.name == SENTENCE_EMBEDDING) {
        EmbeddingOutput::Sentence(SENTENCE_EMBEDDING.into())
    } else if outputs.iter().any(|o| o.name == LAST_HIDDEN_STATE) {
        EmbeddingOutput::Hidden(LAST_HIDDEN_STATE.into())
    } else {
        return Err(mismatch(format!(
            "no `{SENTENCE_EMBEDDING}` or `{LAST_HIDDEN_STATE}` output (outputs: {})",
            outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    Ok((inputs.into_iter().map(|i| i.name).collect(), output))
}
