//! Turning texts into padded token batches the way sentence-transformers does:
//! prompt prepended, whitespace stripped, optional lower-casing, truncation to
//! the model's maximum length, EOS appended for last-token pooling, padding on
//! the side the tokenizer declares.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Error, Result};
use crate::io::json_file::read_json_if_exists;
use crate::model::arch::ModelInput;

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

/// The token ids of one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedText {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl EncodedText {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Settings of a [`TextEncoder`] beyond the tokenizer file.
#[derive(Debug, Clone)]
pub struct TextEncoderSettings {
    pub max_length: usize,
    pub lowercase: bool,
    /// Append this token when a sequence does not already end with it.
    pub append_eos: Option<u32>,
    /// Overrides the padding side the tokenizer files declare.
    pub padding_side: Option<PaddingSide>,
    pub pad_id: u32,
    /// Whether the backbone takes `token_type_ids` (BERT).
    pub token_type_ids: bool,
}

#[derive(Deserialize)]
struct TokenizerConfigFile {
    #[serde(default)]
    padding_side: Option<String>,
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// How a `tokenizer.json` written by [`TextEncoder::save_serving_tokenizer`]
/// encodes, and what it cannot express (recorded beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServingTokenizer {
    /// Truncation length: the length effir encodes and validates at.
    pub max_length: usize,
    /// Always `batch-longest`: each batch padded to its longest text.
    pub padding: &'static str,
    pub padding_side: &'static str,
    pub pad_id: u32,
    /// A token effir appends when a text does not end with it (last-token
    /// pooling); tokenizer.json cannot express it, clients must.
    pub append_eos: Option<u32>,
    /// Whether texts are lower-cased before tokenizing (likewise).
    pub lowercase: bool,
}

/// A tokenizer with the model's encoding settings.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    settings: TextEncoderSettings,
    padding_side: PaddingSide,
}

/// `model_max_length` of `tokenizer_config.json`, when it is a real limit
/// (transformers writes a huge sentinel when there is none).
pub fn tokenizer_max_length(dir: &Path) -> Result<Option<usize>> {
    let file: Option<TokenizerConfigFile> =
        read_json_if_exists(&dir.join("tokenizer_config.json"))?;
    Ok(file
        .and_then(|f| f.model_max_length)
        .filter(|n| (1.0..1e9).contains(n))
        .map(|n| n as usize))
}

