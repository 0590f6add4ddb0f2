//! Unlabeled text for label-free embedding distillation (`objective:
//! distill`): no queries paired with documents, no qrels, just text the
//! student should embed as the teacher does. From:
//! - a BEIR directory: its corpus, through the model's document template
//!   (not its queries: they are what evaluation asks, and label-free
//!   recovery should not have seen them);
//! - a JSONL file (`.jsonl`, optionally `.gz`): one JSON string or
//!   `{"text": ..., "title": ...}` object per line, formatted as documents;
//! - any other file: one text per non-empty line, formatted as a document.
//!
//! Every problem names its file and line, before any training.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::beir::{load_corpus, Document};
use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::io::text_input::read_maybe_gzip;

#[derive(Deserialize)]
#[serde(untagged)]
enum TextLine {
    Plain(String),
    Object {
        text: String,
        #[serde(default)]
        title: String,
    },
}

/// The distinct texts of every source in `paths`, formatted as the model
/// encodes them, in the order first seen. Each source must hold at least
/// one text.
pub fn load_texts(paths: &[PathBuf], format: &TextFormat) -> Result<Vec<String>> {
    if paths.is_empty() {
        return Err(Error::InvalidArgument(
            "label-free distillation needs text: pass --train-texts".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut texts = Vec::new();
    for path in paths {
        let found = if path.is_dir() {
            beir_texts(path, format)?
        } else {
            file_texts(path, format)?
        };
        if found.is_empty() {
            return Err(Error::EmptyInput {
                path: path.clone(),
                message: "no training text".into(),
            });
        }
        for t in found {
            if seen.insert(t.clone()) {
                texts.push(t);
            }
        }
    }
    Ok(texts)
}

/// A hash of the texts, so a resumed run can tell it trains on the same data.
pub fn fingerprint(texts: &[String]) -> String {
    let mut h = blake3::Hasher::new();
    for t in texts {
        h.update(t.as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

fn beir_texts(dir: &Path, format: &TextFormat) -> Result<Vec<String>> {
    Ok(load_corpus(dir)?
        .iter()
        .map(|d| format.document(d).trim().to_string())
        .filter(|t| !t.is_empty())
        .collect())
}

fn file_texts(path: &Path, format: &TextFormat) -> Result<Vec<String>> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let jsonl = name.is_some_and(|n| n.ends_with(".jsonl") || n.ends_with(".jsonl.gz"));
    let bytes = read_maybe_gzip(path)?;
    let mut texts = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let input_error = |message: String| Error::Input {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = std::str::from_utf8(raw)
            .map_err(|e| input_error(format!("not UTF-8 ({e})")))?
            .trim();
        if text.is_empty() {
            continue;
        }
        let (title, text) = if jsonl {
            match serde_json::from_str::<TextLine>(text) {
                Ok(TextLine::Plain(t)) => (String::new(), t),
                Ok(TextLine::Object { text, title }) => (title, text),
                Err(e) => {
                    return Err(input_error(format!(
                        "expected a JSON string or {{\"text\": ...}} object: {e}"
                    )))
                }
            }
        } else {
            (String::new(), text.to_string())
        };
        let doc = Document {
            id: String::new(),
            title,
            text,
        };
        let formatted = format.document(&doc).trim().to_string();
        if !formatted.is_empty() {
            texts.push(formatted);
        }
    }
    Ok(texts)
}
