//! `effir validate`: is a candidate graph the model it claims to be
//! (parity with candle), and is it as good a retriever as the reference
//! (quality retention)? Gates from YAML decide; a CI job fails on any.

use std::path::{Path, PathBuf};

use effir_pipeline::compress::prune::PruneRecord;
use effir_pipeline::data::beir::Dataset;
use effir_pipeline::data::text_format::TextFormat;
use effir_pipeline::eval::evaluation::{evaluate_model, EvalReport, EvalSettings, Phase};
use effir_pipeline::finetune::FinetuneRecord;
use effir_pipeline::TextEmbedder;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::activation_ranges::{first_non_finite, NonFiniteOrigin};
use crate::error::{Error, Result};

/// Thresholds; an absent one is not checked. Unknown keys are an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    #[serde(default)]
    pub parity: ParityGates,
    #[serde(default)]
    pub quality: QualityGates,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParityGates {
    /// Lowest cosine between a text's candidate and candle embeddings.
    pub min_cosine: Option<f64>,
    pub min_mean_cosine: Option<f64>,
    /// Largest absolute difference of any embedding component.
    pub max_abs_diff: Option<f64>,
    /// Thresholds for graphs of one precision (`effir.precision` in the
    /// graph's metadata), used instead of the ones above for those graphs.
    pub fp32: Option<Box<ParityGates>>,
    pub int8: Option<Box<ParityGates>>,
    pub fp16: Option<Box<ParityGates>>,
}

impl ParityGates {
    /// The section for `precision` (`fp32`, `int8`, `fp16`) and its name
    /// prefix in reports (`parity.int8`), or these gates (`parity`).
    pub fn for_precision(&self, precision: &str) -> (&ParityGates, String) {
        let section = match precision {
            "fp32" => self.fp32.as_deref(),
            "int8" => self.int8.as_deref(),
            "fp16" => self.fp16.as_deref(),
            _ => None,
        };
        match section {
            Some(gates) => (gates, format!("parity.{precision}")),
            None => (self, "parity".into()),
        }
    }

    fn sections(&self) -> [(&'static str, Option<&ParityGates>); 3] {
        [
            ("fp32", self.fp32.as_deref()),
            ("int8", self.int8.as_deref()),
            ("fp16", self.fp16.as_deref()),
        ]
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityGates {
    /// Candidate nDCG@10 / reference nDCG@10.
    pub min_ndcg_retention: Option<f64>,
    /// Candidate Recall@100 / reference Recall@100.
    pub min_recall_retention: Option<f64>,
    /// Absolute floor of the candidate's nDCG@10.
    pub min_ndcg: Option<f64>,
}

impl Gates {
    /// Reads a gates file, rejecting unknown keys and thresholds outside
    /// their range.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let gates: Self = serde_yaml::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!("{}: invalid gates file: {e}", path.display()))
        })?;
        let check = |name: &str, value: Option<f64>, lo: f64, hi: f64| -> Result<()> {
            match value {
                Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(Error::InvalidArgument(
                    format!("{}: {name} = {v} is outside [{lo}, {hi}]", path.display()),
                )),
                _ => Ok(()),
            }
        };
        let parity_sections = std::iter::once(("parity".to_string(), &gates.parity)).chain(
            gates
                .parity
                .sections()
                .into_iter()
                .filter_map(|(name, g)| g.map(|g| (format!("parity.{name}"), g))),
        );
        for (prefix, parity) in parity_sections {
            if prefix != "parity" && parity.sections().iter().any(|(_, g)| g.is_some()) {
                return Err(Error::InvalidArgument(format!(
                    "{}: {prefix} cannot hold precision sections of its own",
                    path.display()
                )));
            }
            check(
                &format!("{prefix}.min_cosine"),
                parity.min_cosine,
                -1.0,
                1.0,
            )?;
            check(
                &format!("{prefix}.min_mean_cosine"),
                parity.min_mean_cosine,
                -1.0,
                1.0,
            )?;
            check(
                &format!("{prefix}.max_abs_diff"),
                parity.max_abs_diff,
                0.0,
                f64::MAX,
            )?;
        }
        check(
            "quality.min_ndcg_retention",
            gates.quality.min_ndcg_retention,
            0.0,
            10.0,
        )?;
        check(
            "quality.min_recall_retention",
            gates.quality.min_recall_retention,
            0.0,
            10.0,
        )?;
        check("quality.min_ndcg", gates.quality.min_ndcg, 0.0, 1.0)?;
        Ok(gates)
    }