impl TextEncoder {
    /// Loads `dir/tokenizer.json` (and the padding side from
    /// `tokenizer_config.json`).
    pub fn load(dir: &Path, settings: TextEncoderSettings) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::MissingFile { path });
        }
        let limit = crate::io::input_limits::limits().max_tokenizer_bytes;
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if size > limit {
            return Err(Error::Tokenizer {
                path,
                message: format!(
                    "{} bytes, over the {} limit for a tokenizer (raise it with --max-tokenizer-mb)",
                    size,
                    crate::io::input_limits::megabytes(limit)
                ),
            });
        }
        // The tokenizers crate panics on some malformed files (an untagged
        // decoder it cannot read): those are errors naming the file too.
        let mut tokenizer = catch_quietly(|| Tokenizer::from_file(&path))
            .map_err(|_| Error::Tokenizer {
                path: path.clone(),
                message:
                    "not a tokenizer file the tokenizers library can read (it crashed parsing it)"
                        .into(),
            })?
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if settings.max_length == 0 {
            return Err(Error::InvalidArgument(
                "max length must be at least 1".into(),
            ));
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: settings.max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        // The tokenizers crate accepts some inconsistent files (a template
        // naming a special token it does not define) and panics on the
        // first encoding: try one here, so such a file is an error naming it.
        let probe = catch_quietly(std::panic::AssertUnwindSafe(|| {
            tokenizer.encode("a", true).map(|_| ())
        }));
        match probe {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Tokenizer {
                    path,
                    message: format!("cannot encode a text: {e}"),
                })
            }
            Err(_) => {
                return Err(Error::Tokenizer {
                    path,
                    message: "the tokenizer crashes on encoding a text (an inconsistent \
                              post-processor or vocabulary?)"
                        .into(),
                })
            }
        }
        let config_path = dir.join("tokenizer_config.json");
        let declared = read_json_if_exists::<TokenizerConfigFile>(&config_path)?
            .and_then(|c| c.padding_side)
            .map(|side| match side.as_str() {
                "left" => Ok(PaddingSide::Left),
                "right" => Ok(PaddingSide::Right),
                other => Err(Error::config(
                    &config_path,
                    format!("padding_side `{other}`"),
                )),
            })
            .transpose()?;
        let padding_side = settings
            .padding_side
            .or(declared)
            .unwrap_or(PaddingSide::Right);
        Ok(Self {
            tokenizer,
            settings,
            padding_side,
        })
    }

    /// Writes the tokenizer as effir encodes with it: truncation at
    /// [`Self::max_length`], padding per batch to the longest text on the
    /// model's side with its pad id, so that clients reading `tokenizer.json`
    /// alone (fastembed, text-embeddings-inference, Rust `tokenizers`)
    /// encode what `effir validate` measured, not the source file's settings;
    /// `tokenizer_config.json` beside it gets the same `model_max_length`.
    pub fn save_serving_tokenizer(&self, path: &Path) -> Result<ServingTokenizer> {
        let mut tokenizer = self.tokenizer.clone();
        let pad_token = tokenizer
            .id_to_token(self.settings.pad_id)
            .unwrap_or_default();
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: match self.padding_side {
                PaddingSide::Left => PaddingDirection::Left,
                PaddingSide::Right => PaddingDirection::Right,
            },
            pad_to_multiple_of: None,
            pad_id: self.settings.pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        let json = tokenizer.to_string(true).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::io::atomic_file::write_bytes_atomically(path, json.as_bytes())?;
        // Clients that read tokenizer_config.json (transformers, fastembed)
        // truncate at its model_max_length: the same length.
        let config_path = path.with_file_name("tokenizer_config.json");
        let mut config: serde_json::Map<String, serde_json::Value> =
            read_json_if_exists(&config_path)?.unwrap_or_default();
        config.insert("model_max_length".into(), self.settings.max_length.into());
        if config.contains_key("max_length") {
            config.insert("max_length".into(), self.settings.max_length.into());
        }
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::config(&config_path, e.to_string()))?;
        crate::io::atomic_file::write_bytes_atomically(&config_path, (text + "\n").as_bytes())?;
        Ok(ServingTokenizer {
            max_length: self.settings.max_length,
            padding: "batch-longest",
            padding_side: match self.padding_side {
                PaddingSide::Left => "left",
                PaddingSide::Right => "right",
            },
            pad_id: self.settings.pad_id,
            append_eos: self.settings.append_eos,
            lowercase: self.settings.lowercase,
        })
    }

    pub fn max_length(&self) -> usize {
        self.settings.max_length
    }

    pub fn padding_side(&self) -> PaddingSide {
        self.padding_side
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes `prefix + text` for every text.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S], prefix: &str) -> Result<Vec<EncodedText>> {
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                let joined = format!("{prefix}{}", t.as_ref());
                let stripped = joined.trim();
                if self.settings.lowercase {
                    stripped.to_lowercase()
                } else {
                    stripped.to_string()
                }
            })
            .collect();
        let encodings =
            self.tokenizer
                .encode_batch(inputs, true)
                .map_err(|e| Error::Tokenization {
                    message: e.to_string(),
                })?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let mut text = EncodedText {
                    ids: e.get_ids().to_vec(),
                    type_ids: e.get_type_ids().to_vec(),
                };
                if let Some(eos) = self.settings.append_eos {
                    if text.ids.last() != Some(&eos) {
                        if text.ids.len() >= self.settings.max_length {
                            text.ids.truncate(self.settings.max_length - 1);
                            text.type_ids.truncate(self.settings.max_length - 1);
                        }
                        text.ids.push(eos);
                        text.type_ids.push(0);
                    }
                }
                text
            })
            .collect())
    }

    /// Pads `texts` to their longest into one batch.
    pub fn batch(&self, texts: &[&EncodedText], device: &Device) -> Result<ModelInput> {
        let b = texts.len();
        let t = texts.iter().map(|x| x.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.settings.pad_id; b * t];
        let mut mask = vec![0u32; b * t];
        let mut types = vec![0u32; b * t];
        for (row, text) in texts.iter().enumerate() {
            let offset = match self.padding_side {
                PaddingSide::Right => 0,
                PaddingSide::Left => t - text.len(),
            };
            let start = row * t + offset;
            ids[start..start + text.len()].copy_from_slice(&text.ids);
            types[start..start + text.len()].copy_from_slice(&text.type_ids);
            mask[start..start + text.len()].fill(1);
        }
        Ok(ModelInput {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            token_type_ids: if self.settings.token_type_ids {
                Some(Tensor::from_vec(types, (b, t), device)?)
            } else {
                None
            },
        })
    }
}

thread_local! {
    /// Set while [`catch_quietly`] runs its closure on this thread.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind`, without the panic message and backtrace the panic hook
/// would print first: a panic caught here becomes an error that names the
/// file, and that error is the whole report. Panics anywhere else still
/// go to the hook that was installed before (the default one, normally).
fn catch_quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> std::thread::Result<R> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    CATCHING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(f);
    CATCHING.with(|c| c.set(false));
    result
}
