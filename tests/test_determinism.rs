//! The same inputs and seed give the same bytes: `prune` (with
//! reconstruction), `export` (fp32 and int8), `finetune` weights and
//! `eval`'s run file and metrics, each run twice into sibling directories
//! and compared file by file. What varies by nature is kept out of those
//! files: elapsed times go to stderr (`prune`), `timings.json` (`eval`) and
//! the fine-tune record's outcome.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{effir, files_under, fixture, stderr};

/// Runs `args(out)` for `out` in `work/a/NAME` and `work/b/NAME` and returns
/// both directories.
fn twice(work: &Path, name: &str, args: &dyn Fn(&Path) -> Vec<String>) -> (PathBuf, PathBuf) {
    let dirs = ["a", "b"].map(|side| work.join(side).join(name));
    for out in &dirs {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let args = args(out);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = effir(&refs);
        assert!(run.status.success(), "{refs:?}: {}", stderr(&run));
    }
    let [a, b] = dirs;
    (a, b)
}

/// `relative path -> bytes` of the files under `dir` (those `keep` accepts).
fn contents(dir: &Path, keep: &dyn Fn(&str) -> bool) -> BTreeMap<String, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .map(|p| (p.strip_prefix(dir).unwrap().display().to_string(), p))
        .filter(|(rel, _)| keep(rel))
        .map(|(rel, p)| (rel, std::fs::read(p).unwrap()))
        .collect()
}

fn assert_same_bytes(what: &str, a: &Path, b: &Path, keep: &dyn Fn(&str) -> bool) {
    let (ca, cb) = (contents(a, keep), contents(b, keep));
    assert!(!ca.is_empty(), "{what}: nothing compared");
    assert_eq!(
        ca.keys().collect::<Vec<_>>(),
        cb.keys().collect::<Vec<_>>(),
        "{what}: files"
    );
    for (file, bytes) in &ca {
        assert!(
            bytes == &cb[file],
            "{what}: {file} differs between two runs"
        );
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn prune_export_finetune_and_eval_rerun_to_the_same_bytes() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let calib = work.join("calib.txt");
    std::fs::write(
        &calib,
        "Dense retrieval with pruned MLPs.\nThe quick brown fox jumps over the lazy dog.\nNumbers 1 2 3.\n",
    )
    .unwrap();
    let model = fixture("llama");
    let (pruned, _) = twice(work, "pruned", &|out| {
        ["prune", "--model", &s(&model), "--calib", &s(&calib)]
            .into_iter()
            .map(String::from)
            .chain(
                [
                    "--drop-mlp",
                    "1",
                    "--mlp-keep",
                    "0.5",
                    "--reconstruct-ridge",
                    "1e-4",
                ]
                .map(String::from),
            )
            .chain(["--out".into(), s(out)])
            .collect()
    });
    assert_same_bytes("prune", &pruned, &work.join("b/pruned"), &|_| true);

    for precision in ["fp32", "int8"] {
        let (a, b) = twice(work, &format!("export-{precision}"), &|out| {
            let source = out.parent().unwrap().join("pruned");
            [
                "export",
                "--model",
                &s(&source),
                "--out",
                &s(out),
                "--precision",
                precision,
            ]
            .map(String::from)
            .to_vec()
        });
        assert_same_bytes(&format!("export {precision}"), &a, &b, &|_| true);
    }

    let train = work.join("train.jsonl");
    std::fs::write(
        &train,
        (0..8)
            .map(|i| {
                serde_json::json!({
                    "query": format!("what is dense retrieval {i}"),
                    "pos": [format!("dense retrieval encodes texts into vectors {i}")],
                    "neg": [format!("the fox jumps over the dog {i}")],
                })
                .to_string()
                    + "\n"
            })
            .collect::<String>(),
    )
    .unwrap();
    let config = work.join("ft.yaml");
    std::fs::write(
        &config,
        "max_steps: 3\nbatch_size: 4\nlearning_rate: 1.0e-3\ncheckpoint_every: 0\nseed: 3\n",
    )
    .unwrap();
    let bert = fixture("bert");
    let (a, b) = twice(work, "finetuned", &|out| {
        [
            "finetune",
            "--quiet",
            "--model",
            &s(&bert),
            "--train",
            &s(&train),
            "--config",
            &s(&config),
            "--out",
            &s(out),
        ]
        .map(String::from)
        .to_vec()
    });
    // The record's outcome holds the run's seconds; the weights must match.
    assert_same_bytes("finetune", &a, &b, &|f| f == "model.safetensors");

    let data = fixture("eval/tiny");
    let (a, b) = twice(work, "eval", &|out| {
        [
            "eval",
            "--quiet",
            "--no-cache",
            "--model",
            &s(&bert),
            "--data",
            &s(&data),
            "--out",
            &s(out),
        ]
        .map(String::from)
        .to_vec()
    });
    assert_same_bytes("eval", &a, &b, &|f| f != "timings.json");
    assert!(a.join("timings.json").is_file());
}