    pub fn wants_quality(&self) -> bool {
        let q = &self.quality;
        q.min_ndcg_retention.is_some() || q.min_recall_retention.is_some() || q.min_ndcg.is_some()
    }
}

/// Candidate vs candle embeddings of the same texts.
#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    /// The candle model the candidate was compared with.
    pub candle_model: PathBuf,
    pub texts: usize,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    pub max_abs_diff: f64,
    /// Embedding components of the candidate that were NaN or Inf.
    pub non_finite: usize,
    /// Where the graph first produced them.
    pub non_finite_origin: Option<NonFiniteOrigin>,
}

/// Compares the rows of two embedding matrices.
pub fn compare_embeddings(
    candidate: &Array2<f32>,
    reference: &Array2<f32>,
) -> Result<(f64, f64, f64)> {
    if candidate.dim() != reference.dim() {
        return Err(Error::Interface {
            path: PathBuf::new(),
            message: format!(
                "candidate embeddings are {:?}, the candle model's {:?}",
                candidate.dim(),
                reference.dim()
            ),
        });
    }
    let mut min_cos = f64::INFINITY;
    let mut sum_cos = 0.0;
    let mut max_diff = 0.0f64;
    for (a, b) in candidate.rows().into_iter().zip(reference.rows()) {
        let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b.iter()) {
            let (x, y) = (x as f64, y as f64);
            dot += x * y;
            na += x * x;
            nb += y * y;
            max_diff = max_diff.max((x - y).abs());
        }
        let cos = if na == 0.0 || nb == 0.0 {
            if na == nb {
                1.0
            } else {
                0.0
            }
        } else {
            dot / (na.sqrt() * nb.sqrt())
        };
        let cos = if cos.is_nan() { -1.0 } else { cos };
        min_cos = min_cos.min(cos);
        sum_cos += cos;
    }
    let n = candidate.nrows().max(1) as f64;
    Ok((min_cos, sum_cos / n, max_diff))
}

/// Texts for the parity check: queries (with their prompt) and documents
/// (in the model's document format) spread over the dataset, `count` in all.
pub fn parity_texts(dataset: &Dataset, format: &TextFormat, count: usize) -> Vec<String> {
    let queries = count / 2;
    let docs = count - queries;
    let spread = |len: usize, take: usize| -> Vec<usize> {
        if len == 0 || take == 0 {
            return Vec::new();
        }
        let take = take.min(len);
        (0..take).map(|i| i * len / take).collect()
    };
    let mut texts: Vec<String> = spread(dataset.queries.len(), queries)
        .into_iter()
        .map(|i| format.query(&dataset.queries[i].text))
        .collect();
    texts.extend(
        spread(dataset.corpus.len(), docs)
            .into_iter()
            .map(|i| format.document(&dataset.corpus[i])),
    );
    texts
}

/// Parity of `candidate` with `candle` on `texts`.
pub fn check_parity(
    candidate: &dyn TextEmbedder,
    candle: &dyn TextEmbedder,
    texts: &[String],
    batch_size: usize,
) -> Result<ParityReport> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument(
            "no texts for the parity check".into(),
        ));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let a = candidate.embed_texts(&refs, "", batch_size, &mut |_| {})?;
    let b = candle.embed_texts(&refs, "", batch_size, &mut |_| {})?;
    let (min_cosine, mean_cosine, max_abs_diff) = compare_embeddings(&a, &b)?;
    let non_finite = a.iter().filter(|v| !v.is_finite()).count();
    let non_finite_origin = if non_finite > 0 {
        locate_non_finite(candidate, texts, &a, batch_size)
    } else {
        None
    };
    Ok(ParityReport {
        candle_model: candle.source().to_path_buf(),
        texts: texts.len(),
        min_cosine,
        mean_cosine,
        max_abs_diff,
        non_finite,
        non_finite_origin,
    })
}

