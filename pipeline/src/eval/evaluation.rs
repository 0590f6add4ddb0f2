//! `effir eval`: encode a BEIR dataset with a model, search exactly, and
//! score the run with trec_eval semantics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::data::beir::Dataset;
use crate::data::text_format::{DocumentTemplate, TextFormat};
use crate::error::{Error, Result};
use crate::eval::embedding_cache::{fingerprint_file, CacheKey, EmbeddingCache, Fingerprint};
use crate::eval::metrics::{evaluate, trec_order, Evaluation, Run};
use crate::eval::search::{search, SearchOptions};
use crate::eval::text_embedder::TextEmbedder;
use crate::io::atomic_file::write_atomically;
use crate::model::encoder_setup::{Prompt, BATCHING_BLOCK};
use ndarray::Array2;

/// Settings of one evaluation.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Metric cut-offs, e.g. `[10, 100]`.
    pub ks: Vec<usize>,
    /// Documents kept per query in the run file.
    pub run_depth: usize,
    pub batch_size: usize,
    pub ignore_identical_ids: bool,
    /// `None`: the model's own (see [`DocumentTemplate::for_model`]).
    pub document_template: Option<DocumentTemplate>,
    /// Prompt of the queries (default: the model's `query` prompt if any).
    pub query_prompt: Option<Prompt>,
    /// `None` disables the corpus-embedding cache.
    pub cache: Option<PathBuf>,
    /// Tag of the run file's last column.
    pub run_tag: String,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            ks: vec![10, 100],
            run_depth: 1000,
            batch_size: 32,
            ignore_identical_ids: false,
            document_template: None,
            query_prompt: None,
            cache: Some(EmbeddingCache::default_dir()),
            run_tag: "effir".into(),
        }
    }
}

/// Wall times of an evaluation's phases.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub corpus_encode_seconds: f64,
    /// `None` when the corpus came from the cache.
    pub corpus_docs_per_second: Option<f64>,
    pub corpus_from_cache: bool,
    pub query_encode_seconds: f64,
    pub search_seconds: f64,
}

/// Everything an evaluation produced.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub split: String,
    pub num_documents: usize,
    pub num_queries: usize,
    pub document_template: DocumentTemplate,
    pub query_prefix: String,
    pub max_length: usize,
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// Written apart (`timings.json`): `metrics.json` and `run.trec` are the
    /// same bytes for the same inputs.
    #[serde(skip)]
    pub timings: Timings,
    #[serde(skip)]
    pub run: Run,
}

/// Which phase progress is reported for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Corpus,
    Queries,
}

/// Encodes, searches and scores `dataset` with `embedder`. `progress` gets
/// `(phase, done, total)`.
pub fn evaluate_model(
    embedder: &dyn TextEmbedder,
    dataset: &Dataset,
    settings: &EvalSettings,
    progress: &mut dyn FnMut(Phase, usize, usize),
) -> Result<EvalReport> {
    let _span =
        tracing::info_span!("eval", model = %embedder.source().display(), split = %dataset.split)
            .entered();
    check_settings(settings)?;
    let format = eval_format(embedder, settings)?;
    // Corpus, from the cache when the same model, corpus and settings were seen.
    let docs: Vec<String> = dataset.corpus.iter().map(|d| format.document(d)).collect();
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let n = docs.len();
    let cache = match &settings.cache {
        Some(dir) => {
            let identity = CorpusEncoding::of(embedder, dataset, &format)?;
            Some((
                EmbeddingCache::new(dir),
                CacheKey::new(&identity.model, &identity.corpus, &identity.settings),
            ))
        }
        None => None,
    };
    let start = Instant::now();
    let cached = cache.as_ref().and_then(|(c, key)| c.get(key, n));
    let corpus_from_cache = cached.is_some();
    let corpus_embeddings = match cached {
        Some(m) => {
            tracing::info!("corpus embeddings read from the cache");
            progress(Phase::Corpus, n, n);
            m
        }
        None => {
            let m = embedder.embed_texts(&docs, "", settings.batch_size, &mut |done| {
                progress(Phase::Corpus, done, n)
            })?;
            if let Some((c, key)) = &cache {
                let path = c.put(key, &m)?;
                tracing::info!(path = %path.display(), "corpus embeddings cached");
            }
            m
        }
    };
    let corpus_encode_seconds = start.elapsed().as_secs_f64();
    let corpus_timing = (
        corpus_encode_seconds,
        (!corpus_from_cache).then(|| n as f64 / corpus_encode_seconds),
        corpus_from_cache,
    );
    score_corpus(
        embedder,
        dataset,
        settings,
        &format,
        corpus_embeddings,
        corpus_timing,
        progress,
    )
}

