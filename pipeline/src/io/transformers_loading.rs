//! How `transformers` and sentence-transformers load a directory effir
//! pruned or fine-tuned.
//!
//! A Hugging Face `config.json` describes a uniform stack, so a pruned
//! model whose layers have their own MLP widths, or none, does not fit the
//! source architecture's classes. Such a directory gets what EffiR's own
//! checkpoints, LLM-Drop and DeciLM ship: a configuration and a model
//! class of its own (`configuration_effir_<type>.py`,
//! `modeling_effir_<type>.py`) that extend the source architecture's
//! `transformers` classes, `auto_map` pointing at them, and the per-layer
//! widths in `config.json` as `effir_intermediate_sizes` (`null` for a
//! dropped MLP). `AutoModel.from_pretrained(dir, trust_remote_code=True)`
//! and `SentenceTransformer(dir, trust_remote_code=True)` then build the
//! model effir computes.
//!
//! A model that the source architecture's config can express exactly (no
//! MLP dropped, every MLP the same width) gets a plain `config.json`
//! instead, with `intermediate_size` set to that width, and loads without
//! remote code.
//!
//! The code is generated from the architecture's [`CheckpointMap`]: module
//! paths (the layer list, the MLP modules) and the norms a dropped MLP
//! sub-layer takes along come from there, so there is one description of
//! each checkpoint.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::arch::{Architecture, CheckpointMap};
use crate::model::shape::ModelShape;

pub use crate::model::shape::CONFIG_WIDTHS_KEY as WIDTHS_KEY;

/// Whether an `auto_map` target (`module.Class`) names effir's code.
fn is_effir_code(target: &str) -> bool {
    target.starts_with("configuration_effir_") || target.starts_with("modeling_effir_")
}

const CONFIGURATION_TEMPLATE: &str = include_str!("transformers_loading/configuration.py");
const BERT_TEMPLATE: &str = include_str!("transformers_loading/modeling_bert.py");
const DECODER_TEMPLATE: &str = include_str!("transformers_loading/modeling_decoder.py");

/// How a written directory loads in `transformers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadingForm {
    /// The source architecture's own classes read `config.json` as written.
    Plain,
    /// `trust_remote_code=True` with the code files named here.
    RemoteCode {
        configuration_file: String,
        modeling_file: String,
    },
}

impl LoadingForm {
    /// One line for a model card.
    pub fn describe(&self) -> String {
        match self {
            Self::Plain => "`transformers` and sentence-transformers load it as the source \
                            architecture (no remote code): every MLP has the same width."
                .into(),
            Self::RemoteCode { modeling_file, .. } => format!(
                "Layers differ in MLP width or lack their MLP, which the source architecture's \
                 config cannot express: `AutoModel.from_pretrained(path, trust_remote_code=True)` \
                 and `SentenceTransformer(path, trust_remote_code=True)` load it with \
                 `{modeling_file}` (per-layer widths: `{WIDTHS_KEY}` in `config.json`)."
            ),
        }
    }
}

/// How the model directory `dir` loads, from its `config.json`.
pub fn read_loading_form(dir: &Path) -> Result<LoadingForm> {
    let config: Map<String, Value> = crate::io::json_file::read_json(&dir.join("config.json"))?;
    let target = |key: &str| {
        config
            .get("auto_map")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .filter(|t| is_effir_code(t))
            .map(|t| format!("{}.py", t.rsplit_once('.').map_or(t, |(m, _)| m)))
    };
    Ok(match (target("AutoConfig"), target("AutoModel")) {
        (Some(configuration_file), Some(modeling_file)) => LoadingForm::RemoteCode {
            configuration_file,
            modeling_file,
        },
        _ => LoadingForm::Plain,
    })
}

/// Makes the model directory `dir` (its `config.json` and `effir_shape.json`
/// already written, the latter as `shape`) loadable by `transformers`:
/// rewrites `config.json` and writes or removes the code files. Earlier
/// effir code and keys (a pruned model pruned again, a fine-tuned copy) are
/// replaced.
pub fn write_loading_files(
    dir: &Path,
    architecture: Architecture,
    shape: &ModelShape,
) -> Result<LoadingForm> {
    let config_path = dir.join("config.json");
    let original: Map<String, Value> = crate::io::json_file::read_json(&config_path)?;
    let mut config = original.clone();
    let files = CodeFiles::new(architecture);
    for stale in [&files.configuration_file, &files.modeling_file] {
        match std::fs::remove_file(dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir.join(stale), e)),
        }
    }
    config.remove(WIDTHS_KEY);
    if let Some(Value::Object(auto_map)) = config.get_mut("auto_map") {
        auto_map.retain(|_, target| !target.as_str().is_some_and(is_effir_code));
        if auto_map.is_empty() {
            config.remove("auto_map");
        }
    }
    let widths: Vec<Option<usize>> = shape
        .layers
        .iter()
        .map(|l| l.mlp.map(|m| m.intermediate_size))
        .collect();
    let form = match uniform_width(&widths) {
        Some(width) => {
            config.insert("intermediate_size".into(), width.into());
            LoadingForm::Plain
        }
        None => {
            config.insert(WIDTHS_KEY.into(), serde_json::json!(widths));
            let auto_map = config
                .entry("auto_map")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(auto_map) = auto_map {
                auto_map.insert("AutoConfig".into(), files.config_reference().into());
                auto_map.insert("AutoModel".into(), files.model_reference().into());
            }
            for (name, text) in [
                (&files.configuration_file, files.configuration_code()),
                (&files.modeling_file, files.modeling_code(architecture)),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            }
            LoadingForm::RemoteCode {
                configuration_file: files.configuration_file.clone(),
                modeling_file: files.modeling_file.clone(),
            }
        }
    };
    if config != original {
        let text = crate::io::json_file::to_json_document(&config);
        std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    }
    Ok(form)
}

