//! A `tokenizer.json` (Hugging Face `tokenizers`) and `tokenizer_config.json`
//! built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Handled: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the
//! pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` that the
//! supported models use. Each is written as llama.cpp splits text
//! (`llama-vocab.cpp`): `smollm` splits every digit, then applies GPT-2's
//! pattern; `qwen2` and `llama-bpe` split with their own patterns;
//! `default`/`gpt2` use GPT-2's. Control tokens (type 3) become special
//! added tokens, user-defined ones (type 4) plain added tokens, so neither
//! is cut into pieces. BOS/EOS are added as `tokenizer.ggml.add_bos_token`
//! / `add_eos_token` say.

use serde_json::{json, Map, Value};

use super::gguf_file::{GgufFile, MetadataValue};
use super::gguf_model::SpecialTokenIds;
use crate::error::{Error, Result};
use crate::model::byte_level::byte_alphabet;

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer names effir builds.
pub const SUPPORTED_PRE: &str = "default, gpt2, smollm, qwen2, llama-bpe, llama3";

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// What the tokenizer metadata holds.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json`.
    pub config: Value,
    pub special: SpecialTokenIds,
    pub pre: String,
    pub add_bos: bool,
    pub add_eos: bool,
}

fn strings<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let values = gguf
        .require(key)?
        .as_array()
        .ok_or_else(|| Error::config(gguf.path(), format!("`{key}` is not an array")))?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| {
                Error::config(gguf.path(), format!("`{key}` entry {i} is not a string"))
            })
        })
        .collect()
}

fn token_id(gguf: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    let Some(value) = gguf.metadata.get(key) else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
        _ => Err(Error::config(
            gguf.path(),
            format!("`{key}` is {value:?}, not a token id below {vocab}"),
        )),
    }
}

