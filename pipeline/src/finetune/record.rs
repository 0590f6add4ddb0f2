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
    /// Whether the paths below are relative to the fine-tuned directory
    /// (records written before effir recorded them so hold them absolute
    /// or relative to where the command ran, and are read as they are).
    #[serde(default)]
    pub paths_relative_to_record: bool,
    /// The model the run started from. This and the data paths are relative
    /// to the fine-tuned directory in the file; [`FinetuneRecord::read`]
    /// resolves them.
    pub source_model: PathBuf,
    /// Labeled training data (`--train`), for contrastive and combined runs.
    pub train: Option<PathBuf>,
    /// Unlabeled text (`--train-texts`), for label-free distillation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_texts: Vec<PathBuf>,
    /// Unlabeled query text (`--train-queries`), for label-free distillation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_queries: Vec<PathBuf>,
    /// The qrels split whose queries a BEIR directory in `train_queries`
    /// gave (`--split`); none when no directory was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_queries_split: Option<String>,
}

impl FinetuneRecord {
    /// The record in `dir`, if `dir` is a fine-tuned model, its paths
    /// resolved against `dir` (they are recorded relative to it).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let record: Option<Self> =
            crate::io::json_file::read_json_if_exists(&dir.join(FINETUNE_FILE))?;
        Ok(record.map(|r| {
            if r.paths_relative_to_record {
                r.with_paths(&|p| crate::io::recorded_path::resolve(dir, p))
            } else {
                r
            }
        }))
    }

    /// The record with every path it holds mapped by `map`.
    fn with_paths(mut self, map: &dyn Fn(&Path) -> PathBuf) -> Self {
        self.source_model = map(&self.source_model);
        self.hard_negatives = self.hard_negatives.as_deref().map(map);
        self.train = self.train.as_deref().map(map);
        self.train_texts = self.train_texts.iter().map(|p| map(p)).collect();
        self.train_queries = self.train_queries.iter().map(|p| map(p)).collect();
        if let Some(d) = self.config.distillation.as_mut() {
            d.teacher = map(&d.teacher);
        }
        if let Some(d) = self.config.embedding_distillation.as_mut() {
            d.teacher = map(&d.teacher);
        }
        if let Some(d) = self.config.dev.as_mut() {
            d.data = map(&d.data);
        }
        self
    }

    /// The recovery recipe, for a model card; data paths relative to `out`.
    pub fn card_section(&self, out: &Path) -> String {
        let relative = |p: &Path| crate::io::recorded_path::display_from(out, p);
        let mut data: Vec<String> = self
            .train
            .iter()
            .map(|p| format!("labeled: `{}`", relative(p)))
            .collect();
        data.extend(
            self.train_texts
                .iter()
                .map(|p| format!("unlabeled text: `{}`", relative(p))),
        );
        data.extend(self.train_queries.iter().map(|p| {
            match (&self.train_queries_split, p.is_dir()) {
                (Some(split), true) => {
                    format!("unlabeled queries: `{}` (split {split})", relative(p))
                }
                _ => format!("unlabeled queries: `{}`", relative(p)),
            }
        }));
        let c = &self.config;
        format!(
            "- objective: {:?}{}\n- data: {}\n- {} epochs, {} steps, batch {} × {} accumulation, learning rate {:e}, seed {}\n- {}\n- final loss {:.4}; {:.0} s ({:.2} examples/s)\n",
            c.objective,
            c.distillation
                .as_ref()
                .map(|d| &d.teacher)
                .or(c.embedding_distillation.as_ref().map(|d| &d.teacher))
                .map_or(String::new(), |t| format!(" (teacher `{}`)", relative(t))),
            if data.is_empty() { "none recorded".into() } else { data.join("; ") },
            c.epochs,
            self.outcome.steps,
            c.batch_size,
            c.gradient_accumulation,
            c.learning_rate,
            c.seed,
            if c.lora.is_some() { "LoRA adapters, merged" } else { "full fine-tuning" },
            self.outcome.final_loss,
            self.outcome.seconds,
            self.outcome.examples_per_second,
        )
    }

    /// The record as `effir_finetune.json` holds it (sorted keys, pretty, newline).
    pub fn to_json(&self) -> String {
        crate::io::json_file::to_json_document(self)
    }
}

/// Writes the fine-tuned model: `source`'s files, the new weights,
/// `effir_finetune.json`, the training log (`train_log`, when given), and
/// what `transformers` needs to load it. The directory appears whole or not at all.
pub fn write_model(
    source: &Path,
    out: &Path,
    weights: &HashMap<String, Tensor>,
    record: &FinetuneRecord,
    train_log: Option<&Path>,
) -> Result<()> {
    let staging = crate::io::atomic_file::StagedDir::beside(out)?;
    crate::io::model_files::copy_model_files(source, staging.path(), &|name| {
        crate::io::model_files::is_backbone_weights(name)
            || name == FINETUNE_FILE
            || name == TRAIN_LOG_FILE
    })?;
    if let Some(log) = train_log {
        let to = staging.path().join(TRAIN_LOG_FILE);
        std::fs::copy(log, &to).map_err(|e| Error::io(log, e))?;
    }
    let path = staging.path().join(crate::io::weights::WEIGHTS_FILE);
    crate::io::atomic_file::save_safetensors(weights, &path)?;
    // The source's loading code is copied; written anew, it is current and
    // also covers sources pruned before effir wrote it.
    let config = crate::model::arch::ModelConfig::from_file(&staging.path().join("config.json"))?;
    let shape = crate::model::shape::ModelShape::load_or(staging.path(), config.described_shape())?;
    crate::io::transformers_loading::write_loading_files(
        staging.path(),
        config.architecture(),
        &shape,
    )?;
    // Paths are recorded relative to the output.
    let mut recorded = record
        .clone()
        .with_paths(&|p| crate::io::recorded_path::relative_to(out, p));
    recorded.paths_relative_to_record = true;
    let record_path = staging.path().join(FINETUNE_FILE);
    std::fs::write(&record_path, recorded.to_json()).map_err(|e| Error::io(&record_path, e))?;
    card(staging.path(), source, out, record)?;
    staging.publish(out)
}

/// The record of a fine-tuning run in its output directory.
pub const FINETUNE_FILE: &str = "effir_finetune.json";
/// The training log (one JSON line per step) in the output directory.
pub const TRAIN_LOG_FILE: &str = "train_log.jsonl";

/// The fine-tuned directory's model card: how it was pruned (when its
/// source was) and recovered (`record`, its paths as given).
fn card(dir: &Path, source: &Path, out: &Path, record: &FinetuneRecord) -> Result<()> {
    use crate::io::model_card::{command_line, ModelCard};
    let pruned = crate::compress::prune::PruneRecord::read(dir)?;
    let name = out
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let mut card = ModelCard::new(format!(
        "{name}: {}fine-tuned by effir",
        if pruned.is_some() { "pruned and " } else { "" }
    ));
    if let Some(pruned) = &pruned {
        card = card.section("Pruning", pruned.card_section());
    }
    if dir.join("prune_report.md").is_file() {
        card = card.section(
            "Parameters and FLOPs",
            "Before and after pruning: `prune_report.md`.",
        );
    }
    card.section("Recovery", record.card_section(out))
        .section("Precision", "float32 safetensors (`model.safetensors`).")
        .section(
            "Loading in transformers",
            crate::io::transformers_loading::read_loading_form(dir)?.describe(),
        )
        .section("Made with", format!("```sh\n{}\n```", command_line(out)))
        .write(dir, source, out)
}
