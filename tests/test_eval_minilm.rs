//! `effir eval` with the real all-MiniLM-L6-v2 on Cranfield agrees with
//! sentence-transformers + pytrec_eval (benchmarks/reference_eval.py) within
//! 0.002 on nDCG@10, Recall@100 and MRR@10. SciFact, the larger check, is
//! `make eval-scifact`.

mod common;

use common::{dataset, fixture, minilm_dir, read_json};
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::eval::evaluation::{evaluate_model, EvalSettings};
use effir_pipeline::{Embedder, LoadOptions};

const AGREEMENT: f64 = 0.002;

#[test]
fn minilm_on_cranfield_agrees_with_sentence_transformers() {
    let reference = read_json(&fixture("eval/cranfield-minilm-st.json"));
    let max_length = reference["max_length"].as_u64().unwrap() as usize;
    let options = LoadOptions {
        max_length: Some(max_length),
        ..Default::default()
    };
    let embedder = Embedder::load(&minilm_dir(), &options).unwrap();
    let data = Dataset::load(&dataset("cranfield"), "test", DanglingPolicy::Strict).unwrap();
    let settings = EvalSettings {
        cache: None,
        ..Default::default()
    };
    let report = evaluate_model(&embedder, &data, &settings, &mut |_, _, _| {}).unwrap();
    for metric in ["ndcg@10", "recall@100", "mrr@10"] {
        let ours = report.evaluation.mean[metric];
        let theirs = reference["mean"][metric].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= AGREEMENT,
            "{metric}: effir {ours:.4}, sentence-transformers {theirs:.4}"
        );
    }
}
