//! Retrieval metrics with trec_eval semantics (as pytrec_eval and BEIR
//! compute them).
//!
//! * A run's documents are ranked by score, descending; equal scores are
//!   ordered by document id, descending (trec_eval's `comp_sim_docno`). The
//!   rank column of a run file is ignored, as trec_eval ignores it.
//! * A document is relevant when its grade is at least 1.
//! * `ndcg@k`: gain = grade, discount `log2(rank + 1)`; the ideal ranking
//!   sorts every judged document by grade and is truncated at `k`
//!   (trec_eval `ndcg_cut`).
//! * `recall@k`: relevant documents in the top `k` / all relevant documents.
//! * `p@k`: relevant documents in the top `k` / `k`.
//! * `map@k`: sum of precision at each relevant document in the top `k`,
//!   divided by the number of relevant documents (trec_eval `map_cut`).
//! * `mrr@k`: 1 / rank of the first relevant document within the top `k`;
//!   `mrr`: the same over the whole run (trec_eval `recip_rank`).
//! * A query without relevant documents scores 0 on every measure.
//! * Only queries both judged and retrieved are evaluated; means are over them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::beir::Qrels;
use crate::error::{Error, Result};

/// Retrieved documents of each query: `(document id, score)`, in any order.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// The metric values of each query and their means.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    pub mean: BTreeMap<String, f64>,
    pub per_query: BTreeMap<String, BTreeMap<String, f64>>,
}

/// trec_eval's order: higher score first, then larger document id first.
pub fn trec_order(a: &(String, f64), b: &(String, f64)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
}

/// Names of the metrics computed for cut-offs `ks`, in report order.
pub fn metric_names(ks: &[usize]) -> Vec<String> {
    let mut names = Vec::new();
    for prefix in ["ndcg", "recall", "mrr", "map", "p"] {
        for k in ks {
            names.push(format!("{prefix}@{k}"));
        }
    }
    names.push("mrr".to_string());
    names
}

/// Evaluates `run` against `qrels` at every cut-off in `ks`.
pub fn evaluate(run: &Run, qrels: &Qrels, ks: &[usize]) -> Result<Evaluation> {
    if ks.is_empty() {
        return Err(Error::InvalidArgument("no metric cut-off given".into()));
    }
    if let Some(k) = ks.iter().find(|k| **k == 0) {
        return Err(Error::InvalidArgument(format!(
            "cut-off k must be at least 1, got {k}"
        )));
    }
    let mut per_query = BTreeMap::new();
    for (qid, retrieved) in run {
        let Some(judged) = qrels.get(qid) else {
            continue;
        };
        let mut ranking = retrieved.clone();
        ranking.sort_by(trec_order);
        ranking.dedup_by(|a, b| a.0 == b.0);
        per_query.insert(qid.clone(), evaluate_query(&ranking, judged, ks));
    }
    let mut mean = BTreeMap::new();
    for name in metric_names(ks) {
        let sum: f64 = per_query
            .values()
            .map(|m: &BTreeMap<String, f64>| m[&name])
            .sum();
        mean.insert(
            name,
            if per_query.is_empty() {
                0.0
            } else {
                sum / per_query.len() as f64
            },
        );
    }
    Ok(Evaluation { mean, per_query })
}

