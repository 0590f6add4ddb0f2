//! `effir validate` and `effir export` as a CI job runs them: a faithful
//! export passes, a broken one fails naming the gate, a pruned MiniLM scores
//! the same through ONNX Runtime as in candle, and bad input (corrupt
//! graphs, unknown gate keys, a missing runtime library, a graph that does
//! not fit the tokenizer) fails clearly with nothing half-written.

mod common;

use std::path::{Path, PathBuf};

use common::{effir, effir_env, export, stderr};

use common::{fixture, minilm_dir};
use effir_onnx::graph_file::GraphFile;

fn tiny_data() -> PathBuf {
    fixture("eval/tiny")
}

fn write_gates(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gates.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

const ALL_GATES: &str = "parity:\n  min_cosine: 0.99999\n  max_abs_diff: 1.0e-4\nquality:\n  min_ndcg_retention: 0.98\n  min_recall_retention: 0.98\n";

#[test]
fn a_faithful_export_passes_and_a_perturbed_weight_fails_the_parity_gate() {
    let work = tempfile::tempdir().unwrap();
    let gates = write_gates(work.path(), ALL_GATES);
    let good = work.path().join("good");
    export(
        &fixture("bert"),
        &good,
        &["--profile", "sentence-transformers"],
    );
    let report = work.path().join("report-good");
    let out = common::validate_on_tiny(&fixture("bert"), &good, &gates, Some(&report));
    assert!(out.status.success(), "{}", stderr(&out));
    let json = common::read_json(&report.join("validation.json"));
    assert_eq!(json["passed"], true);
    assert!(json["parity"]["min_cosine"].as_f64().unwrap() >= 0.99999);
    assert_eq!(json["quality"][0]["ndcg_retention"].as_f64().unwrap(), 1.0);
    assert!(report.join("validation.md").is_file());

    // One weight perturbed: the graph still runs, but is not the model.
    let broken = work.path().join("broken");
    export(
        &fixture("bert"),
        &broken,
        &["--profile", "sentence-transformers"],
    );
    let path = broken.join("model.onnx");
    let mut file = GraphFile::read(&path).unwrap();
    let g = file.model.graph.as_mut().unwrap();
    let w = g
        .initializer
        .iter_mut()
        .find(|t| t.name == "encoder.layer.0.attention.output.dense.weight_t")
        .expect("attention output weight");
    // (Not a constant shift: the LayerNorm after it would remove that.)
    for (i, chunk) in w.raw_data.chunks_mut(4).enumerate() {
        let v = f32::from_le_bytes(chunk.try_into().unwrap()) + if i % 3 == 0 { 0.5 } else { -0.2 };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&path, prost::Message::encode_to_vec(&file.model)).unwrap();
    let report = work.path().join("report-broken");
    let out = common::validate_on_tiny(&fixture("bert"), &broken, &gates, Some(&report));
    assert!(!out.status.success(), "a broken candidate passed");
    let err = stderr(&out);
    assert!(
        err.contains("gate(s) failed") && err.contains("parity.min_cosine"),
        "{err}"
    );
    let json = common::read_json(&report.join("validation.json"));
    assert_eq!(json["passed"], false);
}

/// `--data` repeats: one quality report per dataset, each gated, parity
/// texts from the first.
#[test]
fn validate_gates_every_dataset_it_is_given() {
    let work = tempfile::tempdir().unwrap();
    let gates = write_gates(work.path(), ALL_GATES);
    let graph = work.path().join("graph");
    export(
        &fixture("bert"),
        &graph,
        &["--profile", "sentence-transformers"],
    );
    // A second dataset: the tiny one with only some of its judgements.
    let second = work.path().join("tiny-b");
    std::fs::create_dir_all(second.join("qrels")).unwrap();
    for f in ["corpus.jsonl", "queries.jsonl"] {
        std::fs::copy(tiny_data().join(f), second.join(f)).unwrap();
    }
    std::fs::write(
        second.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq2\td2\t1\nq3\td3\t1\n",
    )
    .unwrap();
    let report = work.path().join("report");
    let out = effir(&[
        "validate",
        "--quiet",
        "--no-cache",
        "--reference",
        fixture("bert").to_str().unwrap(),
        "--candidate",
        graph.to_str().unwrap(),
        "--data",
        tiny_data().to_str().unwrap(),
        "--data",
        second.to_str().unwrap(),
        "--gates",
        gates.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = common::read_json(&report.join("validation.json"));
    let quality = json["quality"].as_array().unwrap();
    assert_eq!(quality.len(), 2);
    assert_eq!(quality[1]["queries"], 2);
    let gate_names: Vec<&str> = json["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gate"].as_str().unwrap())
        .collect();
    assert!(gate_names.contains(&"quality.min_ndcg_retention on tiny"));
    assert!(gate_names.contains(&"quality.min_ndcg_retention on tiny-b"));
    let md = std::fs::read_to_string(report.join("validation.md")).unwrap();
    assert!(md.contains("Worst nDCG@10 retention"), "{md}");
}

#[test]
fn a_pruned_minilm_scores_the_same_through_onnx_runtime_as_in_candle() {
    let work = tempfile::tempdir().unwrap();
    let pruned = work.path().join("minilm-pruned");
    let data = common::dataset("cranfield");
    let out = effir(&[
        "prune",
        "--model",
        minilm_dir().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--calib-tokens",
        "4096",
        "--drop-mlp",
        "2",
        "--mlp-keep",
        "0.5",
        "--out",
        pruned.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "prune: {}", stderr(&out));
    let onnx = work.path().join("minilm-pruned-onnx");
    export(&pruned, &onnx, &[]);
    // Reference = the pruned model in candle; candidate = its graph in ORT.
    let gates = write_gates(
        work.path(),
        "parity:\n  min_cosine: 0.99999\nquality:\n  min_ndcg_retention: 0.9999\n",
    );
    let report = work.path().join("report");
    let out = effir(&[
        "validate",
        "--quiet",
        "--no-cache",
        "--reference",
        pruned.to_str().unwrap(),
        "--candidate",
        onnx.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--gates",
        gates.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = common::read_json(&report.join("validation.json"));
    let q = &json["quality"][0];
    let (candle, ort) = (
        q["reference_ndcg_at_10"].as_f64().unwrap(),
        q["candidate_ndcg_at_10"].as_f64().unwrap(),
    );
    assert!(
        (candle - ort).abs() <= 1e-4,
        "nDCG@10 candle {candle} vs ONNX Runtime {ort}"
    );
    let (candle_r, ort_r) = (
        q["reference_recall_at_100"].as_f64().unwrap(),
        q["candidate_recall_at_100"].as_f64().unwrap(),
    );
    assert!(
        (candle_r - ort_r).abs() <= 1e-4,
        "Recall@100 {candle_r} vs {ort_r}"
    );
}

#[test]
fn corrupt_graphs_and_bad_gates_fail_clearly_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let gates = write_gates(work.path(), ALL_GATES);
    let good = work.path().join("good");
    export(&fixture("bert"), &good, &[]);
    let bytes = std::fs::read(good.join("model.onnx")).unwrap();

    // Truncated and empty graphs.
    for (name, content) in [
        ("truncated", &bytes[..bytes.len() / 2]),
        ("empty", &bytes[..0]),
    ] {
        let dir = work.path().join(name);
        export(&fixture("bert"), &dir, &[]);
        std::fs::write(dir.join("model.onnx"), content).unwrap();
        let report = work.path().join(format!("report-{name}"));
        let out = common::validate_on_tiny(&fixture("bert"), &dir, &gates, Some(&report));
        assert!(!out.status.success(), "{name}");
        let err = stderr(&out);
        assert!(
            err.contains("model.onnx") && err.contains("not"),
            "{name}: {err}"
        );
        assert!(!report.exists(), "{name}: a report was written");
    }

    // A gates file with an unknown key, and one with a threshold out of range.
    for (text, expect) in [
        ("parity:\n  min_cosin: 0.9\n", "min_cosin"),
        ("quality:\n  min_ndcg: 1.5\n", "quality.min_ndcg"),
    ] {
        let bad = write_gates(work.path(), text);
        let out = common::validate_on_tiny(&fixture("bert"), &good, &bad, None);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("gates.yaml") && err.contains(expect), "{err}");
    }
}

#[test]
fn a_missing_runtime_library_says_how_to_install_it() {
    let work = tempfile::tempdir().unwrap();
    let gates = write_gates(work.path(), ALL_GATES);
    let good = work.path().join("good");
    export(&fixture("bert"), &good, &[]);
    let out = effir_env(
        &[
            "validate",
            "--quiet",
            "--reference",
            fixture("bert").to_str().unwrap(),
            "--candidate",
            good.to_str().unwrap(),
            "--data",
            tiny_data().to_str().unwrap(),
            "--gates",
            gates.to_str().unwrap(),
        ],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("install-onnxruntime.sh"),
        "{err}"
    );
}

#[test]
fn a_graph_that_does_not_fit_the_tokenizer_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let gates = write_gates(work.path(), "parity:\n  min_cosine: 0.99999\n");
    // A Llama graph served with BERT's tokenizer and config.
    let swapped = work.path().join("swapped");
    let llama = work.path().join("llama");
    export(&fixture("bert"), &swapped, &[]);
    export(&fixture("llama"), &llama, &[]);
    std::fs::copy(llama.join("model.onnx"), swapped.join("model.onnx")).unwrap();
    let out = common::validate_on_tiny(&fixture("bert"), &swapped, &gates, None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("interface mismatch") && err.contains("llama"),
        "{err}"
    );

    // Without effir's metadata, the embedding table still gives it away.
    let path = swapped.join("model.onnx");
    let mut file = GraphFile::read(&path).unwrap();
    file.model.metadata_props.clear();
    std::fs::write(&path, prost::Message::encode_to_vec(&file.model)).unwrap();
    let out = common::validate_on_tiny(&fixture("bert"), &swapped, &gates, None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("interface mismatch") && err.contains("token embedding table has 400 rows"),
        "{err}"
    );
}

#[test]
fn export_refuses_bad_requests_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    // Unsupported opset.
    let o = effir(&[
        "export",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--opset",
        "13",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("opset 13"), "{}", stderr(&o));
    assert!(!out_dir.exists());
    // A model directory that does not exist.
    let o = effir(&[
        "export",
        "--model",
        work.path().join("nope").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    assert!(!out_dir.exists());
    // An existing directory is not overwritten unless it is an earlier export.
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("keep.txt"), "mine").unwrap();
    let o = effir(&[
        "export",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!o.status.success());
    assert!(out_dir.join("keep.txt").exists());
    // No staging directories left behind.
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".effir"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_committed_configs_parse_and_drive_the_stages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gates = effir_onnx::validate::Gates::load(&root.join("configs/gates.yaml")).unwrap();
    assert_eq!(gates.parity.min_cosine, Some(0.99999));
    assert!(gates.wants_quality());

    let text = std::fs::read_to_string(root.join("configs/providers-gpu.yaml")).unwrap();
    let providers: effir_onnx::providers::ProviderSettings = serde_yaml::from_str(&text).unwrap();
    use effir_onnx::providers::Provider;
    assert_eq!(
        providers.order,
        [Provider::TensorRt, Provider::Cuda, Provider::Cpu]
    );
    assert!(providers.tensorrt.fp16);
    // On this CPU-only machine the GPU config falls back to the CPU.
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("export");
    let o = effir(&[
        "export",
        "--config",
        root.join("configs/export.yaml").to_str().unwrap(),
        "--model",
        fixture("bert").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = common::read_json(&out_dir.join("effir_export.json"));
    assert_eq!(summary["profile"], "sentence-transformers");
    assert_eq!(summary["target"], "tensorrt");
    let o = effir(&[
        "bench",
        "--graph",
        out_dir.to_str().unwrap(),
        "--batch",
        "2",
        "--length",
        "8",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--provider-config",
        root.join("configs/providers-gpu.yaml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| 2 | 8 |"));
}

/// `effir export ... | head -1`: when the reader closes the pipe, effir ends
/// as `cat` would (SIGPIPE), with no panic, and the export it finished
/// before printing is whole.
#[test]
fn a_closed_output_pipe_ends_effir_quietly() {
    use std::process::{Command, Stdio};
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_effir"))
        .args(["export", "--model", fixture("bert").to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run effir");
    drop(child.stdout.take());
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.join("model.onnx").is_file() && out.join("effir_export.json").is_file());
}
