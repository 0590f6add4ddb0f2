//! Locating and checking the safetensors files of a model directory.
//!
//! A directory holds either one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`. Every file is memory-mapped and its header
//! checked against its length before candle reads from it, so a truncated or
//! corrupt file is reported by name instead of failing deep in a load.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors files of the model in `dir`, checked.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    let files = if single.exists() {
        vec![single]
    } else if index.exists() {
        let shards: ShardIndex = crate::io::json_file::read_json(&index)?;
        let names: BTreeSet<&String> = shards.weight_map.values().collect();
        if names.is_empty() {
            return Err(Error::config(&index, "`weight_map` is empty"));
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    } else if dir.join("pytorch_model.bin").exists() {
        return Err(Error::unsupported(
            dir.join("pytorch_model.bin"),
            "PyTorch pickle weights (convert them to model.safetensors)",
        ));
    } else {
        return Err(Error::MissingFile { path: single });
    };
    for file in &files {
        check_safetensors(file)?;
    }
    Ok(files)
}

/// Checks that `path` is a complete safetensors file: its header parses and
/// every tensor's bytes lie inside the file.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns;
    // effir does not modify weight files while reading them.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// A [`VarBuilder`] over memory-mapped `files`, converting tensors to `dtype`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files were checked by `weight_files`; candle keeps the maps
    // alive as long as the builder. Modifying the files meanwhile is not supported.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|error| Error::weights(files.first().cloned().unwrap_or_default(), error))
}

/// All tensors of the model in `dir`, by name (original dtypes).
pub fn load_all_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::weights(&file, e))?;
        all.extend(tensors);
    }
    Ok(all)
}
