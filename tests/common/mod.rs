//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Minimum cosine similarity between an effir embedding and its reference.
pub const MIN_COSINE: f64 = 0.99999;
/// Maximum absolute difference of any embedding or hidden-state component.
pub const MAX_ABS_DIFF: f32 = 1e-4;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Tensors of a safetensors file, by name.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts every row of `got` matches the same row of `want` within the
/// parity tolerances; `what` names the comparison in failures.
pub fn assert_rows_match(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let cos = cosine(g, w);
        let diff = max_abs_diff(g, w);
        assert!(
            cos >= MIN_COSINE && diff <= MAX_ABS_DIFF,
            "{what}: row {i}: cosine {cos:.7} (min {MIN_COSINE}), max |diff| {diff:.2e} (max {MAX_ABS_DIFF:.0e})"
        );
    }
}

/// Every file under `dir` (recursively), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Copies a model directory (recursively) into a fresh temporary directory.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    copy_dir(src, dst.path());
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Rewrites `dir/model.safetensors` through `edit`.
pub fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = load_tensors(&path);
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// The real all-MiniLM-L6-v2 directory: `$EFFIR_MINILM_DIR`, else
/// `models/all-MiniLM-L6-v2` (fetched by `make models`).
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("EFFIR_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run `make models` (or set EFFIR_MINILM_DIR)",
        dir.display()
    );
    dir
}

/// A vendored BEIR dataset under `data/`.
pub fn dataset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// Runs the `effir` binary with `args`.
pub fn effir(args: &[&str]) -> std::process::Output {
    effir_env(args, &[])
}

/// Runs the `effir` binary with `args` and extra environment variables.
pub fn effir_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_effir"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run effir")
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Prunes the fixture `arch` with `effir prune`, calibrated on `calibration`
/// texts, with the plan flags `plan` (e.g. `--drop-layers 1 --mlp-keep 0.5`)
/// into `work/<arch>-pruned`.
pub fn prune_fixture(arch: &str, work: &Path, calibration: &[&str], plan: &[&str]) -> PathBuf {
    let calib = work.join(format!("{arch}-calib.txt"));
    std::fs::write(&calib, calibration.join("\n")).unwrap();
    let out = work.join(format!("{arch}-pruned"));
    let source = fixture(arch);
    let mut args = vec![
        "prune",
        "--model",
        source.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(plan);
    let o = effir(&args);
    assert!(o.status.success(), "prune {arch}: {}", stderr(&o));
    out
}

/// The independent Python client (`tests/onnx_client.py`): ONNX checker,
/// strict shape inference, onnxruntime, and the embeddings of
/// `reference_dir`'s transformers reference, to a lowest cosine of
/// `min_cosine`.
pub fn python_client(export_dir: &Path, reference_dir: &Path, min_cosine: f64) {
    let out = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_client.py"))
        .args(["--export", export_dir.to_str().unwrap()])
        .args([
            "--reference",
            reference_dir
                .join("reference.safetensors")
                .to_str()
                .unwrap(),
        ])
        .args([
            "--texts",
            reference_dir.join("reference.json").to_str().unwrap(),
        ])
        .args(["--min-cosine", &min_cosine.to_string()])
        .output()
        .expect("python3 tests/onnx_client.py");
    assert!(
        out.status.success(),
        "python client on {}:\n{}\n{}",
        export_dir.display(),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// `effir export --model MODEL --out OUT EXTRA...`, which must succeed.
pub fn export(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = effir(&args);
    assert!(run.status.success(), "export {args:?}: {}", stderr(&run));
}

/// `effir validate --quiet --no-cache` of the graph `candidate` against
/// `reference` in candle on the tiny fixture dataset (every text of it for
/// parity), with the gates file `gates`, writing its report into `report`
/// when given.
pub fn validate_on_tiny(
    reference: &Path,
    candidate: &Path,
    gates: &Path,
    report: Option<&Path>,
) -> std::process::Output {
    let data = fixture("eval/tiny");
    let mut args = vec![
        "validate",
        "--quiet",
        "--no-cache",
        "--reference",
        reference.to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--gates",
        gates.to_str().unwrap(),
    ];
    if let Some(report) = report {
        args.extend(["--out", report.to_str().unwrap()]);
    }
    effir(&args)
}
