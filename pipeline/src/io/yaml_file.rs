//! Reading YAML files (plans, stage configs) with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses a YAML file into `T`; unknown keys are rejected where
/// `T` says so. A missing file, an I/O error and malformed or unexpected
/// YAML each become an [`Error`] naming `path` and what is wrong.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_yaml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}
