//! Loading a stage's `configs/*.yaml`.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Reads a YAML stage config; unknown keys are rejected by the target type.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read config", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
}
