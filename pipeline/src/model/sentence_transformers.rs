//! The sentence-transformers files of a model directory: `modules.json`,
//! `1_Pooling/config.json`, `N_Dense/`, `Normalize`,
//! `sentence_bert_config.json` and `config_sentence_transformers.json`.
//!
//! Reference: sentence-transformers `SentenceTransformer._load_sbert_model`
//! and `models/{Pooling,Dense,Normalize}.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::json_file::{read_json, read_json_if_exists};
use crate::model::pooling::Pooling;

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default = "yes")]
    include_prompt: bool,
    /// sentence-transformers 6 writes one name (or a list) instead of flags.
    #[serde(default)]
    pooling_mode: Option<PoolingModeNames>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PoolingModeNames {
    One(String),
    Many(Vec<String>),
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct SentenceBertFile {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize, Default)]
struct SentenceTransformersFile {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
    #[serde(default)]
    similarity_fn_name: Option<String>,
}

/// A `Dense` module: its directory and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseModule {
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub activation: DenseActivation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseActivation {
    Identity,
    Tanh,
}

#[derive(Deserialize)]
struct DenseFile {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default = "identity")]
    activation_function: String,
}

fn identity() -> String {
    "torch.nn.modules.linear.Identity".into()
}

/// A module applied after pooling, in `modules.json` order.
#[derive(Debug, Clone, PartialEq)]
pub enum PostPooling {
    Dense(DenseModule),
    Normalize,
}

/// How embeddings are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    Cosine,
    Dot,
}

/// Everything the sentence-transformers files say about producing an embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// `None` when the directory has no `modules.json` (a plain HF model).
    pub pooling: Option<Pooling>,
    pub post_pooling: Vec<PostPooling>,
    pub max_seq_length: Option<usize>,
    pub do_lower_case: bool,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    pub similarity: Similarity,
}

impl SentenceConfig {
    /// Reads the sentence-transformers files of `dir`; all are optional.
    pub fn load(dir: &Path) -> Result<Self> {
        let bert: Option<SentenceBertFile> =
            read_json_if_exists(&dir.join("sentence_bert_config.json"))?;
        let st_path = dir.join("config_sentence_transformers.json");
        let st: SentenceTransformersFile = read_json_if_exists(&st_path)?.unwrap_or_default();
        let similarity = match st.similarity_fn_name.as_deref() {
            None | Some("cosine") => Similarity::Cosine,
            Some("dot") | Some("dot_product") => Similarity::Dot,
            Some(other) => {
                return Err(Error::unsupported(
                    &st_path,
                    format!("similarity_fn_name `{other}`"),
                ))
            }
        };
        if let Some(name) = &st.default_prompt_name {
            if !st.prompts.contains_key(name) {
                return Err(Error::config(
                    &st_path,
                    format!("default_prompt_name `{name}` is not among the prompts"),
                ));
            }
        }
        let mut config = Self {
            pooling: None,
            post_pooling: Vec::new(),
            max_seq_length: bert.as_ref().and_then(|b| b.max_seq_length),
            do_lower_case: bert.as_ref().is_some_and(|b| b.do_lower_case),
            prompts: st.prompts,
            default_prompt_name: st.default_prompt_name,
            similarity,
        };
        let modules_path = dir.join("modules.json");
        let Some(modules) = read_json_if_exists::<Vec<ModuleEntry>>(&modules_path)? else {
            return Ok(config);
        };
        for (i, module) in modules.iter().enumerate() {
            let kind = module.kind.rsplit('.').next().unwrap_or(&module.kind);
            let module_dir = dir.join(&module.path);
            // Pooling and Dense modules keep their files in a folder of their own.
            let own_folder = || -> Result<()> {
                let path = Path::new(&module.path);
                let plain = path.components().count() > 0
                    && path
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                if plain {
                    Ok(())
                } else {
                    Err(Error::config(
                        &modules_path,
                        format!(
                            "module #{i} ({kind}) has path `{}`; it must be a folder inside the model directory",
                            module.path
                        ),
                    ))
                }
            };
            let in_module =
                |e: Error| Error::config(&modules_path, format!("module #{i} ({kind}): {e}"));
            match kind {
                "Transformer" if i == 0 => {}
                "Pooling" if i == 1 => {
                    own_folder()?;
                    config.pooling = Some(read_pooling(&module_dir).map_err(in_module)?)
                }
                "Dense" if config.pooling.is_some() => {
                    own_folder()?;
                    config
                        .post_pooling
                        .push(PostPooling::Dense(read_dense(&module_dir).map_err(in_module)?))
                }
                "Normalize" if config.pooling.is_some() => {
                    config.post_pooling.push(PostPooling::Normalize)
                }
                _ => {
                    return Err(Error::unsupported(
                        &modules_path,
                        format!(
                            "module #{i} of type `{}` (effir supports Transformer, Pooling, then Dense and Normalize)",
                            module.kind
                        ),
                    ))
                }
            }
        }
        Ok(config)
    }

