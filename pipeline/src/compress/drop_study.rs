//! The drop study (EffiR, Lei et al. 2025, §3): remove the k least important
//! attention sub-layers, or the k least important MLP sub-layers, without any
//! fine-tuning, and measure retrieval quality. In LLM retrievers quality
//! survives MLP removal far better than attention removal.

use serde::Serialize;

use crate::compress::analysis::ImportanceReport;
use crate::compress::chart::{line_chart, Series};
use crate::data::beir::Dataset;
use crate::error::{Error, Result};
use crate::eval::evaluation::{evaluate_model, EvalSettings, Phase};
use crate::model::arch::SkippedSublayers;
use crate::model::embedder::Embedder;

/// One evaluated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct DropResult {
    /// `none`, `attention` or `mlp`.
    pub dropped: String,
    pub k: usize,
    pub layers: Vec<usize>,
    pub ndcg_at_10: f64,
    pub recall_at_100: f64,
}

/// The whole study.
#[derive(Debug, Clone, Serialize)]
pub struct DropStudy {
    pub baseline: DropResult,
    pub attention: Vec<DropResult>,
    pub mlp: Vec<DropResult>,
    pub documents: usize,
    pub queries: usize,
}

/// Runs the study for every `k` in `ks`; `progress` gets a label of the
/// configuration being evaluated.
pub fn drop_study(
    embedder: &mut Embedder,
    importance: &ImportanceReport,
    dataset: &Dataset,
    ks: &[usize],
    settings: &EvalSettings,
    progress: &mut dyn FnMut(&str, Phase, usize, usize),
) -> Result<DropStudy> {
    let attention_order: Vec<usize> = importance
        .attention_by_importance()
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    let mlp_order: Vec<usize> = importance
        .mlps_by_importance()
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    if let Some(k) = ks
        .iter()
        .find(|k| **k == 0 || **k > mlp_order.len().max(attention_order.len()))
    {
        return Err(Error::InvalidArgument(format!(
            "k = {k}: the model has {} attention and {} MLP sub-layers",
            attention_order.len(),
            mlp_order.len()
        )));
    }
    let mut evaluate = |dropped: &str, k: usize, skipped: SkippedSublayers| -> Result<DropResult> {
        let layers: Vec<usize> = skipped
            .attention
            .iter()
            .chain(&skipped.mlp)
            .copied()
            .collect();
        embedder.set_skipped(skipped)?;
        let label = format!("{dropped} k={k}");
        let report = evaluate_model(embedder, dataset, settings, &mut |phase, done, total| {
            progress(&label, phase, done, total)
        })?;
        let mean = &report.evaluation.mean;
        let metric = |name: &str| mean.get(name).copied().unwrap_or(f64::NAN);
        tracing::info!(%label, ndcg10 = metric("ndcg@10"), "evaluated");
        Ok(DropResult {
            dropped: dropped.into(),
            k,
            layers,
            ndcg_at_10: metric("ndcg@10"),
            recall_at_100: metric("recall@100"),
        })
    };
    let baseline = evaluate("none", 0, SkippedSublayers::default())?;
    let mut attention = Vec::new();
    let mut mlp = Vec::new();
    for &k in ks {
        if k <= attention_order.len() {
            let skipped = SkippedSublayers {
                attention: attention_order[..k].iter().copied().collect(),
                ..Default::default()
            };
            attention.push(evaluate("attention", k, skipped)?);
        }
        if k <= mlp_order.len() {
            let skipped = SkippedSublayers {
                mlp: mlp_order[..k].iter().copied().collect(),
                ..Default::default()
            };
            mlp.push(evaluate("mlp", k, skipped)?);
        }
    }
    embedder.set_skipped(SkippedSublayers::default())?;
    Ok(DropStudy {
        baseline,
        attention,
        mlp,
        documents: dataset.corpus.len(),
        queries: dataset.queries.len(),
    })
}

impl DropStudy {
    pub fn markdown(&self, title: &str) -> String {
        let mut md = format!(
            "# {title}\n\nnDCG@10 (Recall@100) after dropping the k least important sub-layers, no fine-tuning; {} queries, {} documents.\n\n| k | attention dropped | MLP dropped |\n|---:|---|---|\n| 0 | {:.4} ({:.4}) | {:.4} ({:.4}) |\n",
            self.queries,
            self.documents,
            self.baseline.ndcg_at_10,
            self.baseline.recall_at_100,
            self.baseline.ndcg_at_10,
            self.baseline.recall_at_100
        );
        let mut ks: Vec<usize> = self
            .attention
            .iter()
            .chain(&self.mlp)
            .map(|r| r.k)
            .collect();
        ks.sort_unstable();
        ks.dedup();
        let cell = |rs: &[DropResult], k: usize| {
            rs.iter().find(|r| r.k == k).map_or("—".to_string(), |r| {
                format!(
                    "{:.4} ({:.4}) layers {:?}",
                    r.ndcg_at_10, r.recall_at_100, r.layers
                )
            })
        };
        for k in ks {
            md.push_str(&format!(
                "| {k} | {} | {} |\n",
                cell(&self.attention, k),
                cell(&self.mlp, k)
            ));
        }
        md
    }

    pub fn svg(&self, title: &str) -> String {
        let mut ks: Vec<usize> = vec![0];
        ks.extend(self.attention.iter().chain(&self.mlp).map(|r| r.k));
        ks.sort_unstable();
        ks.dedup();
        let values = |rs: &[DropResult]| -> Vec<Option<f64>> {
            ks.iter()
                .map(|&k| {
                    if k == 0 {
                        Some(self.baseline.ndcg_at_10)
                    } else {
                        rs.iter().find(|r| r.k == k).map(|r| r.ndcg_at_10)
                    }
                })
                .collect()
        };
        line_chart(
            title,
            "sub-layers dropped (k)",
            "nDCG@10",
            &ks.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            &[
                Series {
                    name: "attention dropped",
                    color: "#4e79a7",
                    values: values(&self.attention),
                },
                Series {
                    name: "MLP dropped",
                    color: "#f28e2b",
                    values: values(&self.mlp),
                },
            ],
        )
    }
}