/// Scores `dataset` against corpus embeddings computed elsewhere (merged
/// `effir encode` shards, rows in corpus order): queries are encoded by
/// `embedder`, then searched and scored exactly as [`evaluate_model`] does.
pub fn evaluate_with_corpus_embeddings(
    embedder: &dyn TextEmbedder,
    dataset: &Dataset,
    settings: &EvalSettings,
    corpus_embeddings: Array2<f32>,
    progress: &mut dyn FnMut(Phase, usize, usize),
) -> Result<EvalReport> {
    check_settings(settings)?;
    let format = eval_format(embedder, settings)?;
    if corpus_embeddings.dim() != (dataset.corpus.len(), embedder.dimension()) {
        return Err(Error::InvalidArgument(format!(
            "corpus embeddings of shape {:?} for {} documents of dimension {}",
            corpus_embeddings.dim(),
            dataset.corpus.len(),
            embedder.dimension()
        )));
    }
    score_corpus(
        embedder,
        dataset,
        settings,
        &format,
        corpus_embeddings,
        (0.0, None, false),
        progress,
    )
}

fn check_settings(settings: &EvalSettings) -> Result<()> {
    if settings.ks.contains(&0) || settings.ks.is_empty() {
        return Err(Error::InvalidArgument("every k must be at least 1".into()));
    }
    if settings.run_depth == 0 {
        return Err(Error::InvalidArgument(
            "run depth must be at least 1".into(),
        ));
    }
    Ok(())
}

fn eval_format(embedder: &dyn TextEmbedder, settings: &EvalSettings) -> Result<TextFormat> {
    TextFormat::for_model(
        embedder.setup(),
        settings.document_template.clone(),
        settings.query_prompt.clone(),
    )
}

/// What identifies a corpus encoding: the model, the corpus file and the
/// settings that change the embeddings (the documents encoded, their
/// format, length, pooling, size, run-time variant and batching). The
/// embedding cache is keyed by it, and corpus shards must agree on it.
pub struct CorpusEncoding {
    pub model: Fingerprint,
    pub corpus: Fingerprint,
    pub settings: String,
}

impl CorpusEncoding {
    pub fn of(embedder: &dyn TextEmbedder, dataset: &Dataset, format: &TextFormat) -> Result<Self> {
        let setup = embedder.setup();
        let model = embedder.fingerprint()?;
        let corpus_file = crate::data::beir::find_file(&dataset.dir, "corpus.jsonl")?;
        let corpus = fingerprint_file(&corpus_file)?;
        // The documents encoded (a sample of the corpus, or all of it).
        let mut ids = blake3::Hasher::new();
        for doc in &dataset.corpus {
            ids.update(doc.id.as_bytes());
            ids.update(&[0]);
        }
        let settings = format!(
            "docs={} template={:?} prompt={:?} max_length={} pooling={} dim={} batching=blocks-of-{} {}",
            ids.finalize().to_hex(),
            format.template.0,
            format.document_prompt,
            setup.text.max_length(),
            setup.pooling,
            embedder.dimension(),
            BATCHING_BLOCK,
            embedder.variant()
        );
        Ok(Self {
            model,
            corpus,
            settings,
        })
    }
}

/// Encodes the queries, searches the corpus embeddings and scores the run.
fn score_corpus(
    embedder: &dyn TextEmbedder,
    dataset: &Dataset,
    settings: &EvalSettings,
    format: &TextFormat,
    corpus_embeddings: Array2<f32>,
    (corpus_encode_seconds, corpus_docs_per_second, corpus_from_cache): (f64, Option<f64>, bool),
    progress: &mut dyn FnMut(Phase, usize, usize),
) -> Result<EvalReport> {
    let setup = embedder.setup();
    let n = corpus_embeddings.nrows();
    let start = Instant::now();
    let query_texts: Vec<&str> = dataset.queries.iter().map(|q| q.text.as_str()).collect();
    let nq = query_texts.len();
    let query_embeddings = embedder.embed_texts(
        &query_texts,
        &format.query_prefix,
        settings.batch_size,
        &mut |done| progress(Phase::Queries, done, nq),
    )?;
    let query_encode_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let k = settings
        .run_depth
        .max(*settings.ks.iter().max().unwrap_or(&1));
    let mut options = SearchOptions::new(k, setup.sentence.similarity);
    options.ignore_identical_ids = settings.ignore_identical_ids;
    let query_ids: Vec<String> = dataset.queries.iter().map(|q| q.id.clone()).collect();
    let doc_ids: Vec<String> = dataset.corpus.iter().map(|d| d.id.clone()).collect();
    let hits = search(
        query_embeddings.view(),
        &query_ids,
        corpus_embeddings.view(),
        &doc_ids,
        &options,
    )?;
    let search_seconds = start.elapsed().as_secs_f64();

    // Scores go through f32 -> f64 exactly as a reader of run.trec sees them.
    let run: Run = query_ids
        .iter()
        .zip(hits)
        .map(|(qid, hits)| {
            let list = hits
                .into_iter()
                .map(|h| (doc_ids[h.doc].clone(), h.score as f64))
                .collect();
            (qid.clone(), list)
        })
        .collect();
    let evaluation = evaluate(&run, &dataset.qrels, &settings.ks)?;
    Ok(EvalReport {
        model: embedder.source().to_path_buf(),
        dataset: dataset.dir.clone(),
        split: dataset.split.clone(),
        num_documents: n,
        num_queries: nq,
        document_template: format.template.clone(),
        query_prefix: format.query_prefix.clone(),
        max_length: setup.text.max_length(),
        evaluation,
        timings: Timings {
            corpus_encode_seconds,
            corpus_docs_per_second,
            corpus_from_cache,
            query_encode_seconds,
            search_seconds,
        },
        run,
    })
}

