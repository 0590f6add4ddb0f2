//! `effir export --layout triton --name NAME` writes a Triton Inference
//! Server model repository: `NAME/1/model.onnx`, `NAME/config.pbtxt` for the
//! ONNX Runtime backend, the tokenizer and model files in `NAME/`. The
//! configuration is checked by Triton's own schema (tritonclient's compiled
//! `model_config.proto`, protobuf text format) against the graph's
//! interface, by `tests/triton_config_check.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_refused, export_output, fixture, read_json, stderr};

fn export(out: &Path, extra: &[&str]) -> std::process::Output {
    export_output(
        &fixture("bert"),
        out,
        &[&["--layout", "triton"], extra].concat(),
    )
}

/// Runs the schema check on a model directory; returns whether it passed
/// and what it printed.
fn triton_check(model_dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/triton_config_check.py"))
        .arg(model_dir)
        .args(extra)
        .output()
        .expect("python3 tests/triton_config_check.py");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_triton_repository_passes_tritons_schema_and_matches_the_graph() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repository");
    let run = export(
        &repo,
        &[
            "--name",
            "bert-st",
            "--profile",
            "sentence-transformers",
            "--max-batch-size",
            "16",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let model_dir = repo.join("bert-st");
    for file in [
        "config.pbtxt",
        "1/model.onnx",
        "tokenizer.json",
        "config.json",
        "effir_export.json",
    ] {
        assert!(model_dir.join(file).is_file(), "{file} missing");
    }
    let (passed, output) = triton_check(&model_dir, &[]);
    assert!(passed, "{output}");
    let config = std::fs::read_to_string(model_dir.join("config.pbtxt")).unwrap();
    assert!(config.contains("max_batch_size: 16"), "{config}");
    assert!(config.contains("kind: KIND_CPU"), "{config}");
    let summary = read_json(&model_dir.join("effir_export.json"));
    assert_eq!(summary["graph"], "1/model.onnx");
    assert_eq!(summary["layout"], "triton");

    // The graph in the repository is what validate measures, found from
    // the model directory.
    let gates = work.path().join("gates.yaml");
    std::fs::write(&gates, "parity:\n  min_cosine: 0.99999\n").unwrap();
    let run = common::validate_on_tiny(&fixture("bert"), &model_dir, &gates, None);
    assert!(run.status.success(), "{}", stderr(&run));

    // The check can fail: a configuration the schema rejects, and one whose
    // outputs do not match the graph.
    let broken: PathBuf = work.path().join("broken/bert-st");
    std::fs::create_dir_all(broken.join("1")).unwrap();
    std::fs::copy(model_dir.join("1/model.onnx"), broken.join("1/model.onnx")).unwrap();
    std::fs::write(
        broken.join("config.pbtxt"),
        config.replace("max_batch_size: 16", "max_batch: 16"),
    )
    .unwrap();
    assert!(!triton_check(&broken, &[]).0, "an unknown field passed");
    std::fs::write(
        broken.join("config.pbtxt"),
        config.replace("sentence_embedding", "embedding"),
    )
    .unwrap();
    assert!(!triton_check(&broken, &[]).0, "a wrong output name passed");
}

#[test]
fn a_tensorrt_repository_asks_for_the_tensorrt_accelerator_at_its_precision() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calibration.txt");
    std::fs::write(&calib, "some calibration text\nand a little more of it\n").unwrap();
    for (precision, mode) in [("fp32", "FP32"), ("fp16", "FP16"), ("int8", "INT8")] {
        let repo = work.path().join(format!("repository-{precision}"));
        let mut extra = vec![
            "--name",
            "bert",
            "--target",
            "tensorrt",
            "--precision",
            precision,
        ];
        if precision != "fp32" {
            extra.extend(["--calib", calib.to_str().unwrap()]);
        }
        let run = export(&repo, &extra);
        assert!(run.status.success(), "{precision}: {}", stderr(&run));
        let (passed, output) = triton_check(
            &repo.join("bert"),
            &["--accelerator", "tensorrt", "--precision", mode],
        );
        assert!(passed, "{precision}: {output}");
    }
}

#[test]
fn triton_requests_that_cannot_be_met_fail_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for (extra, needle) in [
        (&[][..], "--name"),
        (&["--name", "a/b"][..], "Triton model name `a/b`"),
        (&["--name", ".."][..], "Triton model name `..`"),
        (
            &["--name", "bert", "--max-batch-size", "0"][..],
            "at least 1",
        ),
    ] {
        let run = export(&out, extra);
        assert_refused(&run, &extra, needle, &out);
    }
    let model = fixture("bert");
    for (extra, needle) in [
        (&["--name", "bert"][..], "--name applies to --layout triton"),
        (&["--max-batch-size", "8"][..], "--max-batch-size applies"),
    ] {
        let run = export_output(&model, &out, extra);
        assert_refused(&run, &extra, needle, &out);
    }
}

#[test]
fn models_share_a_repository_and_overwriting_one_keeps_the_others() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repository");
    for name in ["first", "second"] {
        let run = export(&repo, &["--name", name]);
        assert!(run.status.success(), "{name}: {}", stderr(&run));
    }
    let second_graph = std::fs::read(repo.join("second/1/model.onnx")).unwrap();
    // Without --overwrite an existing model is refused; with it, only that
    // model is replaced.
    let run = export(&repo, &["--name", "first"]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--overwrite"), "{}", stderr(&run));
    let run = export(
        &repo,
        &["--name", "first", "--overwrite", "--precision", "int8"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        std::fs::read(repo.join("second/1/model.onnx")).unwrap(),
        second_graph
    );
    assert!(repo.join("first/config.pbtxt").is_file());
    for name in ["first", "second"] {
        assert!(triton_check(&repo.join(name), &[]).0, "{name}");
    }
}