/// The one width every layer's MLP has, if none is dropped.
fn uniform_width(widths: &[Option<usize>]) -> Option<usize> {
    let first = (*widths.first()?)?;
    widths.iter().all(|w| *w == Some(first)).then_some(first)
}

/// The names of an architecture's code files and classes.
struct CodeFiles {
    base_config: &'static str,
    base_model: &'static str,
    configuration_file: String,
    modeling_file: String,
}

impl CodeFiles {
    fn new(architecture: Architecture) -> Self {
        let (base_config, base_model) = architecture.transformers_classes();
        let model_type = architecture.model_type();
        Self {
            base_config,
            base_model,
            configuration_file: format!("configuration_effir_{model_type}.py"),
            modeling_file: format!("modeling_effir_{model_type}.py"),
        }
    }

    fn config_class(&self) -> String {
        format!("Effir{}", self.base_config)
    }

    fn model_class(&self) -> String {
        format!("Effir{}", self.base_model)
    }

    fn module(file: &str) -> &str {
        file.trim_end_matches(".py")
    }

    fn config_reference(&self) -> String {
        format!(
            "{}.{}",
            Self::module(&self.configuration_file),
            self.config_class()
        )
    }

    fn model_reference(&self) -> String {
        format!(
            "{}.{}",
            Self::module(&self.modeling_file),
            self.model_class()
        )
    }

    fn substitute(&self, template: &str, extra: &[(&str, String)]) -> String {
        let mut text = template.to_string();
        let common = [
            ("EFFIR_VERSION", env!("CARGO_PKG_VERSION").to_string()),
            ("BASE_CONFIG", self.base_config.to_string()),
            ("BASE_MODEL", self.base_model.to_string()),
            ("CONFIG_CLASS", self.config_class()),
            ("MODEL_CLASS", self.model_class()),
            (
                "CONFIGURATION_MODULE",
                Self::module(&self.configuration_file).to_string(),
            ),
        ];
        for (key, value) in common.iter().chain(extra) {
            text = text.replace(&format!("{{{{{key}}}}}"), value);
        }
        debug_assert!(!text.contains("{{"), "a placeholder is left:\n{text}");
        text
    }

    fn configuration_code(&self) -> String {
        self.substitute(CONFIGURATION_TEMPLATE, &[])
    }

    fn modeling_code(&self, architecture: Architecture) -> String {
        let map = architecture.checkpoint();
        let module = |path: &str| path.split('.').next().unwrap_or(path).to_string();
        if architecture.is_decoder() {
            let norms = mlp_norms(map);
            self.substitute(
                DECODER_TEMPLATE,
                &[
                    ("LAYERS", map.layers.to_string()),
                    ("MLP_MODULE", module(map.mlp.up)),
                    (
                        "MLP_NORMS",
                        format!(
                            "[{}]",
                            norms
                                .iter()
                                .map(|n| format!("\"{n}\""))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                    (
                        "MLP_NORMS_TEXT",
                        norms
                            .iter()
                            .map(|n| format!("``{n}``"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ],
            )
        } else {
            self.substitute(
                BERT_TEMPLATE,
                &[
                    ("LAYERS", map.layers.to_string()),
                    ("INTERMEDIATE_MODULE", module(map.mlp.up)),
                    ("OUTPUT_MODULE", module(map.mlp.down)),
                ],
            )
        }
    }
}

/// The norms of a pre-norm decoder's MLP sub-layer (input, and Gemma's
/// output norm), which a dropped sub-layer takes along.
fn mlp_norms(map: &CheckpointMap) -> Vec<&'static str> {
    [map.mlp.norms.input, map.mlp.norms.output]
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stack_of_equal_widths_is_plain() {
        assert_eq!(uniform_width(&[Some(8), Some(8)]), Some(8));
        assert_eq!(uniform_width(&[Some(8), Some(4)]), None);
        assert_eq!(uniform_width(&[Some(8), None]), None);
        assert_eq!(uniform_width(&[None, None]), None);
    }

    #[test]
    fn every_placeholder_is_filled_for_every_architecture() {
        for architecture in Architecture::ALL {
            let files = CodeFiles::new(architecture);
            for code in [
                files.configuration_code(),
                files.modeling_code(architecture),
            ] {
                assert!(!code.contains("{{"), "{architecture}:\n{code}");
            }
        }
    }

    #[test]
    fn gemma_drops_both_mlp_norms_and_llama_its_pre_norm() {
        let quoted = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let gemma_map = Architecture::Gemma3.checkpoint();
        let gemma = CodeFiles::new(Architecture::Gemma3).modeling_code(Architecture::Gemma3);
        let both = [
            gemma_map.mlp.norms.input.unwrap(),
            gemma_map.mlp.norms.output.unwrap(),
        ];
        assert!(
            gemma.contains(&format!("MLP_NORMS = [{}]", quoted(&both))),
            "{gemma}"
        );
        let llama_map = Architecture::Llama.checkpoint();
        let llama = CodeFiles::new(Architecture::Llama).modeling_code(Architecture::Llama);
        let pre = [llama_map.mlp.norms.input.unwrap()];
        assert!(
            llama.contains(&format!("MLP_NORMS = [{}]", quoted(&pre))),
            "{llama}"
        );
        assert!(llama.contains(&format!("LAYERS = \"{}\"", llama_map.layers)));
        let bert_map = Architecture::Bert.checkpoint();
        let bert = CodeFiles::new(Architecture::Bert).modeling_code(Architecture::Bert);
        assert!(bert.contains(&format!("LAYERS = \"{}\"", bert_map.layers)));
        assert!(!bert.contains("MLP_NORMS"));
    }
}
