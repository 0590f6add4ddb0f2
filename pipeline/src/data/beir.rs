//! BEIR-format retrieval datasets: `corpus.jsonl`, `queries.jsonl` and
//! `qrels/<split>.tsv`, each plain or gzip-compressed (`.gz`).
//!
//! Reference: BEIR `GenericDataLoader` (beir/datasets/data_loader.py).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::text_input::read_maybe_gzip;

/// One corpus document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
}

/// One query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// Relevance judgements: query id -> document id -> grade.
pub type Qrels = BTreeMap<String, BTreeMap<String, i64>>;

/// A dataset split ready to evaluate: the corpus, the judged queries and
/// their judgements.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub split: String,
    pub corpus: Vec<Document>,
    /// Queries with at least one judgement in this split, in file order.
    pub queries: Vec<Query>,
    pub qrels: Qrels,
    /// Judgements dropped because their document or query does not exist.
    pub dangling: DanglingJudgements,
}

/// Judgements that name a document or query the dataset lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DanglingJudgements {
    pub unknown_documents: usize,
    pub unknown_queries: usize,
    /// A few examples, for the message.
    pub examples: Vec<String>,
}

impl DanglingJudgements {
    pub fn is_empty(&self) -> bool {
        self.unknown_documents == 0 && self.unknown_queries == 0
    }
}

#[derive(Deserialize)]
struct CorpusLine {
    #[serde(rename = "_id")]
    id: IdValue,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct QueryLine {
    #[serde(rename = "_id")]
    id: IdValue,
    text: String,
}

/// Ids are strings in BEIR, but some files write numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdValue {
    Text(String),
    Number(i64),
}

impl IdValue {
    fn into_string(self) -> String {
        match self {
            IdValue::Text(s) => s,
            IdValue::Number(n) => n.to_string(),
        }
    }
}

/// `dir/name` or `dir/name.gz`, whichever exists.
pub fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let plain = dir.join(name);
    if plain.exists() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() {
        return Ok(gz);
    }
    Err(Error::MissingFile { path: plain })
}

fn jsonl_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = read_maybe_gzip(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::Input {
            path: path.to_path_buf(),
            line,
            message: "not valid UTF-8".into(),
        }
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

fn parse_line<T: serde::de::DeserializeOwned>(path: &Path, line: usize, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        line,
        message: format!("malformed JSON line: {e}"),
    })
}

/// Reads `corpus.jsonl[.gz]`; duplicate ids and an empty corpus are errors.
pub fn load_corpus(dir: &Path) -> Result<Vec<Document>> {
    let path = find_file(dir, "corpus.jsonl")?;
    let mut seen = HashMap::new();
    let mut corpus = Vec::new();
    for (line, text) in jsonl_lines(&path)? {
        let doc: CorpusLine = parse_line(&path, line, &text)?;
        let id = doc.id.into_string();
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(Error::Input {
                path: path.clone(),
                line,
                message: format!("duplicate document id `{id}` (first on line {first})"),
            });
        }
        corpus.push(Document {
            id,
            title: doc.title.unwrap_or_default(),
            text: doc.text.unwrap_or_default(),
        });
    }
    if corpus.is_empty() {
        return Err(Error::EmptyInput {
            path,
            message: "the corpus has no documents".into(),
        });
    }
    Ok(corpus)
}

/// Reads `queries.jsonl[.gz]`; duplicate ids are errors.
pub fn load_queries(dir: &Path) -> Result<Vec<Query>> {
    let path = find_file(dir, "queries.jsonl")?;
    let mut seen = HashSet::new();
    let mut queries = Vec::new();
    for (line, text) in jsonl_lines(&path)? {
        let query: QueryLine = parse_line(&path, line, &text)?;
        let id = query.id.into_string();
        if !seen.insert(id.clone()) {
            return Err(Error::Input {
                path: path.clone(),
                line,
                message: format!("duplicate query id `{id}`"),
            });
        }
        queries.push(Query {
            id,
            text: query.text,
        });
    }
    Ok(queries)
}

/// The splits with a `qrels/<split>.tsv[.gz]` file.
pub fn available_splits(dir: &Path) -> Vec<String> {
    let mut splits: Vec<String> = std::fs::read_dir(dir.join("qrels"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let name = name.strip_suffix(".gz").unwrap_or(&name).to_string();
            name.strip_suffix(".tsv").map(str::to_string)
        })
        .collect();
    splits.sort();
    splits.dedup();
    splits
}

