//! Unlabeled text for label-free embedding distillation (`objective:
//! distill`, or beside a combined run's labeled batches with
//! `text_batch_size`): no queries paired with documents, no judgements, just
//! text the student should embed as the teacher does. Each text has a role.
//!
//! Documents (`--train-texts`), through the model's document template:
//! - a BEIR directory: its corpus (not its queries: they are what evaluation
//!   asks, and label-free recovery should not have seen them);
//! - a JSONL file (`.jsonl`, optionally `.gz`): one JSON string or
//!   `{"text": ..., "title": ...}` object per line;
//! - any other file: one text per non-empty line.
//!
//! Queries (`--train-queries`), with the model's query prompt (an
//! instruction-following retriever asks for it; a teacher with another
//! tokenizer reads them with its own prompt):
//! - a BEIR directory: the text of the queries its qrels list for one split
//!   (only which queries the split has is read, never their judgements);
//! - a JSONL or text file, as above (a title is refused: queries have none).
//!
//! Every problem names its file and line, before any training.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::beir::{load_corpus, load_qrels, load_queries, Document};
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

/// What an unlabeled text stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextRole {
    /// A document (`--train-texts`), through the document template.
    Document,
    /// A query (`--train-queries`), with the model's query prompt; a
    /// teacher with another tokenizer reads it with its own prompt.
    Query,
}

/// One unlabeled training text, written as the model encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlabeledText {
    pub text: String,
    pub role: TextRole,
}

/// Where the unlabeled texts come from.
#[derive(Debug, Clone, Copy)]
pub struct TextSources<'a> {
    /// Read as documents (`--train-texts`).
    pub documents: &'a [PathBuf],
    /// Read as queries (`--train-queries`).
    pub queries: &'a [PathBuf],
    /// The qrels split whose queries a BEIR directory in `queries` gives.
    pub query_split: &'a str,
}