fn evaluate_query(
    ranking: &[(String, f64)],
    judged: &BTreeMap<String, i64>,
    ks: &[usize],
) -> BTreeMap<String, f64> {
    let grade = |doc: &str| judged.get(doc).copied().unwrap_or(0);
    let num_rel = judged.values().filter(|g| **g >= 1).count();
    let mut ideal: Vec<i64> = judged.values().copied().filter(|g| *g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let discount = |rank0: usize| 1.0 / ((rank0 + 2) as f64).log2();
    let first_relevant = ranking.iter().position(|(d, _)| grade(d) >= 1);

    let mut out = BTreeMap::new();
    for &k in ks {
        let top = &ranking[..ranking.len().min(k)];
        let dcg: f64 = top
            .iter()
            .enumerate()
            .map(|(i, (d, _))| grade(d).max(0) as f64 * discount(i))
            .sum();
        let idcg: f64 = ideal
            .iter()
            .take(k)
            .enumerate()
            .map(|(i, g)| *g as f64 * discount(i))
            .sum();
        let mut hits = 0usize;
        let mut precision_sum = 0.0;
        for (i, (d, _)) in top.iter().enumerate() {
            if grade(d) >= 1 {
                hits += 1;
                precision_sum += hits as f64 / (i + 1) as f64;
            }
        }
        let ratio = |x: f64| {
            if num_rel == 0 {
                0.0
            } else {
                x / num_rel as f64
            }
        };
        out.insert(
            format!("ndcg@{k}"),
            if idcg > 0.0 { dcg / idcg } else { 0.0 },
        );
        out.insert(format!("recall@{k}"), ratio(hits as f64));
        out.insert(format!("map@{k}"), ratio(precision_sum));
        out.insert(format!("p@{k}"), hits as f64 / k as f64);
        out.insert(
            format!("mrr@{k}"),
            first_relevant
                .filter(|r| *r < k)
                .map_or(0.0, |r| 1.0 / (r + 1) as f64),
        );
    }
    out.insert(
        "mrr".to_string(),
        first_relevant.map_or(0.0, |r| 1.0 / (r + 1) as f64),
    );
    out
}

/// Parses a TREC run file (`qid Q0 docid rank score tag`).
pub fn parse_run(text: &str) -> std::result::Result<Run, String> {
    let mut run = Run::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [qid, _, docid, _, score, ..] = fields.as_slice() else {
            return Err(format!(
                "line {}: expected 6 fields, got {}",
                i + 1,
                fields.len()
            ));
        };
        let score: f64 = score
            .parse()
            .map_err(|_| format!("line {}: score `{score}` is not a number", i + 1))?;
        run.entry(qid.to_string())
            .or_default()
            .push((docid.to_string(), score));
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qrels(entries: &[(&str, &str, i64)]) -> Qrels {
        let mut q = Qrels::new();
        for (qid, doc, g) in entries {
            q.entry(qid.to_string())
                .or_default()
                .insert(doc.to_string(), *g);
        }
        q
    }

    #[test]
    fn ties_are_ordered_by_descending_document_id() {
        let run = parse_run("q Q0 a 1 0.5 t\nq Q0 c 2 0.5 t\nq Q0 b 3 0.5 t\n").unwrap();
        // With equal scores trec_eval ranks c, b, a: the relevant `a` is third.
        let eval = evaluate(&run, &qrels(&[("q", "a", 1)]), &[1, 3]).unwrap();
        assert_eq!(eval.per_query["q"]["mrr"], 1.0 / 3.0);
        assert_eq!(eval.per_query["q"]["recall@1"], 0.0);
        assert_eq!(eval.per_query["q"]["recall@3"], 1.0);
    }

    #[test]
    fn ndcg_uses_grades_and_an_ideal_ranking_of_all_judged_documents() {
        let run = parse_run("q Q0 a 1 3 t\nq Q0 b 2 2 t\n").unwrap();
        // a: grade 1 at rank 1, b: grade 0; an unretrieved `c` has grade 2.
        let eval = evaluate(
            &run,
            &qrels(&[("q", "a", 1), ("q", "b", 0), ("q", "c", 2)]),
            &[2],
        )
        .unwrap();
        let dcg = 1.0;
        let idcg = 2.0 + 1.0 / 3f64.log2();
        assert!((eval.per_query["q"]["ndcg@2"] - dcg / idcg).abs() < 1e-12);
    }

    #[test]
    fn unjudged_queries_are_skipped_and_k_zero_is_rejected() {
        let run = parse_run("q Q0 a 1 1 t\nx Q0 a 1 1 t\n").unwrap();
        let eval = evaluate(&run, &qrels(&[("q", "a", 1)]), &[10]).unwrap();
        assert_eq!(eval.per_query.len(), 1);
        assert_eq!(eval.mean["ndcg@10"], 1.0);
        assert!(evaluate(&run, &qrels(&[("q", "a", 1)]), &[0]).is_err());
    }
}