/// Reads `qrels/<split>.tsv[.gz]`: a header line, then
/// `query-id <TAB> corpus-id <TAB> score` (a 4-column TREC qrels line,
/// `qid iter docid rel`, is read too).
pub fn load_qrels(dir: &Path, split: &str) -> Result<Qrels> {
    let path = match find_file(&dir.join("qrels"), &format!("{split}.tsv")) {
        Ok(p) => p,
        Err(Error::MissingFile { path }) => {
            let splits = available_splits(dir);
            return Err(Error::InvalidArgument(format!(
                "{}: no qrels for split `{split}` (available splits: {})",
                path.display(),
                if splits.is_empty() {
                    "none".to_string()
                } else {
                    splits.join(", ")
                }
            )));
        }
        Err(e) => return Err(e),
    };
    let bytes = read_maybe_gzip(&path)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Input {
        path: path.clone(),
        line: 0,
        message: "not valid UTF-8".into(),
    })?;
    let mut qrels = Qrels::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let fields: Vec<&str> = line.split(['\t', ' ']).filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            continue;
        }
        let (qid, docid, grade) = match fields.as_slice() {
            [q, d, g] => (*q, *d, *g),
            [q, _, d, g] => (*q, *d, *g),
            _ => {
                return Err(Error::Input {
                    path: path.clone(),
                    line: line_no,
                    message: format!(
                        "expected `query-id corpus-id score`, got {} fields",
                        fields.len()
                    ),
                })
            }
        };
        let grade = match grade.parse::<i64>() {
            Ok(g) => g,
            Err(_) if line_no == 1 => continue, // header
            Err(_) => {
                return Err(Error::Input {
                    path: path.clone(),
                    line: line_no,
                    message: format!("score `{grade}` is not an integer"),
                })
            }
        };
        qrels
            .entry(qid.to_string())
            .or_default()
            .insert(docid.to_string(), grade);
    }
    if qrels.is_empty() {
        return Err(Error::EmptyInput {
            path,
            message: "no relevance judgements".into(),
        });
    }
    Ok(qrels)
}

/// What to do with judgements naming unknown documents or queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DanglingPolicy {
    /// Drop them and report the counts.
    Warn,
    /// Fail.
    Strict,
}

impl Dataset {
    /// A fixed, seeded subset of the corpus: every judged document of the
    /// split plus random others, `size` documents in all (or the whole corpus
    /// when it is smaller). Encoding a large model over a full corpus can take
    /// hours on a CPU; metrics on the subset are comparable between models.
    pub fn with_document_sample(mut self, size: usize, seed: u64) -> Self {
        if size >= self.corpus.len() {
            return self;
        }
        let judged: HashSet<&str> = self
            .qrels
            .values()
            .flat_map(|docs| docs.keys().map(String::as_str))
            .collect();
        let mut keep: Vec<bool> = self
            .corpus
            .iter()
            .map(|d| judged.contains(d.id.as_str()))
            .collect();
        let mut kept = keep.iter().filter(|k| **k).count();
        for i in crate::data::sampling::shuffled_indices(self.corpus.len(), seed) {
            if kept >= size {
                break;
            }
            if !keep[i] {
                keep[i] = true;
                kept += 1;
            }
        }
        let mut flags = keep.into_iter();
        self.corpus.retain(|_| flags.next().unwrap_or(false));
        self
    }

    /// Loads `split` of the BEIR dataset in `dir`.
    pub fn load(dir: &Path, split: &str, policy: DanglingPolicy) -> Result<Self> {
        let _span = tracing::info_span!("load_dataset", dir = %dir.display(), split).entered();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let mut qrels = load_qrels(dir, split)?;
        let corpus = load_corpus(dir)?;
        let all_queries = load_queries(dir)?;
        let doc_ids: HashSet<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
        let query_ids: HashSet<&str> = all_queries.iter().map(|q| q.id.as_str()).collect();

        let mut dangling = DanglingJudgements::default();
        qrels.retain(|qid, docs| {
            if !query_ids.contains(qid.as_str()) {
                dangling.unknown_queries += 1;
                if dangling.examples.len() < 5 {
                    dangling.examples.push(format!("query `{qid}`"));
                }
                return false;
            }
            docs.retain(|docid, _| {
                let known = doc_ids.contains(docid.as_str());
                if !known {
                    dangling.unknown_documents += 1;
                    if dangling.examples.len() < 5 {
                        dangling
                            .examples
                            .push(format!("document `{docid}` (query `{qid}`)"));
                    }
                }
                known
            });
            !docs.is_empty()
        });
        if !dangling.is_empty() {
            let message = format!(
                "qrels/{split}: {} judgement(s) name unknown documents and {} unknown queries, e.g. {}",
                dangling.unknown_documents,
                dangling.unknown_queries,
                dangling.examples.join(", ")
            );
            match policy {
                DanglingPolicy::Strict => {
                    return Err(Error::InvalidConfig {
                        path: dir.to_path_buf(),
                        message,
                    })
                }
                DanglingPolicy::Warn => tracing::warn!("{message}; they are ignored"),
            }
        }
        if qrels.is_empty() {
            return Err(Error::EmptyInput {
                path: dir.join("qrels"),
                message: format!("split `{split}` has no judgement of a known query and document"),
            });
        }
        let queries = all_queries
            .into_iter()
            .filter(|q| qrels.contains_key(&q.id))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            corpus,
            queries,
            qrels,
            dangling,
        })
    }
}