/// The distinct texts of every source, formatted as the model encodes them,
/// documents first, each in the order first seen. A text written the same
/// way in both roles (a model without a query prompt) is kept once, as a
/// document: the teacher's embeddings are looked up by the student's text.
/// Each source must hold at least one text.
pub fn load_texts(sources: &TextSources, format: &TextFormat) -> Result<Vec<UnlabeledText>> {
    if sources.documents.is_empty() && sources.queries.is_empty() {
        return Err(Error::InvalidArgument(
            "unlabeled text is missing: pass --train-texts or --train-queries".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut texts = Vec::new();
    let roles = sources
        .documents
        .iter()
        .map(|p| (p, TextRole::Document))
        .chain(sources.queries.iter().map(|p| (p, TextRole::Query)));
    for (path, role) in roles {
        let found = match (path.is_dir(), role) {
            (true, TextRole::Document) => beir_documents(path, format)?,
            (true, TextRole::Query) => beir_queries(path, sources.query_split, format)?,
            (false, _) => file_texts(path, format, role)?,
        };
        if found.is_empty() {
            return Err(Error::EmptyInput {
                path: path.clone(),
                message: match role {
                    TextRole::Document => "no training text".into(),
                    TextRole::Query => "no training queries".into(),
                },
            });
        }
        for text in found {
            if seen.insert(text.clone()) {
                texts.push(UnlabeledText { text, role });
            }
        }
    }
    Ok(texts)
}

/// A hash of the texts and their roles, so a resumed run can tell it trains
/// on the same data (documents hash as their text alone, as before roles).
pub fn fingerprint(texts: &[UnlabeledText]) -> String {
    let mut h = blake3::Hasher::new();
    for t in texts {
        h.update(t.text.as_bytes());
        if t.role == TextRole::Query {
            h.update(b"\0query");
        }
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

fn beir_documents(dir: &Path, format: &TextFormat) -> Result<Vec<String>> {
    Ok(load_corpus(dir)?
        .iter()
        .map(|d| format.document(d).trim().to_string())
        .filter(|t| !t.is_empty())
        .collect())
}

/// The text of the queries `split`'s qrels list, in queries.jsonl's order.
fn beir_queries(dir: &Path, split: &str, format: &TextFormat) -> Result<Vec<String>> {
    let in_split = load_qrels(dir, split)?;
    Ok(load_queries(dir)?
        .into_iter()
        .filter(|q| in_split.contains_key(&q.id) && !q.text.trim().is_empty())
        .map(|q| format.query(q.text.trim()))
        .collect())
}

fn file_texts(path: &Path, format: &TextFormat, role: TextRole) -> Result<Vec<String>> {
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
        let formatted = if role == TextRole::Query {
            if !title.is_empty() {
                return Err(input_error(
                    "a query has no title; give {\"text\": ...} only".into(),
                ));
            }
            if text.trim().is_empty() {
                continue;
            }
            format.query(text.trim())
        } else {
            let doc = Document {
                id: String::new(),
                title,
                text,
            };
            format.document(&doc).trim().to_string()
        };
        if !formatted.is_empty() {
            texts.push(formatted);
        }
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::text_format::DocumentTemplate;

    fn format() -> TextFormat {
        TextFormat {
            template: DocumentTemplate(DocumentTemplate::TITLE_TEXT.into()),
            document_prompt: String::new(),
            query_prefix: "Instruct: find it\nQuery: ".into(),
        }
    }

    /// A BEIR directory with train and test queries.
    fn beir(dir: &Path) {
        std::fs::write(
            dir.join("corpus.jsonl"),
            "{\"_id\": \"d1\", \"title\": \"Cats\", \"text\": \"Cats purr.\"}\n\
             {\"_id\": \"d2\", \"title\": \"\", \"text\": \"Dogs bark.\"}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("queries.jsonl"),
            "{\"_id\": \"q1\", \"text\": \"do cats purr\"}\n\
             {\"_id\": \"q2\", \"text\": \"do dogs bark\"}\n\
             {\"_id\": \"q3\", \"text\": \"  \"}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.join("qrels")).unwrap();
        std::fs::write(
            dir.join("qrels/train.tsv"),
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq3\td2\t1\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("qrels/test.tsv"),
            "query-id\tcorpus-id\tscore\nq2\td2\t1\n",
        )
        .unwrap();
    }

    #[test]
    fn queries_get_the_query_prompt_and_a_beir_directory_gives_one_splits_queries() {
        let work = tempfile::tempdir().unwrap();
        beir(work.path());
        let queries = work.path().join("more.jsonl");
        std::fs::write(
            &queries,
            "\"what is a dog\"\n{\"text\": \"why do cats purr\"}\n",
        )
        .unwrap();
        let dir = work.path().to_path_buf();
        let sources = TextSources {
            documents: std::slice::from_ref(&dir),
            queries: &[dir.clone(), queries],
            query_split: "train",
        };
        let texts = load_texts(&sources, &format()).unwrap();
        let got: Vec<(&str, TextRole)> = texts.iter().map(|t| (t.text.as_str(), t.role)).collect();
        assert_eq!(
            got,
            vec![
                ("Cats Cats purr.", TextRole::Document),
                ("Dogs bark.", TextRole::Document),
                // The train split's query with text; q2 is a test query.
                ("Instruct: find it\nQuery: do cats purr", TextRole::Query),
                ("Instruct: find it\nQuery: what is a dog", TextRole::Query),
                (
                    "Instruct: find it\nQuery: why do cats purr",
                    TextRole::Query
                ),
            ]
        );
    }

    #[test]
    fn the_fingerprint_of_documents_is_their_text_and_a_role_changes_it() {
        let doc = |text: &str| UnlabeledText {
            text: text.into(),
            role: TextRole::Document,
        };
        let texts = vec![doc("a"), doc("b")];
        // As before texts had roles: each text and a zero byte.
        let mut h = blake3::Hasher::new();
        h.update(b"a\0b\0");
        assert_eq!(fingerprint(&texts), h.finalize().to_hex().to_string());
        let mut as_query = texts.clone();
        as_query[1].role = TextRole::Query;
        assert_ne!(fingerprint(&texts), fingerprint(&as_query));
    }

    #[test]
    fn a_text_in_both_roles_is_kept_once_as_a_document() {
        let work = tempfile::tempdir().unwrap();
        let (documents, queries) = (work.path().join("d.txt"), work.path().join("q.txt"));
        std::fs::write(&documents, "same text\n").unwrap();
        std::fs::write(&queries, "same text\nonly a query\n").unwrap();
        let unprompted = TextFormat {
            query_prefix: String::new(),
            ..format()
        };
        let sources = TextSources {
            documents: std::slice::from_ref(&documents),
            queries: std::slice::from_ref(&queries),
            query_split: "train",
        };
        let texts = load_texts(&sources, &unprompted).unwrap();
        let got: Vec<(&str, TextRole)> = texts.iter().map(|t| (t.text.as_str(), t.role)).collect();
        assert_eq!(
            got,
            vec![
                ("same text", TextRole::Document),
                ("only a query", TextRole::Query)
            ]
        );
    }

    #[test]
    fn bad_query_sources_name_the_file_and_the_problem() {
        let work = tempfile::tempdir().unwrap();
        beir(work.path());
        let titled = work.path().join("titled.jsonl");
        std::fs::write(&titled, "\"fine\"\n{\"title\": \"T\", \"text\": \"x\"}\n").unwrap();
        let blank = work.path().join("blank.txt");
        std::fs::write(&blank, "\n \n").unwrap();
        let load = |queries: &[PathBuf], split: &str| {
            load_texts(
                &TextSources {
                    documents: &[],
                    queries,
                    query_split: split,
                },
                &format(),
            )
            .unwrap_err()
            .to_string()
        };
        let err = load(std::slice::from_ref(&titled), "train");
        assert!(
            err.contains("titled.jsonl:2") && err.contains("no title"),
            "{err}"
        );
        let err = load(std::slice::from_ref(&blank), "train");
        assert!(
            err.contains("blank.txt") && err.contains("no training queries"),
            "{err}"
        );
        let err = load(&[work.path().to_path_buf()], "dev");
        assert!(err.contains("no qrels for split `dev`"), "{err}");
        let err = load(&[], "train");
        assert!(err.contains("--train-queries"), "{err}");
    }
}