/// Where an ONNX candidate's NaN/Inf embeddings come from: its graph run
/// again on (up to 8 of) the texts whose embeddings were not finite.
fn locate_non_finite(
    candidate: &dyn TextEmbedder,
    texts: &[String],
    embeddings: &Array2<f32>,
    batch_size: usize,
) -> Option<NonFiniteOrigin> {
    let graph = candidate.source();
    if graph.extension().and_then(|e| e.to_str()) != Some("onnx") {
        return None;
    }
    let bad: Vec<String> = embeddings
        .rows()
        .into_iter()
        .zip(texts)
        .filter(|(row, _)| row.iter().any(|v| !v.is_finite()))
        .map(|(_, t)| t.clone())
        .take(8)
        .collect();
    match first_non_finite(graph, candidate.setup(), &bad, batch_size) {
        Ok(origin) => origin,
        Err(e) => {
            tracing::warn!(
                "could not locate the first NaN/Inf in {}: {e}",
                graph.display()
            );
            None
        }
    }
}

/// Retrieval quality of the candidate against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub dataset: PathBuf,
    pub split: String,
    pub documents: usize,
    pub queries: usize,
    pub reference_ndcg_at_10: f64,
    pub candidate_ndcg_at_10: f64,
    pub reference_recall_at_100: f64,
    pub candidate_recall_at_100: f64,
    pub ndcg_retention: f64,
    pub recall_retention: f64,
}

impl QualityReport {
    /// The dataset's directory name (`scifact`, `cranfield`).
    pub fn name(&self) -> String {
        self.dataset.file_name().map_or_else(
            || self.dataset.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    }
}

fn mean_metric(report: &EvalReport, name: &str) -> Result<f64> {
    report
        .evaluation
        .mean
        .get(name)
        .copied()
        .ok_or_else(|| Error::InvalidArgument(format!("metric {name} was not computed")))
}

/// Evaluates both models on `dataset`; `progress` gets `(which, phase,
/// done, total)` with `which` "reference" or "candidate".
pub fn check_quality(
    reference: &dyn TextEmbedder,
    candidate: &dyn TextEmbedder,
    dataset: &Dataset,
    settings: &EvalSettings,
    progress: &mut dyn FnMut(&str, Phase, usize, usize),
) -> Result<QualityReport> {
    let mut settings = settings.clone();
    for k in [10, 100] {
        if !settings.ks.contains(&k) {
            settings.ks.push(k);
        }
    }
    let r = evaluate_model(reference, dataset, &settings, &mut |p, d, t| {
        progress("reference", p, d, t)
    })?;
    let c = evaluate_model(candidate, dataset, &settings, &mut |p, d, t| {
        progress("candidate", p, d, t)
    })?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let (rn, cn) = (mean_metric(&r, "ndcg@10")?, mean_metric(&c, "ndcg@10")?);
    let (rr, cr) = (
        mean_metric(&r, "recall@100")?,
        mean_metric(&c, "recall@100")?,
    );
    Ok(QualityReport {
        dataset: dataset.dir.clone(),
        split: dataset.split.clone(),
        documents: dataset.corpus.len(),
        queries: dataset.queries.len(),
        reference_ndcg_at_10: rn,
        candidate_ndcg_at_10: cn,
        reference_recall_at_100: rr,
        candidate_recall_at_100: cr,
        ndcg_retention: ratio(cn, rn),
        recall_retention: ratio(cr, rr),
    })
}

/// One gate's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    pub gate: String,
    /// `>=` or `<=`.
    pub rule: &'static str,
    pub threshold: f64,
    pub value: f64,
    pub passed: bool,
    /// What a failure means, where a number does not say it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Applies `gates` to whatever was measured on a candidate of `precision`
/// (`fp32`, `int8`): its parity section when the gates have one.
pub fn apply_gates(
    gates: &Gates,
    precision: &str,
    parity: Option<&ParityReport>,
    quality: &[QualityReport],
) -> Vec<GateResult> {
    let mut results = Vec::new();
    // `rule` is ">=" (a floor) or "<=" (a ceiling); gates without a
    // threshold or without a measurement are not applied.
    let mut check = |gate: &str, rule: &'static str, threshold: Option<f64>, value: Option<f64>| {
        if let (Some(t), Some(v)) = (threshold, value) {
            let passed = if rule == ">=" { v >= t } else { v <= t };
            results.push(GateResult {
                gate: gate.into(),
                rule,
                threshold: t,
                value: v,
                passed,
                detail: None,
            });
        }
    };
    let ((p, prefix), q) = (gates.parity.for_precision(precision), &gates.quality);
    check(
        &format!("{prefix}.min_cosine"),
        ">=",
        p.min_cosine,
        parity.map(|r| r.min_cosine),
    );
    check(
        &format!("{prefix}.min_mean_cosine"),
        ">=",
        p.min_mean_cosine,
        parity.map(|r| r.mean_cosine),
    );
    // The quality gates hold on every dataset, so the worst one decides;
    // with several datasets each gate names its dataset.
    for report in quality {
        let name = |gate: &str| match quality.len() {
            1 => gate.to_string(),
            _ => format!("{gate} on {}", report.name()),
        };
        check(
            &name("quality.min_ndcg_retention"),
            ">=",
            q.min_ndcg_retention,
            Some(report.ndcg_retention),
        );
        check(
            &name("quality.min_recall_retention"),
            ">=",
            q.min_recall_retention,
            Some(report.recall_retention),
        );
        check(
            &name("quality.min_ndcg"),
            ">=",
            q.min_ndcg,
            Some(report.candidate_ndcg_at_10),
        );
    }
    check(
        &format!("{prefix}.max_abs_diff"),
        "<=",
        p.max_abs_diff,
        parity.map(|r| r.max_abs_diff),
    );
    // NaN or Inf fails any precision, with where it came from.
    if let Some(r) = parity {
        results.push(GateResult {
            gate: "parity.non_finite".into(),
            rule: "<=",
            threshold: 0.0,
            value: r.non_finite as f64,
            passed: r.non_finite == 0,
            detail: (r.non_finite > 0).then(|| match &r.non_finite_origin {
                Some(origin) => origin.to_string(),
                None => "NaN/Inf in the embeddings; its origin in the graph was not found".into(),
            }),
        });
    }
    results
}