    /// The prompt text registered under `name`.
    pub fn prompt(&self, name: &str) -> Result<&str> {
        self.prompts.get(name).map(String::as_str).ok_or_else(|| {
            Error::InvalidArgument(if self.prompts.is_empty() {
                format!("prompt `{name}` requested but the model defines no prompts")
            } else {
                format!(
                    "prompt `{name}` is not defined by the model (available: {})",
                    self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })
        })
    }
}

fn read_pooling(dir: &Path) -> Result<Pooling> {
    let path = dir.join("config.json");
    let file: PoolingFile = read_json(&path)?;
    let mut chosen: Vec<Option<Pooling>> = [
        (file.pooling_mode_cls_token, Some(Pooling::Cls)),
        (file.pooling_mode_mean_tokens, Some(Pooling::Mean)),
        (file.pooling_mode_max_tokens, Some(Pooling::Max)),
        (
            file.pooling_mode_mean_sqrt_len_tokens,
            Some(Pooling::MeanSqrtLen),
        ),
        (file.pooling_mode_lasttoken, Some(Pooling::LastToken)),
        (file.pooling_mode_weightedmean_tokens, None),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, p)| *p)
    .collect();
    let names = match file.pooling_mode {
        None => Vec::new(),
        Some(PoolingModeNames::One(name)) => vec![name],
        Some(PoolingModeNames::Many(names)) => names,
    };
    for name in names {
        chosen.push(match name.as_str() {
            "weightedmean" => None,
            "mean_sqrt_len_tokens" => Some(Pooling::MeanSqrtLen),
            other => Some(
                Pooling::from_name(other)
                    .ok_or_else(|| Error::unsupported(&path, format!("pooling mode `{other}`")))?,
            ),
        });
    }
    if !file.include_prompt {
        return Err(Error::unsupported(&path, "`include_prompt: false`"));
    }
    match chosen.as_slice() {
        [Some(pooling)] => Ok(*pooling),
        [None] => Err(Error::unsupported(&path, "weighted-mean pooling")),
        [] => Err(Error::config(&path, "no pooling mode is enabled")),
        _ => Err(Error::unsupported(
            &path,
            "several pooling modes at once (concatenated)",
        )),
    }
}

fn read_dense(dir: &Path) -> Result<DenseModule> {
    let path = dir.join("config.json");
    let file: DenseFile = read_json(&path)?;
    let activation = match file.activation_function.as_str() {
        "torch.nn.modules.linear.Identity" => DenseActivation::Identity,
        "torch.nn.modules.activation.Tanh" => DenseActivation::Tanh,
        other => {
            return Err(Error::unsupported(
                &path,
                format!("Dense activation `{other}`"),
            ))
        }
    };
    Ok(DenseModule {
        dir: dir.to_path_buf(),
        in_features: file.in_features,
        out_features: file.out_features,
        bias: file.bias,
        activation,
    })
}
