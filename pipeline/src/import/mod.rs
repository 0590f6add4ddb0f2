//! Importing models from other formats into a Hugging Face directory every
//! effir stage reads.
//!
//! - [`gguf_file`]: llama.cpp's GGUF container, checked and dequantized;
//! - [`gguf_model`]: its architecture as `config.json` and checkpoint names;
//! - [`gguf_tokenizer`]: its tokenizer metadata as `tokenizer.json`.
//!
//! [`import_gguf`] writes the directory into a staging directory and
//! renames it into place only when every file is written: a failure leaves
//! nothing behind.

pub mod gguf_file;
pub mod gguf_model;
pub mod gguf_tokenizer;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::embedding_cache::fingerprint_file;
use crate::io::atomic_file::{save_safetensors, write_bytes_atomically, StagedDir};
use crate::io::json_file::to_json_document;
use crate::io::weights::WEIGHTS_FILE;
use gguf_file::GgufFile;
use gguf_model::{check_tensors, unpermute_rows, GgufModel};
use gguf_tokenizer::GgufTokenizer;

/// The record an import writes beside the model.
pub const IMPORT_RECORD_FILE: &str = "effir_import.json";

/// The floating-point type the imported weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl WeightDType {
    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// What was imported, written as `effir_import.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The GGUF file's name (not its path: records hold no machine paths).
    pub source: String,
    pub source_blake3: String,
    pub gguf_version: u32,
    pub architecture: String,
    pub tensors: usize,
    /// How many tensors were stored in each GGUF type.
    pub source_types: BTreeMap<String, usize>,
    pub dtype: WeightDType,
    /// Query and key projections whose llama.cpp rotary permutation was undone.
    pub unpermuted: usize,
    pub tied_embeddings: bool,
    pub pre_tokenizer: String,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub command: String,
}

/// Options of [`import_gguf`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub dtype: WeightDType,
    /// The command line recorded in `effir_import.json`.
    pub command: String,
}

/// Reads and checks `gguf_path` completely, then writes the Hugging Face
/// directory `out` (which must not exist): `config.json`,
/// `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
/// `effir_import.json`.
pub fn import_gguf(gguf_path: &Path, out: &Path, options: &ImportOptions) -> Result<ImportRecord> {
    let gguf = GgufFile::open(gguf_path)?;
    let model = GgufModel::read(&gguf)?;
    check_tensors(&gguf, &model)?;
    let tokenizer = GgufTokenizer::read(&gguf, model.context_length)?;

    let staged = StagedDir::beside(out)?;
    let dir = staged.path();
    let mut weights: HashMap<String, Tensor> = HashMap::with_capacity(gguf.tensors.len());
    let mut source_types = BTreeMap::new();
    let mut unpermuted = 0;
    for info in &gguf.tensors {
        let target = model.target(&info.name).expect("checked by check_tensors");
        let mut values = gguf.dequantize(info)?;
        if let Some(heads) = target.unpermute_heads {
            values = unpermute_rows(&values, info, heads);
            unpermuted += 1;
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::config(
                gguf_path,
                format!(
                    "tensor `{}` ({}) holds a non-finite value at element {i}",
                    info.name, info.ty
                ),
            ));
        }
        let tensor = Tensor::from_vec(values, info.dims.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(options.dtype.candle()))
            .map_err(|e| Error::weights(gguf_path, e))?;
        weights.insert(target.name, tensor);
        *source_types.entry(info.ty.name().to_string()).or_insert(0) += 1;
    }
    save_safetensors(&weights, &dir.join(WEIGHTS_FILE))?;
    drop(weights);

    let config = model.config_json(&tokenizer.special, options.dtype.torch_name());
    let record = ImportRecord {
        source: gguf_path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        source_blake3: fingerprint_file(gguf_path)?.0,
        gguf_version: gguf.version,
        architecture: model.architecture.name().to_string(),
        tensors: gguf.tensors.len(),
        source_types,
        dtype: options.dtype,
        unpermuted,
        tied_embeddings: model.tied_embeddings,
        pre_tokenizer: tokenizer.pre.clone(),
        add_bos_token: tokenizer.add_bos,
        add_eos_token: tokenizer.add_eos,
        command: options.command.clone(),
    };
    for (name, document) in [
        ("config.json", to_json_document(&config)),
        ("tokenizer.json", tokenizer.tokenizer.to_string()),
        ("tokenizer_config.json", to_json_document(&tokenizer.config)),
        (IMPORT_RECORD_FILE, to_json_document(&record)),
    ] {
        write_bytes_atomically(&dir.join(name), document.as_bytes())?;
    }
    staged.publish(out)?;
    Ok(record)
}