/// How the candidate was made, from the records `effir prune` and `effir
/// finetune` wrote into its source model, read back as their types.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Provenance {
    /// The MLPs pruning dropped (in the order it dropped them), each
    /// layer's MLP width and the share of MLP neurons kept.
    pub pruning: Option<PruningProvenance>,
    /// The data the candidate was fine-tuned on, labeled (`--train`) or not
    /// (`--train-texts`, `--train-queries`): quality measured on it is not held out.
    pub tuned_on: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PruningProvenance {
    pub dropped_mlps: Vec<usize>,
    pub mlp_widths: Vec<Option<usize>>,
    pub mlp_keep: f64,
}

impl Provenance {
    /// The records in `model_dir`; none when it is neither pruned nor fine-tuned.
    pub fn read(model_dir: &Path) -> Result<Self> {
        let pruning = PruneRecord::read(model_dir)?.map(|r| PruningProvenance {
            dropped_mlps: r.dropped_mlps,
            mlp_widths: r.mlp_widths,
            mlp_keep: r.mlp_keep_achieved,
        });
        let tuned_on = FinetuneRecord::read(model_dir)?
            .map(|r| {
                r.train
                    .into_iter()
                    .chain(r.train_texts)
                    .chain(r.train_queries)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self { pruning, tuned_on })
    }

    /// Whether the candidate was fine-tuned on `dataset` (the same directory,
    /// or a file inside it such as a hard-negatives file's dataset).
    pub fn was_tuned_on(&self, dataset: &Path) -> bool {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        self.tuned_on
            .iter()
            .any(|train| canonical(train).starts_with(canonical(dataset)))
    }
}

/// Everything `validate` found.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub reference: PathBuf,
    pub candidate: PathBuf,
    pub providers: Vec<String>,
    /// Whether ONNX Runtime optimized the graph (`none`: run as stored).
    pub graph_optimization: crate::providers::GraphOptimization,
    /// The candidate's arithmetic (`fp32`, `int8`), from its metadata.
    pub precision: String,
    pub int8_kernel: Option<String>,
    /// The CPU validation ran on (int8 results depend on it).
    pub cpu_features: crate::cpu_features::CpuFeatures,
    /// How the candidate's source model was made.
    pub provenance: Provenance,
    pub parity: Option<ParityReport>,
    /// One report per dataset (`--data`, repeatable).
    pub quality: Vec<QualityReport>,
    pub gates: Vec<GateResult>,
    pub passed: bool,
}

