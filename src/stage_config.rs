//! Loading a stage's `configs/*.yaml`.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Reads a YAML stage config; unknown keys are rejected by the target type.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    effir_pipeline::io::yaml_file::read_yaml(path)
        .with_context(|| format!("{}: invalid config", path.display()))
}
