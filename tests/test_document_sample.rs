//! The evaluation subset `--doc-sample N --seed S` uses when a full corpus is
//! too slow to encode: every judged document of the split plus seeded random
//! others, N in all, in corpus order, the same for the same seed.

mod common;

use std::collections::HashSet;

use common::dataset;
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};

fn ids(d: &Dataset) -> Vec<String> {
    d.corpus.iter().map(|doc| doc.id.clone()).collect()
}

#[test]
fn a_document_sample_keeps_every_judged_document_and_is_seeded() {
    let full = Dataset::load(&dataset("scifact"), "test", DanglingPolicy::Strict).unwrap();
    let judged: HashSet<String> = full
        .qrels
        .values()
        .flat_map(|docs| docs.keys().cloned())
        .collect();
    assert!(judged.len() < 1000);

    let sample = full.clone().with_document_sample(1000, 0);
    let kept: HashSet<String> = ids(&sample).into_iter().collect();
    assert_eq!(sample.corpus.len(), 1000);
    assert!(judged.is_subset(&kept), "a judged document was left out");
    assert_eq!(sample.queries.len(), full.queries.len());

    // Corpus order is kept: the sample is a subsequence of the corpus.
    let position: std::collections::HashMap<&str, usize> = full
        .corpus
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    let order: Vec<usize> = sample
        .corpus
        .iter()
        .map(|d| position[d.id.as_str()])
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]));

    // Same seed, same documents; another seed, other random documents.
    assert_eq!(
        ids(&full.clone().with_document_sample(1000, 0)),
        ids(&sample)
    );
    let other = full.clone().with_document_sample(1000, 1);
    assert_ne!(ids(&other), ids(&sample));
    assert!(judged.is_subset(&ids(&other).into_iter().collect()));

    // A sample as large as the corpus is the corpus.
    let all = full.clone().with_document_sample(full.corpus.len(), 0);
    assert_eq!(ids(&all), ids(&full));
}

/// Every command that takes `--doc-sample` refuses an empty sample before
/// any work, naming the flag, and writes nothing.
#[test]
fn every_command_refuses_an_empty_document_sample() {
    let work = tempfile::tempdir().unwrap();
    let model = common::fixture("bert");
    let data = common::fixture("eval/tiny");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let gates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml");
    let gates = gates.to_str().unwrap();
    let out = work.path().join("out");
    let out = out.to_str().unwrap();
    let runs: [&[&str]; 4] = [
        &["eval", "--model", model, "--data", data, "--out", out],
        &["encode", "--model", model, "--data", data, "--out", out],
        &["drop-study", "--model", model, "--data", data, "--out", out],
        &[
            "validate",
            "--reference",
            model,
            "--candidate",
            model,
            "--data",
            data,
            "--gates",
            gates,
            "--out",
            out,
        ],
    ];
    for args in runs {
        let mut args = args.to_vec();
        args.extend(["--doc-sample", "0"]);
        let o = common::effir(&args);
        let err = common::stderr(&o);
        assert!(
            !o.status.success() && err.contains("--doc-sample must be at least 1"),
            "{}: {err}",
            args[0]
        );
        assert!(
            !work.path().join("out").exists(),
            "{} wrote output",
            args[0]
        );
    }
}
