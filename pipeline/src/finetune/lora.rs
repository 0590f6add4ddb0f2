//! LoRA: low-rank adapters beside chosen projection matrices, trained while
//! the matrices stay frozen, and merged into them when the model is saved
//! (`W + (alpha / r) B A`), so the output is a plain model directory.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::sampling::SplitMix64;
use crate::error::{Error, Result};
use crate::model::arch::CheckpointMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    /// Projection name suffixes to adapt, e.g. `query` and `value` for
    /// BERT (a projection the checkpoint map names matches when its name
    /// ends with `.suffix`).
    pub targets: Vec<String>,
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The projections (`prefix.weight` -> `prefix`, as the checkpoint `map`
/// names them) of `tensors` that `settings` targets, sorted.
pub fn target_modules(
    tensors: &HashMap<String, Tensor>,
    map: &CheckpointMap,
    settings: &LoraSettings,
) -> Vec<String> {
    let prefix = map.prefix(tensors.keys());
    let mut modules: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| t.rank() == 2)
        .filter_map(|(name, _)| name.strip_suffix(".weight"))
        .filter(|module| {
            module
                .strip_prefix(prefix)
                .and_then(|m| map.locate_projection(m))
                .is_some()
        })
        .filter(|module| {
            settings
                .targets
                .iter()
                .any(|t| module.ends_with(&format!(".{t}")) || *module == t)
        })
        .map(str::to_string)
        .collect();
    modules.sort();
    modules
}

/// Adds `lora_a` (uniform in ±1/sqrt(in), seeded), `lora_b` (zeros) and
/// `lora_scale` beside every targeted weight; returns the adapter tensor
/// names (what trains).
pub fn add_adapters(
    tensors: &mut HashMap<String, Tensor>,
    map: &CheckpointMap,
    settings: &LoraSettings,
    seed: u64,
) -> Result<Vec<String>> {
    if settings.rank == 0 || !(settings.alpha.is_finite() && settings.alpha > 0.0) {
        return Err(Error::InvalidArgument(
            "lora: rank must be at least 1 and alpha positive".into(),
        ));
    }
    let modules = target_modules(tensors, map, settings);
    if modules.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "lora: no projection matches the targets {:?}",
            settings.targets
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let mut names = Vec::new();
    for module in modules {
        let (out_dim, in_dim) = tensors[&format!("{module}.weight")].dims2()?;
        if settings.rank > in_dim.min(out_dim) {
            return Err(Error::InvalidArgument(format!(
                "lora: rank {} exceeds {module}'s {out_dim}x{in_dim}",
                settings.rank
            )));
        }
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..settings.rank * in_dim)
            .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound)
            .map(|x| x as f32)
            .collect();
        let a = Tensor::from_vec(a, (settings.rank, in_dim), &Device::Cpu)?;
        let b = Tensor::zeros((out_dim, settings.rank), DType::F32, &Device::Cpu)?;
        tensors.insert(format!("{module}.lora_a"), a);
        tensors.insert(format!("{module}.lora_b"), b);
        tensors.insert(
            format!("{module}.lora_scale"),
            Tensor::new(settings.scale() as f32, &Device::Cpu)?,
        );
        names.push(format!("{module}.lora_a"));
        names.push(format!("{module}.lora_b"));
    }
    Ok(names)
}

/// Folds every adapter into its weight and removes the adapter tensors.
pub fn merge_adapters(tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(".lora_a"))
        .map(str::to_string)
        .collect();
    for module in modules {
        let a = tensors.remove(&format!("{module}.lora_a")).expect("listed");
        let b = tensors
            .remove(&format!("{module}.lora_b"))
            .ok_or_else(|| Error::InvalidArgument(format!("lora: {module} has A but no B")))?;
        let scale = tensors
            .remove(&format!("{module}.lora_scale"))
            .map(|s| s.to_scalar::<f32>())
            .transpose()?
            .unwrap_or(1.0) as f64;
        let name = format!("{module}.weight");
        let w = &tensors[&name];
        let merged = (w + (b.matmul(&a)? * scale)?)?;
        tensors.insert(name, merged);
    }
    Ok(())
}