/// Writes `metrics.json` and `run.trec` (top `depth` per query), which are
/// the same bytes for the same inputs, and `timings.json` into `out`, all
/// three at once: they are staged beside `out` and exchanged with it
/// (anything else `out` holds is kept), so `out` never holds the metrics
/// of one run with the ranking of another.
pub fn write_report(report: &EvalReport, out: &Path, depth: usize, tag: &str) -> Result<()> {
    let (staged, out) = stage_report(out)?;
    write_staged_report(staged, report, &out, depth, tag)
}

/// Claims `out` for an evaluation's report before the evaluation runs (a
/// second process writing it is refused at once, not after hours of
/// encoding): the staging directory and `out` as a path with a final name
/// (`.` becomes the directory it names).
pub fn stage_report(out: &Path) -> Result<(crate::io::atomic_file::StagedDir, PathBuf)> {
    let out = if out.file_name().is_none() {
        out.canonicalize().map_err(|e| Error::io(out, e))?
    } else {
        out.to_path_buf()
    };
    let staged = crate::io::atomic_file::StagedDir::beside_existing(&out)?;
    Ok((staged, out))
}

/// Writes the report into `staged` and puts it in place at `out` (from
/// [`stage_report`]).
pub fn write_staged_report(
    staged: crate::io::atomic_file::StagedDir,
    report: &EvalReport,
    out: &Path,
    depth: usize,
    tag: &str,
) -> Result<()> {
    write_report_files(report, staged.path(), depth, tag)?;
    staged.replace_keeping_others(out)
}

fn write_report_files(report: &EvalReport, out: &Path, depth: usize, tag: &str) -> Result<()> {
    let timings_path = out.join("timings.json");
    write_atomically(&timings_path, |w| {
        serde_json::to_writer_pretty(&mut *w, &report.timings).map_err(|error| Error::Json {
            path: timings_path.clone(),
            error,
        })?;
        w.write_all(b"\n").map_err(|e| Error::io(&timings_path, e))
    })?;
    let metrics_path = out.join("metrics.json");
    write_atomically(&metrics_path, |w| {
        serde_json::to_writer_pretty(&mut *w, report).map_err(|error| Error::Json {
            path: metrics_path.clone(),
            error,
        })?;
        w.write_all(b"\n").map_err(|e| Error::io(&metrics_path, e))
    })?;
    let run_path = out.join("run.trec");
    write_atomically(&run_path, |w| {
        for (qid, list) in &report.run {
            let mut ranked = list.clone();
            ranked.sort_by(trec_order);
            for (rank, (doc, score)) in ranked.iter().take(depth).enumerate() {
                // `{}` of f32 is the shortest text that parses back to the same value.
                writeln!(w, "{qid} Q0 {doc} {} {} {tag}", rank + 1, *score as f32)
                    .map_err(|e| Error::io(&run_path, e))?;
            }
        }
        Ok(())
    })
}

/// Mean metrics in a stable order, for printing.
pub fn mean_table(evaluation: &Evaluation, ks: &[usize]) -> Vec<(String, f64)> {
    let order: BTreeMap<&String, f64> = evaluation.mean.iter().map(|(k, v)| (k, *v)).collect();
    crate::eval::metrics::metric_names(ks)
        .into_iter()
        .filter_map(|name| order.get(&name).map(|v| (name.clone(), *v)))
        .collect()
}
