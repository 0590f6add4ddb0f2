//! effir's metrics equal trec_eval's (through pytrec_eval) to 1e-6, per
//! query and averaged, on hand-built edge cases and on real runs.
//! References: `tests/fixtures/eval/make_metric_reference.py`.

mod common;

use std::io::Read;
use std::path::Path;

use common::{fixture, read_json};
use effir_pipeline::data::beir::load_qrels;
use effir_pipeline::eval::metrics::{evaluate, parse_run};

const TOLERANCE: f64 = 1e-6;

fn read_text(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap();
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .unwrap();
    }
    text
}

fn check_case(case: &str, run_file: &Path, qrels_dir: &Path) {
    let reference = &read_json(&fixture("eval/reference_metrics.json"))[case];
    let run = parse_run(&read_text(run_file)).unwrap();
    let qrels = load_qrels(qrels_dir, "test").unwrap();
    let ours = evaluate(&run, &qrels, &[10, 100]).unwrap();

    let want_queries = reference["per_query"].as_object().unwrap();
    assert_eq!(
        ours.per_query.keys().collect::<Vec<_>>(),
        want_queries.keys().collect::<Vec<_>>(),
        "{case}: evaluated queries"
    );
    for (qid, want) in want_queries {
        for (metric, value) in want.as_object().unwrap() {
            let got = ours.per_query[qid][metric];
            let want = value.as_f64().unwrap();
            assert!(
                (got - want).abs() <= TOLERANCE,
                "{case} query {qid} {metric}: effir {got}, trec_eval {want}"
            );
        }
    }
    for (metric, value) in reference["mean"].as_object().unwrap() {
        let (got, want) = (ours.mean[metric], value.as_f64().unwrap());
        assert!(
            (got - want).abs() <= TOLERANCE,
            "{case} mean {metric}: effir {got}, trec_eval {want}"
        );
    }
}

#[test]
fn edge_cases_match_trec_eval() {
    check_case(
        "edge",
        &fixture("eval/edge/run.trec"),
        &fixture("eval/edge"),
    );
}

#[test]
fn scifact_run_matches_trec_eval() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/scifact");
    check_case(
        "scifact",
        &fixture("eval/runs/scifact-minilm.trec.gz"),
        &data,
    );
}

#[test]
fn cranfield_run_matches_trec_eval() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/cranfield");
    check_case(
        "cranfield",
        &fixture("eval/runs/cranfield-minilm.trec.gz"),
        &data,
    );
}