impl ValidationReport {
    /// Whether the candidate's int8 products can saturate where it was
    /// validated: the u8s8 kernel, run by ONNX Runtime's CPU provider on an
    /// x86 CPU without VNNI.
    pub fn int8_may_saturate(&self) -> bool {
        self.int8_kernel.as_deref() == Some(crate::precision::Int8Kernel::U8s8.name())
            && self.providers.first().map(String::as_str) == Some("cpu")
            && self.cpu_features.u8s8_may_saturate()
    }

    pub fn failed_gates(&self) -> Vec<&GateResult> {
        self.gates.iter().filter(|g| !g.passed).collect()
    }

    /// The figures for the candidate's model card, with no machine path:
    /// directories are named by their last component.
    pub fn card_section(&self) -> String {
        let name = |p: &Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        let mut md = format!(
            "Result: **{}** ({} on {}; reference model `{}`).\n",
            if self.passed { "PASS" } else { "FAIL" },
            self.precision,
            self.providers.join(", "),
            name(&self.reference),
        );
        if let Some(p) = &self.parity {
            md += &format!(
                "\n- parity with `{}` in candle, {} texts: lowest cosine {:.7}, mean {:.7}\n",
                name(&p.candle_model),
                p.texts,
                p.min_cosine,
                p.mean_cosine
            );
        }
        if !self.quality.is_empty() {
            md += "\n| dataset | split | documents | nDCG@10 | reference | retention | held out |\n|---|---|---:|---:|---:|---:|---|\n";
        }
        for q in &self.quality {
            md += &format!(
                "| {} | {} | {} | {:.4} | {:.4} | {:.1} % | {} |\n",
                name(&q.dataset),
                q.split,
                q.documents,
                q.candidate_ndcg_at_10,
                q.reference_ndcg_at_10,
                100.0 * q.ndcg_retention,
                if self.provenance.was_tuned_on(&q.dataset) {
                    "no: fine-tuned on it"
                } else {
                    "yes"
                }
            );
        }
        let failed = self.failed_gates();
        if !failed.is_empty() {
            md += &format!(
                "\nFailed gates: {}.\n",
                failed
                    .iter()
                    .map(|g| format!("`{}` ({:.6} {} {})", g.gate, g.value, g.rule, g.threshold))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        md
    }

    pub fn to_markdown(&self) -> String {
        let mut md = format!(
            "# effir validate\n\n- reference: `{}`\n- candidate: `{}` ({}{})\n- execution providers: {}{}\n- CPU: {}\n- result: **{}**\n",
            self.reference.display(),
            self.candidate.display(),
            self.precision,
            self.int8_kernel
                .as_deref()
                .map_or(String::new(), |k| format!(", {k} kernel")),
            self.providers.join(", "),
            match self.graph_optimization {
                crate::providers::GraphOptimization::All => "",
                crate::providers::GraphOptimization::None => " (graph run as stored, not optimized)",
            },
            self.cpu_features,
            if self.passed { "PASS" } else { "FAIL" }
        );
        if self.int8_may_saturate() {
            md += "- note: this CPU has no VNNI, so the graph's u8s8 products can saturate here; \
                   a graph exported on it with `--int8-kernel auto` (or `reduce-range`) cannot\n";
        }
        if let Some(p) = &self.provenance.pruning {
            md += &format!(
                "- pruned: MLPs {:?} dropped, {:.1} % of the MLP neurons kept (widths {:?})\n",
                p.dropped_mlps,
                100.0 * p.mlp_keep,
                p.mlp_widths
            );
        }
        for train in &self.provenance.tuned_on {
            md += &format!("- fine-tuned on: `{}`\n", train.display());
        }
        if let Some(p) = &self.parity {
            md += &format!(
                "\n## Parity (candidate under ONNX Runtime vs `{}` in candle, {} texts)\n\n| min cosine | mean cosine | max abs diff |\n|---|---|---|\n| {:.7} | {:.7} | {:.3e} |\n",
                p.candle_model.display(),
                p.texts,
                p.min_cosine,
                p.mean_cosine,
                p.max_abs_diff
            );
        }
        for q in &self.quality {
            md += &format!(
                "\n## Quality ({}, split {}, {} queries, {} documents)\n\n| | reference | candidate | retention |\n|---|---|---|---|\n| nDCG@10 | {:.4} | {:.4} | {:.4} |\n| Recall@100 | {:.4} | {:.4} | {:.4} |\n",
                q.dataset.display(),
                q.split,
                q.queries,
                q.documents,
                q.reference_ndcg_at_10,
                q.candidate_ndcg_at_10,
                q.ndcg_retention,
                q.reference_recall_at_100,
                q.candidate_recall_at_100,
                q.recall_retention
            );
            if self.provenance.was_tuned_on(&q.dataset) {
                md += "\nThe candidate was fine-tuned on this dataset's text: its quality here is not held out.\n";
            }
        }
        if let Some(worst) = self
            .quality
            .iter()
            .min_by(|a, b| a.ndcg_retention.total_cmp(&b.ndcg_retention))
            .filter(|_| self.quality.len() > 1)
        {
            md += &format!(
                "\nWorst nDCG@10 retention: {:.4} ({}).\n",
                worst.ndcg_retention,
                worst.name()
            );
        }
        md += "\n## Gates\n\n| gate | rule | value | result |\n|---|---|---|---|\n";
        for g in &self.gates {
            md += &format!(
                "| {} | {} {} | {:.6} | {}{} |\n",
                g.gate,
                g.rule,
                g.threshold,
                g.value,
                if g.passed { "pass" } else { "FAIL" },
                g.detail
                    .as_deref()
                    .map_or(String::new(), |d| format!(": {d}"))
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_on_the_tuning_data_is_not_held_out() {
        let work = tempfile::tempdir().unwrap();
        let scifact = work.path().join("scifact");
        let cranfield = work.path().join("cranfield");
        std::fs::create_dir_all(&scifact).unwrap();
        std::fs::create_dir_all(&cranfield).unwrap();
        let tuned = |train: &Path| Provenance {
            pruning: None,
            tuned_on: vec![train.to_path_buf()],
        };
        assert!(tuned(&scifact).was_tuned_on(&scifact));
        assert!(tuned(&scifact.join("train_hard_negatives.jsonl.gz")).was_tuned_on(&scifact));
        assert!(!tuned(&scifact).was_tuned_on(&cranfield));
        assert!(!Provenance::default().was_tuned_on(&scifact));
    }

    #[test]
    fn identical_embeddings_have_cosine_one_and_no_difference() {
        let a = Array2::from_shape_vec((2, 3), vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0]).unwrap();
        let (min, mean, diff) = compare_embeddings(&a, &a).unwrap();
        assert!((min - 1.0).abs() < 1e-12 && (mean - 1.0).abs() < 1e-12);
        assert_eq!(diff, 0.0);
        let mut b = a.clone();
        b[[1, 0]] = 1.0;
        let (min, _, diff) = compare_embeddings(&b, &a).unwrap();
        assert!(min < 0.5, "{min}");
        assert_eq!(diff, 2.0);
    }

    #[test]
    fn gates_compare_in_the_right_direction() {
        let gates = Gates {
            parity: ParityGates {
                min_cosine: Some(0.99999),
                max_abs_diff: Some(1e-4),
                ..Default::default()
            },
            quality: QualityGates::default(),
        };
        let parity = ParityReport {
            candle_model: PathBuf::new(),
            texts: 2,
            min_cosine: 0.999995,
            mean_cosine: 0.999999,
            max_abs_diff: 2e-4,
            non_finite: 0,
            non_finite_origin: None,
        };
        let results = apply_gates(&gates, "fp32", Some(&parity), &[]);
        assert_eq!(results.len(), 3);
        assert!(results[0].passed, "cosine 0.999995 >= 0.99999");
        assert!(!results[1].passed, "diff 2e-4 > 1e-4");
        assert_eq!(results[2].gate, "parity.non_finite");
        assert!(results[2].passed, "no NaN or Inf");
    }

    /// With several datasets the quality gates hold on each, named by
    /// dataset, so the worst retention decides.
    #[test]
    fn quality_gates_apply_to_every_dataset() {
        let gates = Gates {
            parity: ParityGates::default(),
            quality: QualityGates {
                min_ndcg_retention: Some(0.98),
                ..Default::default()
            },
        };
        let report = |dir: &str, retention: f64| QualityReport {
            dataset: PathBuf::from("data").join(dir),
            split: "test".into(),
            documents: 10,
            queries: 2,
            reference_ndcg_at_10: 0.5,
            candidate_ndcg_at_10: 0.5 * retention,
            reference_recall_at_100: 0.9,
            candidate_recall_at_100: 0.9,
            ndcg_retention: retention,
            recall_retention: 1.0,
        };
        let both = [report("scifact", 1.01), report("cranfield", 0.97)];
        let results = apply_gates(&gates, "fp32", None, &both);
        assert_eq!(
            results
                .iter()
                .map(|g| (g.gate.as_str(), g.passed))
                .collect::<Vec<_>>(),
            [
                ("quality.min_ndcg_retention on scifact", true),
                ("quality.min_ndcg_retention on cranfield", false)
            ]
        );
        // One dataset: the plain gate name.
        let one = apply_gates(&gates, "fp32", None, &both[..1]);
        assert_eq!(one[0].gate, "quality.min_ndcg_retention");
    }

    /// A precision's section replaces the plain parity gates for graphs of
    /// that precision, and only for them.
    #[test]
    fn precision_sections_apply_to_their_precision() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("gates.yaml");
        std::fs::write(
            &path,
            "parity:\n  min_cosine: 0.99999\n  max_abs_diff: 1.0e-4\n  int8:\n    min_cosine: 0.99\n",
        )
        .unwrap();
        let gates = Gates::load(&path).unwrap();
        let parity = ParityReport {
            candle_model: PathBuf::new(),
            texts: 2,
            min_cosine: 0.995,
            mean_cosine: 0.998,
            max_abs_diff: 3e-2,
            non_finite: 0,
            non_finite_origin: None,
        };
        let int8 = apply_gates(&gates, "int8", Some(&parity), &[]);
        assert_eq!(int8.len(), 2);
        assert_eq!(int8[0].gate, "parity.int8.min_cosine");
        assert!(int8[0].passed);
        let fp32 = apply_gates(&gates, "fp32", Some(&parity), &[]);
        assert_eq!(
            fp32.iter()
                .map(|g| (g.gate.as_str(), g.passed))
                .collect::<Vec<_>>(),
            [
                ("parity.min_cosine", false),
                ("parity.max_abs_diff", false),
                ("parity.non_finite", true)
            ]
        );

        for (yaml, needle) in [
            (
                "parity:\n  int8:\n    min_cosine: 1.5\n",
                "parity.int8.min_cosine",
            ),
            (
                "parity:\n  int8:\n    int8:\n      min_cosine: 0.9\n",
                "cannot hold precision sections",
            ),
            ("parity:\n  int4:\n    min_cosine: 0.9\n", "int4"),
        ] {
            std::fs::write(&path, yaml).unwrap();
            let error = Gates::load(&path).unwrap_err().to_string();
            assert!(error.contains(needle), "{yaml}: {error}");
        }
    }
}
