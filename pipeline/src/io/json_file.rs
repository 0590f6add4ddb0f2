//! Reading JSON files with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses a JSON file; a missing file, an I/O error and malformed
/// JSON each become an [`Error`] naming `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })
}

/// Like [`read_json`], but a missing file is `Ok(None)`.
pub fn read_json_if_exists<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Deserializes `T` from `value`, a JSON document read from `path`.
pub fn from_value<T: DeserializeOwned>(path: &Path, value: &serde_json::Value) -> Result<T> {
    T::deserialize(value).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })
}

/// `value` as effir writes its JSON records: keys sorted (through
/// `serde_json::Value`, whatever the field order), pretty, a final newline.
pub fn to_json_document<T: serde::Serialize>(value: &T) -> String {
    let value = serde_json::to_value(value).expect("effir's records serialise to JSON");
    format!(
        "{}\n",
        serde_json::to_string_pretty(&value).expect("a JSON value prints")
    )
}
