//! Calibration text for analysis and pruning: a seeded sample of a BEIR
//! dataset's queries and documents (formatted as evaluation formats them), or
//! the texts of a file, cut to a token budget.

use std::path::Path;

use crate::data::beir::{load_corpus, load_queries};
use crate::data::sampling::shuffled_indices;
use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::io::text_input::{read_texts, InputFormat};
use crate::model::encoder_setup::{EncoderSetup, Prompt};

/// How much calibration text to take.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationBudget {
    pub queries: usize,
    pub documents: usize,
    /// Texts are taken (queries and documents alternating) until this many
    /// tokens are reached.
    pub max_tokens: usize,
    pub seed: u64,
}

impl Default for CalibrationBudget {
    fn default() -> Self {
        Self {
            queries: 256,
            documents: 256,
            max_tokens: 65_536,
            seed: 0,
        }
    }
}

/// Texts ready for the model (prompts applied), with their token count.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    pub texts: Vec<String>,
    pub tokens: usize,
    pub source: String,
}

fn cut_to_budget(
    setup: &EncoderSetup,
    texts: Vec<String>,
    max_tokens: usize,
    source: String,
) -> Result<CalibrationSet> {
    if max_tokens == 0 {
        return Err(Error::InvalidArgument(
            "the calibration token budget must be at least 1".into(),
        ));
    }
    let encoded = setup.text.encode(&texts, "")?;
    let mut kept = Vec::new();
    let mut tokens = 0;
    for (text, enc) in texts.into_iter().zip(&encoded) {
        if tokens >= max_tokens {
            break;
        }
        if !text.trim().is_empty() && !enc.is_empty() {
            tokens += enc.len();
            kept.push(text);
        }
    }
    if kept.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{source}: no usable calibration text"
        )));
    }
    Ok(CalibrationSet {
        texts: kept,
        tokens,
        source,
    })
}

impl CalibrationSet {
    /// Queries and documents of the BEIR dataset in `dir`, sampled with
    /// `budget.seed`, alternating so a small budget still mixes both.
    pub fn from_dataset(
        setup: &EncoderSetup,
        dir: &Path,
        budget: &CalibrationBudget,
    ) -> Result<Self> {
        let corpus = load_corpus(dir)?;
        let queries = load_queries(dir)?;
        let format = TextFormat::for_model(setup, None, None)?;
        let q: Vec<String> = shuffled_indices(queries.len(), budget.seed)
            .into_iter()
            .take(budget.queries)
            .map(|i| format.query(&queries[i].text))
            .collect();
        let d: Vec<String> = shuffled_indices(corpus.len(), budget.seed.wrapping_add(1))
            .into_iter()
            .take(budget.documents)
            .map(|i| format.document(&corpus[i]))
            .collect();
        let mut texts = Vec::with_capacity(q.len() + d.len());
        let (mut qi, mut di) = (q.into_iter(), d.into_iter());
        loop {
            match (qi.next(), di.next()) {
                (None, None) => break,
                (a, b) => texts.extend(a.into_iter().chain(b)),
            }
        }
        cut_to_budget(setup, texts, budget.max_tokens, dir.display().to_string())
    }

    /// The texts of `path` (JSONL with `text`, or lines), with `prompt` applied.
    pub fn from_file(
        setup: &EncoderSetup,
        path: &Path,
        prompt: &Prompt,
        max_tokens: usize,
    ) -> Result<Self> {
        let prefix = setup.prefix(prompt)?;
        let texts = read_texts(path, InputFormat::from_extension(path))?
            .into_iter()
            .map(|t| format!("{prefix}{t}"))
            .collect();
        cut_to_budget(setup, texts, max_tokens, path.display().to_string())
    }
}

/// `(query, positive document)` texts from a BEIR split's judgements (grade
/// ≥ 1), one pair per query, seeded; prompts and document template as
/// evaluation uses them. For gradient-based scores.
pub fn training_pairs(
    setup: &EncoderSetup,
    dir: &Path,
    split: &str,
    count: usize,
    seed: u64,
) -> Result<Vec<(String, String)>> {
    let qrels = crate::data::beir::load_qrels(dir, split)?;
    let corpus = load_corpus(dir)?;
    let queries = load_queries(dir)?;
    let docs: std::collections::HashMap<&str, &crate::data::beir::Document> =
        corpus.iter().map(|d| (d.id.as_str(), d)).collect();
    let format = TextFormat::for_model(setup, None, None)?;
    let mut pairs = Vec::new();
    for q in &queries {
        let Some(judged) = qrels.get(&q.id) else {
            continue;
        };
        if let Some(doc) = judged
            .iter()
            .filter(|(_, g)| **g >= 1)
            .find_map(|(id, _)| docs.get(id.as_str()))
        {
            pairs.push((format.query(&q.text), format.document(doc)));
        }
    }
    if pairs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: split `{split}` has no query with a relevant document in the corpus",
            dir.display()
        )));
    }
    Ok(shuffled_indices(pairs.len(), seed)
        .into_iter()
        .take(count)
        .map(|i| pairs[i].clone())
        .collect())
}
