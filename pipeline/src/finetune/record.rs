//! The record of a fine-tuning run (`effir_finetune.json`), written into
//! its output and read back by `rewrite` (to find the original model), and
//! the output directory itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use super::config::FinetuneConfig;
use super::trainer::TrainingOutcome;
use crate::error::{Error, Result};

/// Written with its keys sorted (fields are in that order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneRecord {
    pub config: FinetuneConfig,
    pub effir_version: String,
    pub hard_negatives: Option<PathBuf>,
    pub outcome: TrainingOutcome,
    /// The model the run started from. This and the data paths are relative
    /// to the fine-tuned directory in the file; [`FinetuneRecord::read`]
    /// resolves them.
    pub source_model: PathBuf,
    /// Labeled training data (`--train`), for contrastive and combined runs.
    pub train: Option<PathBuf>,
    /// Unlabeled text (`--train-texts`), for label-free distillation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_texts: Vec<PathBuf>,
}

impl FinetuneRecord {
    /// The record in `dir`, if `dir` is a fine-tuned model, its paths
    /// resolved against `dir` (they are recorded relative to it).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let record: Option<Self> =
            crate::io::json_file::read_json_if_exists(&dir.join(FINETUNE_FILE))?;
        Ok(record.map(|r| r.with_paths(&|p| crate::io::recorded_path::resolve(dir, p))))
    }

    /// The record with every path it holds mapped by `map`.
    fn with_paths(mut self, map: &dyn Fn(&Path) -> PathBuf) -> Self {
        self.source_model = map(&self.source_model);
        self.hard_negatives = self.hard_negatives.as_deref().map(map);
        self.train = self.train.as_deref().map(map);
        self.train_texts = self.train_texts.iter().map(|p| map(p)).collect();
        self
    }

    /// The record as `effir_finetune.json` holds it (sorted keys, pretty, newline).
    pub fn to_json(&self) -> String {
        crate::io::json_file::to_json_document(self)
    }
}

/// Writes the fine-tuned model: `source`'s files, the new weights, and
/// `effir_finetune.json`. The directory appears whole or not at all.
pub fn write_model(
    source: &Path,
    out: &Path,
    weights: &HashMap<String, Tensor>,
    record: &FinetuneRecord,
) -> Result<()> {
    let staging = crate::io::atomic_file::StagedDir::beside(out)?;
    crate::io::model_files::copy_model_files(source, staging.path(), &|name| {
        crate::io::model_files::is_backbone_weights(name) || name == FINETUNE_FILE
    })?;
    let path = staging.path().join(crate::io::weights::WEIGHTS_FILE);
    crate::io::atomic_file::save_safetensors(weights, &path)?;
    // Paths are recorded relative to the output.
    let record = record
        .clone()
        .with_paths(&|p| crate::io::recorded_path::relative_to(out, p));
    let record_path = staging.path().join(FINETUNE_FILE);
    std::fs::write(&record_path, record.to_json()).map_err(|e| Error::io(&record_path, e))?;
    staging.publish(out)
}

/// The record of a fine-tuning run in its output directory.
pub const FINETUNE_FILE: &str = "effir_finetune.json";
