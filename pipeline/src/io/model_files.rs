//! Copying a model directory's files (tokenizer, configs,
//! sentence-transformers modules) into a new model or export directory.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::weights::{WEIGHTS_FILE, WEIGHTS_INDEX_FILE};

/// Whether a top-level file name holds backbone weights (single, sharded
/// or PyTorch pickle).
pub fn is_backbone_weights(name: &str) -> bool {
    name == WEIGHTS_FILE
        || name == WEIGHTS_INDEX_FILE
        || name == "pytorch_model.bin"
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Copies `source` into `dest` recursively, except the top-level entries
/// `skip_top` names (sentence-transformers module folders keep their own
/// weights).
pub fn copy_model_files(source: &Path, dest: &Path, skip_top: &dyn Fn(&str) -> bool) -> Result<()> {
    copy_tree(source, dest, Some(skip_top))
}

fn copy_tree(source: &Path, dest: &Path, skip: Option<&dyn Fn(&str) -> bool>) -> Result<()> {
    for entry in std::fs::read_dir(source).map_err(|e| Error::io(source, e))? {
        let entry = entry.map_err(|e| Error::io(source, e))?;
        let name = entry.file_name();
        if skip.is_some_and(|skip| skip(&name.to_string_lossy())) {
            continue;
        }
        let from = entry.path();
        let to = dest.join(&name);
        if from.is_dir() {
            std::fs::create_dir_all(&to).map_err(|e| Error::io(&to, e))?;
            copy_tree(&from, &to, None)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}