impl GgufTokenizer {
    pub fn read(gguf: &GgufFile, model_max_length: usize) -> Result<Self> {
        let path = gguf.path();
        let model = gguf.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::unsupported(
                path,
                format!("tokenizer model `{model}` (`tokenizer.ggml.model`; effir builds byte-level BPE, `gpt2`)"),
            ));
        }
        let pre = match gguf.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v.as_str().unwrap_or("").to_string(),
            None => "default".to_string(),
        };
        let pre_tokenizer = match pre.as_str() {
            "default" | "gpt2" => byte_level(true),
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            "qwen2" => split_then_bytes(QWEN2_SPLIT),
            "llama-bpe" | "llama3" | "llama-v3" => split_then_bytes(LLAMA3_SPLIT),
            other => {
                return Err(Error::unsupported(
                    path,
                    format!(
                    "pre-tokenizer `{other}` (`tokenizer.ggml.pre`; effir builds {SUPPORTED_PRE})"
                ),
                ))
            }
        };

        let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
        let vocab_size = tokens.len();
        let types: Vec<i64> = match gguf.metadata.get("tokenizer.ggml.token_type") {
            Some(MetadataValue::Array(values)) => values
                .iter()
                .map(|v| match v {
                    MetadataValue::I32(t) => Ok(*t as i64),
                    other => other.as_u64().map(|t| t as i64).ok_or(()),
                })
                .collect::<std::result::Result<_, ()>>()
                .map_err(|_| {
                    Error::config(path, "`tokenizer.ggml.token_type` holds a non-integer")
                })?,
            Some(_) => {
                return Err(Error::config(
                    path,
                    "`tokenizer.ggml.token_type` is not an array",
                ))
            }
            None => vec![1; vocab_size],
        };
        if types.len() != vocab_size {
            return Err(Error::config(
                path,
                format!(
                    "{} token types for {vocab_size} tokens (`tokenizer.ggml.token_type` and `tokenizer.ggml.tokens` disagree)",
                    types.len()
                ),
            ));
        }
        let alphabet = byte_alphabet();
        let spelled: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        let mut vocab = Map::new();
        for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
            // Tokens the converter wrote in plain text are respelled in the
            // byte alphabet, as the vocabulary's other tokens are; control
            // and user-defined tokens are matched whole as added tokens and
            // keep their text.
            let added = *ty == CONTROL || *ty == USER_DEFINED;
            let key = if added || token.chars().all(|c| spelled.contains(&c)) {
                (*token).to_string()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            };
            if vocab.insert(key, json!(id)).is_some() {
                return Err(Error::config(
                    path,
                    format!("token {id} `{token}` appears twice in `tokenizer.ggml.tokens`"),
                ));
            }
        }
        let merges: Vec<Value> = strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Ok(json!([a, b])),
                _ => Err(Error::config(
                    path,
                    format!("merge {i} `{m}` is not two tokens separated by one space"),
                )),
            })
            .collect::<Result<_>>()?;

        let mut added = Vec::new();
        for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == CONTROL || *ty == USER_DEFINED {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == CONTROL,
                }));
            }
        }

        let special = SpecialTokenIds {
            bos: token_id(gguf, "tokenizer.ggml.bos_token_id", vocab_size)?,
            eos: token_id(gguf, "tokenizer.ggml.eos_token_id", vocab_size)?,
            unk: token_id(gguf, "tokenizer.ggml.unknown_token_id", vocab_size)?,
            pad: token_id(gguf, "tokenizer.ggml.padding_token_id", vocab_size)?,
        };
        // llama.cpp's defaults where the file does not say: Llama 3's
        // tokenizer adds BOS and takes whole-word tokens before merging.
        let llama3 = matches!(pre.as_str(), "llama-bpe" | "llama3" | "llama-v3");
        let flag = |key: &str, default: bool| {
            gguf.metadata
                .get(key)
                .and_then(MetadataValue::as_bool)
                .unwrap_or(default)
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", llama3);
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        let name = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
        let post_processor = if add_bos || add_eos {
            let mut single = Vec::new();
            let mut specials = Map::new();
            let mut special_piece = |id: Option<u32>, what: &str| -> Result<Value> {
                let id = id.ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "`tokenizer.ggml.add_{what}_token` is set but no `{what}_token_id`"
                        ),
                    )
                })?;
                let token = tokens[id as usize];
                specials.insert(
                    token.to_string(),
                    json!({"id": token, "ids": [id], "tokens": [token]}),
                );
                Ok(json!({"SpecialToken": {"id": token, "type_id": 0}}))
            };
            if add_bos {
                single.push(special_piece(special.bos, "bos")?);
            }
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            if add_eos {
                single.push(special_piece(special.eos, "eos")?);
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": single.iter().cloned().chain([json!({"Sequence": {"id": "B", "type_id": 1}})]).collect::<Vec<_>>(), "special_tokens": specials})
        } else {
            Value::Null
        };

        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": llama3,
                "vocab": vocab, "merges": merges,
            },
        });
        // The built tokenizer must load: an invalid pattern or vocabulary is
        // reported here, before anything is written.
        tokenizers::Tokenizer::from_bytes(tokenizer.to_string().as_bytes()).map_err(|e| {
            Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("the tokenizer built from the metadata does not load: {e}"),
            }
        })?;

        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (key, id) in [
            ("bos_token", special.bos),
            ("eos_token", special.eos),
            ("unk_token", special.unk),
            ("pad_token", special.pad),
        ] {
            if let Some(t) = name(id) {
                config.insert(key.into(), json!(t));
            }
        }
        config.insert("add_bos_token".into(), json!(add_bos));
        config.insert("add_eos_token".into(), json!(add_eos));
        config.insert("model_max_length".into(), json!(model_max_length));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(template) = gguf
            .metadata
            .get("tokenizer.chat_template")
            .and_then(MetadataValue::as_str)
        {
            config.insert("chat_template".into(), json!(template));
        }
        Ok(Self {
            tokenizer,
            config: Value::Object(config),
            special,
            pre,
            add_bos,
            add_eos,
        })
    }
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}
