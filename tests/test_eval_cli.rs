//! `effir eval` as a user runs it, on a tiny BEIR dataset and a tiny model:
//! its outputs, the corpus-embedding cache, and clear errors on bad data.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{copy_model, edit_weights, effir, fixture, stderr};

fn effir_eval(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    effir(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tiny_data() -> tempfile::TempDir {
    copy_model(&fixture("eval/tiny"))
}

fn cache_args(cache: &Path) -> Vec<String> {
    vec!["--cache-dir".into(), cache.to_str().unwrap().into()]
}

/// Runs eval with a cache and returns whether the corpus came from it.
fn eval_cached(model: &Path, data: &Path, cache: &Path, extra: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = cache_args(cache);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = effir_eval(model, data, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    (text.contains("from cache"), text)
}

fn assert_fails(out: &Output, needles: &[&str], out_dir: &Path) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out_dir.join("metrics.json").exists() && !out_dir.join("run.trec").exists());
}

#[test]
fn writes_metrics_json_and_a_trec_run() {
    let data = tiny_data();
    let out_dir = tempfile::tempdir().unwrap();
    let out = effir_eval(
        &fixture("bert"),
        data.path(),
        &[
            "--out",
            out_dir.path().to_str().unwrap(),
            "--k",
            "1,3",
            "--no-cache",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("metrics.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "ndcg@1", "ndcg@3", "recall@3", "mrr@3", "map@3", "p@1", "mrr",
    ] {
        let v = metrics["mean"][key]
            .as_f64()
            .unwrap_or_else(|| panic!("no mean {key}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    // q4 has no judgement: skipped. q1..q3 are judged.
    let per_query = metrics["per_query"].as_object().unwrap();
    assert_eq!(per_query.keys().collect::<Vec<_>>(), vec!["q1", "q2", "q3"]);
    let run = std::fs::read_to_string(out_dir.path().join("run.trec")).unwrap();
    let lines: Vec<Vec<&str>> = run.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3 * 6, "every document of every judged query");
    for line in &lines {
        assert_eq!(line.len(), 6);
        assert_eq!(line[1], "Q0");
        assert_eq!(line[5], "effir");
    }
    // Ranks count up per query and scores do not increase.
    let q1: Vec<&Vec<&str>> = lines.iter().filter(|l| l[0] == "q1").collect();
    assert_eq!(
        q1.iter().map(|l| l[3]).collect::<Vec<_>>(),
        vec!["1", "2", "3", "4", "5", "6"]
    );
    let scores: Vec<f32> = q1.iter().map(|l| l[4].parse().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // The metrics in the file are those of the run file.
    let qrels = effir_pipeline::data::beir::load_qrels(data.path(), "test").unwrap();
    let reparsed = effir_pipeline::eval::metrics::parse_run(&run).unwrap();
    let again = effir_pipeline::eval::metrics::evaluate(&reparsed, &qrels, &[1, 3]).unwrap();
    assert_eq!(
        metrics["mean"]["ndcg@3"].as_f64().unwrap(),
        again.mean["ndcg@3"]
    );
}

#[test]
fn the_corpus_cache_is_reused_and_invalidated() {
    let data = tiny_data();
    let cache = tempfile::tempdir().unwrap();
    let model = copy_model(&fixture("bert"));
    let (hit, first) = eval_cached(model.path(), data.path(), cache.path(), &[]);
    assert!(!hit, "first run encodes");
    let (hit, second) = eval_cached(model.path(), data.path(), cache.path(), &[]);
    assert!(hit, "second run reads the cache");
    let metrics = |s: &str| {
        s.lines()
            .filter(|l| l.contains('@'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        metrics(&first),
        metrics(&second),
        "same metrics from the cache"
    );

    // Other encoding settings: a new entry.
    let (hit, _) = eval_cached(
        model.path(),
        data.path(),
        cache.path(),
        &["--max-length", "8"],
    );
    assert!(!hit, "max length changed");
    // Other corpus content.
    let corpus = data.path().join("corpus.jsonl");
    let text = std::fs::read_to_string(&corpus)
        .unwrap()
        .replace("lazy dog", "sleepy cat");
    std::fs::write(&corpus, text).unwrap();
    let (hit, _) = eval_cached(model.path(), data.path(), cache.path(), &[]);
    assert!(!hit, "corpus changed");
    // Other weights.
    edit_weights(model.path(), |w| {
        let key = "encoder.layer.0.output.dense.bias";
        let bumped = (&w[key] + 0.01).unwrap();
        w.insert(key.into(), bumped);
    });
    let (hit, _) = eval_cached(model.path(), data.path(), cache.path(), &[]);
    assert!(!hit, "model changed");
    let (hit, _) = eval_cached(model.path(), data.path(), cache.path(), &[]);
    assert!(hit, "and cached again");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_datasets_fail_cleanly() {
    let out_dir = tempfile::tempdir().unwrap();
    let out_arg = ["--out", out_dir.path().to_str().unwrap(), "--no-cache"];
    let model = fixture("bert");

    let data = tiny_data();
    let mut corpus = std::fs::read_to_string(data.path().join("corpus.jsonl")).unwrap();
    corpus.push_str("{\"_id\": \"d9\", \"text\": \n");
    write(data.path(), "corpus.jsonl", &corpus);
    assert_fails(
        &effir_eval(&model, data.path(), &out_arg),
        &["corpus.jsonl:7", "malformed JSON"],
        out_dir.path(),
    );

    let data = tiny_data();
    let mut corpus = std::fs::read_to_string(data.path().join("corpus.jsonl")).unwrap();
    corpus.push_str("{\"_id\": \"d2\", \"text\": \"again\"}\n");
    write(data.path(), "corpus.jsonl", &corpus);
    assert_fails(
        &effir_eval(&model, data.path(), &out_arg),
        &["corpus.jsonl:7", "duplicate document id `d2`"],
        out_dir.path(),
    );

    let data = tiny_data();
    write(data.path(), "corpus.jsonl", "\n");
    assert_fails(
        &effir_eval(&model, data.path(), &out_arg),
        &["corpus.jsonl", "no documents"],
        out_dir.path(),
    );

    let data = tiny_data();
    assert_fails(
        &effir_eval(&model, data.path(), &["--split", "train", "--no-cache"]),
        &["split `train`", "available splits: dev, test"],
        out_dir.path(),
    );

    let data = tiny_data();
    assert_fails(
        &effir_eval(&model, data.path(), &["--k", "0,10"]),
        &["--k"],
        out_dir.path(),
    );

    assert_fails(
        &effir_eval(&model, &data.path().join("nope"), &out_arg),
        &["nope", "not found"],
        out_dir.path(),
    );
}

#[test]
fn qrels_naming_unknown_documents_warn_or_fail_with_strict() {
    let out_dir = tempfile::tempdir().unwrap();
    let data = tiny_data();
    let mut qrels = std::fs::read_to_string(data.path().join("qrels/test.tsv")).unwrap();
    qrels.push_str("q2\tghost\t1\nq9\td1\t1\n");
    write(data.path(), "qrels/test.tsv", &qrels);

    let out = effir_eval(&fixture("bert"), data.path(), &["--no-cache"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 judgement(s) of unknown documents and 1 of unknown queries"),
        "{}",
        stderr(&out)
    );

    let strict = [
        "--strict",
        "--no-cache",
        "--out",
        out_dir.path().to_str().unwrap(),
    ];
    assert_fails(
        &effir_eval(&fixture("bert"), data.path(), &strict),
        &["unknown documents", "`ghost`", "`q9`"],
        out_dir.path(),
    );
}

#[test]
fn the_shipped_config_is_valid() {
    let data = tiny_data();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/eval.yaml");
    let out = effir_eval(
        &fixture("bert"),
        data.path(),
        &["--config", config.to_str().unwrap(), "--no-cache"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ndcg@10"));
}

#[test]
fn an_unknown_config_key_is_rejected() {
    let data = tiny_data();
    let config = write(data.path(), "eval.yaml", "split: test\nndcg_k: 10\n");
    let out = effir_eval(
        &fixture("bert"),
        data.path(),
        &["--config", config.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("eval.yaml") && stderr(&out).contains("ndcg_k"),
        "{}",
        stderr(&out)
    );
}
