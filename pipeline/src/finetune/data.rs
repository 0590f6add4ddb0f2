//! Training examples for retrieval fine-tuning: a query, its positive
//! documents and its hard negatives, as text. Read from a BEIR directory
//! (train qrels, optionally with a hard-negatives file of
//! `{query_id, query, pos_ids, neg_ids}` lines) or from a generic JSONL of
//! `{query, pos: [...], neg: [...]}` lines. Every problem is reported before
//! training starts.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::data::beir::{load_corpus, load_qrels, load_queries, Document};
use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::io::text_input::read_maybe_gzip;

/// One query with the documents it should and should not retrieve, formatted
/// as the model encodes them (prompts, document template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingExample {
    pub query: String,
    /// At least one.
    pub positives: Vec<String>,
    pub negatives: Vec<String>,
}

/// Where training examples come from.
#[derive(Debug, Clone)]
pub enum TrainingSource<'a> {
    /// A BEIR directory: `split` qrels (grade >= 1 positive), optionally hard
    /// negatives from a JSONL file.
    Beir {
        dir: &'a Path,
        split: &'a str,
        hard_negatives: Option<&'a Path>,
    },
    /// A JSONL file of `{"query": ..., "pos": [...], "neg": [...]}`.
    Jsonl(&'a Path),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericLine {
    query: String,
    pos: Vec<String>,
    #[serde(default)]
    neg: Vec<String>,
}

#[derive(Deserialize)]
struct HardNegativeLine {
    query_id: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    pos_ids: Vec<String>,
    #[serde(default)]
    neg_ids: Vec<String>,
}

/// A hash of the examples' texts, so a resumed run can tell it trains on
/// the same data.
pub fn fingerprint(examples: &[TrainingExample]) -> String {
    let mut h = blake3::Hasher::new();
    for e in examples {
        h.update(e.query.as_bytes());
        for t in e.positives.iter().chain(&e.negatives) {
            h.update(&[0]);
            h.update(t.as_bytes());
        }
        h.update(&[1]);
    }
    h.finalize().to_hex().to_string()
}

/// Reads the examples of `source`, formatted with `format`.
pub fn load_examples(source: &TrainingSource, format: &TextFormat) -> Result<Vec<TrainingExample>> {
    let examples = match source {
        TrainingSource::Jsonl(path) => load_generic(path, format)?,
        TrainingSource::Beir {
            dir,
            split,
            hard_negatives,
        } => load_beir(dir, split, *hard_negatives, format)?,
    };
    if examples.is_empty() {
        return Err(Error::EmptyInput {
            path: match source {
                TrainingSource::Jsonl(p) => p.to_path_buf(),
                TrainingSource::Beir { dir, .. } => dir.to_path_buf(),
            },
            message: "no training examples".into(),
        });
    }
    Ok(examples)
}

fn lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = read_maybe_gzip(path)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Input {
        path: path.to_path_buf(),
        line: 0,
        message: "not UTF-8".into(),
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

fn load_generic(path: &Path, format: &TextFormat) -> Result<Vec<TrainingExample>> {
    let mut out = Vec::new();
    for (line, text) in lines(path)? {
        let parsed: GenericLine = serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        })?;
        if parsed.pos.is_empty() {
            return Err(Error::Input {
                path: path.to_path_buf(),
                line,
                message: format!("query `{}` has no positive document", parsed.query),
            });
        }
        out.push(TrainingExample {
            query: format.query(&parsed.query),
            positives: parsed
                .pos
                .iter()
                .map(|p| plain_document(format, p))
                .collect(),
            negatives: parsed
                .neg
                .iter()
                .map(|n| plain_document(format, n))
                .collect(),
        });
    }
    Ok(out)
}

/// A document given as plain text, through the model's document template.
fn plain_document(format: &TextFormat, text: &str) -> String {
    format
        .document(&Document {
            id: String::new(),
            title: String::new(),
            text: text.to_string(),
        })
        .trim()
        .to_string()
}

fn load_beir(
    dir: &Path,
    split: &str,
    hard_negatives: Option<&Path>,
    format: &TextFormat,
) -> Result<Vec<TrainingExample>> {
    let corpus = load_corpus(dir)?;
    let docs: HashMap<&str, &Document> = corpus.iter().map(|d| (d.id.as_str(), d)).collect();
    let queries = load_queries(dir)?;
    let query_text: HashMap<&str, &str> = queries
        .iter()
        .map(|q| (q.id.as_str(), q.text.as_str()))
        .collect();
    let qrels = load_qrels(dir, split)?;
    let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
    let doc = |id: &str, path: &Path, line: usize| -> Result<String> {
        docs.get(id)
            .map(|d| format.document(d))
            .ok_or_else(|| Error::Input {
                path: path.to_path_buf(),
                line,
                message: format!("document `{id}` is not in the corpus"),
            })
    };
    match hard_negatives {
        Some(path) => {
            let mut out = Vec::new();
            for (line, text) in lines(path)? {
                let parsed: HardNegativeLine =
                    serde_json::from_str(&text).map_err(|e| Error::Input {
                        path: path.to_path_buf(),
                        line,
                        message: e.to_string(),
                    })?;
                let query = match (&parsed.query, query_text.get(parsed.query_id.as_str())) {
                    (Some(q), _) => q.clone(),
                    (None, Some(q)) => q.to_string(),
                    (None, None) => {
                        return Err(Error::Input {
                            path: path.to_path_buf(),
                            line,
                            message: format!("query `{}` has no text", parsed.query_id),
                        })
                    }
                };
                let mut pos_ids = parsed.pos_ids.clone();
                if pos_ids.is_empty() {
                    if let Some(judged) = qrels.get(&parsed.query_id) {
                        pos_ids = judged
                            .iter()
                            .filter(|(_, g)| **g >= 1)
                            .map(|(id, _)| id.clone())
                            .collect();
                    }
                }
                if pos_ids.is_empty() {
                    return Err(Error::Input {
                        path: path.to_path_buf(),
                        line,
                        message: format!("query `{}` has no positive document", parsed.query_id),
                    });
                }
                out.push(TrainingExample {
                    query: format.query(&query),
                    positives: pos_ids
                        .iter()
                        .map(|id| doc(id, path, line))
                        .collect::<Result<_>>()?,
                    negatives: parsed
                        .neg_ids
                        .iter()
                        .filter(|id| !pos_ids.contains(id))
                        .map(|id| doc(id, path, line))
                        .collect::<Result<_>>()?,
                });
            }
            Ok(out)
        }
        None => {
            let mut out = Vec::new();
            for (qid, judged) in &qrels {
                let Some(text) = query_text.get(qid.as_str()) else {
                    return Err(Error::Input {
                        path: qrels_path.clone(),
                        line: 0,
                        message: format!("query `{qid}` is not in queries.jsonl"),
                    });
                };
                let positives: Vec<String> = judged
                    .iter()
                    .filter(|(_, g)| **g >= 1)
                    .map(|(id, _)| doc(id, &qrels_path, 0))
                    .collect::<Result<_>>()?;
                if positives.is_empty() {
                    return Err(Error::Input {
                        path: qrels_path.clone(),
                        line: 0,
                        message: format!("query `{qid}` has no positive document"),
                    });
                }
                out.push(TrainingExample {
                    query: format.query(text),
                    positives,
                    negatives: Vec::new(),
                });
            }
            Ok(out)
        }
    }
}
