//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Minimum cosine similarity between an effir embedding and its reference.
/// Varied short texts (sentences, numbers and symbols, a run of letters)
/// that tests calibrate and embed with.
pub const SAMPLE_TEXTS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello world",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "Numbers 12 345 and symbols % & $ appear here.",
    "abcdefghijklmnopqrstuvwxyz",
    "pruning mlp sub layers keeps attention layers intact",
];

pub const MIN_COSINE: f64 = 0.99999;
/// Maximum absolute difference of any embedding or hidden-state component.
pub const MAX_ABS_DIFF: f32 = 1e-4;

/// Calibration text for the fixtures (their tokenizers split anything),
/// written to `dir/calibration.txt`.
pub fn calibration_file(dir: &Path) -> PathBuf {
    let path = dir.join("calibration.txt");
    let texts = [
        "Dense retrievers encode queries and documents into one vector space.",
        "MLP sub-layers of LLM retrievers are far more prunable than attention.",
        "what is the boiling point of water at high altitude",
        "Numbers 12 345 and symbols % & $ appear here too.",
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "hello world",
    ];
    std::fs::write(&path, texts.join("\n")).unwrap();
    path
}

/// `effir export` of `model` into `out` with the sentence-transformers
/// profile and `extra` flags.
pub fn export_st(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    export_output(
        model,
        out,
        &[&["--profile", "sentence-transformers"], extra].concat(),
    )
}

/// [`export_st`], which must succeed; the graph it wrote.
pub fn exported_st(model: &Path, out: &Path, extra: &[&str]) -> effir_onnx::graph_file::GraphFile {
    let run = export_st(model, out, extra);
    assert!(run.status.success(), "export {extra:?}: {}", stderr(&run));
    effir_onnx::graph_file::GraphFile::read(&out.join("model.onnx")).unwrap()
}

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
/// A model directory a command writes (`prune`, `finetune`, `export`,
/// `rewrite`, `import-gguf` with `--out`) is checked on success, in every test: ordinary
/// file modes and no absolute path of this machine in any file.
pub fn effir_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_effir"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("run effir");
    let writes_model = ["prune", "finetune", "export", "rewrite", "import-gguf"].contains(&args[0]);
    let out = args
        .iter()
        .position(|a| *a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    if let (true, true, Some(out)) = (output.status.success(), writes_model, out) {
        if out.is_dir() {
            assert_ordinary_modes(&out);
            assert_no_machine_paths(&out);
        }
    }
    output
}

/// The mode bits (`rwxrwxrwx`) of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file and directory under `dir` has the mode an ordinary file or
/// directory created here gets, with this process's umask (read, and for
/// directories enter, bits).
pub fn assert_ordinary_modes(dir: &Path) {
    let probe = tempfile::tempdir().unwrap();
    let probe_file = probe.path().join("file");
    std::fs::write(&probe_file, b"x").unwrap();
    let probe_dir = probe.path().join("dir");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let (file_mode, dir_mode) = (mode(&probe_file), mode(&probe_dir));
    let files = files_under(dir);
    let dirs: std::collections::BTreeSet<&Path> = files
        .iter()
        .flat_map(|f| f.ancestors().skip(1).take_while(|d| d.starts_with(dir)))
        .collect();
    for path in files.iter().map(|f| f.as_path()).chain(dirs) {
        // Who may read (and enter) it, as for an ordinary file or
        // directory; copied files may differ in write bits.
        let (want, bits) = if path.is_dir() {
            (dir_mode, 0o555)
        } else {
            (file_mode, 0o444)
        };
        assert_eq!(
            mode(path) & bits,
            want & bits,
            "{}: mode {:o}, ordinary ones get {:o}",
            path.display(),
            mode(path),
            want
        );
    }
}

/// No file under the model directory `out` names the repository or the
/// directory `out` was written in by an absolute path.
pub fn assert_no_machine_paths(out: &Path) {
    let mut needles = vec![std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap()];
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        needles.push(parent.to_path_buf());
        needles.extend(std::fs::canonicalize(parent));
    }
    let needles: Vec<String> = needles
        .iter()
        .filter(|p| p.is_absolute() && p.components().count() > 2)
        .map(|p| p.display().to_string())
        .collect();
    let found = files_containing(out, &needles);
    assert!(found.is_empty(), "absolute paths:\n{}", found.join("\n"));
}

/// Where any of `needles`, absolute paths, occurs as an absolute path in
/// the files under `dir` (not as the tail of a relative path climbing to
/// it, `../../work/...`).
pub fn files_containing(dir: &Path, needles: &[String]) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter_map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            needles
                .iter()
                .find(|n| {
                    bytes
                        .windows(n.len())
                        .enumerate()
                        .any(|(i, w)| w == n.as_bytes() && (i == 0 || bytes[i - 1] != b'.'))
                })
                .map(|n| format!("{} holds {n}", path.display()))
        })
        .collect()
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

/// A small fine-tuning run's inputs in `dir`: `train.jsonl`, 8 queries
/// built from `texts` (at least 3), each with a positive and a negative
/// from them, and `ft.yaml` holding `config`. Returns their paths.
pub fn tiny_finetune_inputs(dir: &Path, texts: &[&str], config: &str) -> (PathBuf, PathBuf) {
    let n = texts.len();
    let train = dir.join("train.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({
                "query": format!("{} {i}", texts[i % n]),
                "pos": [texts[(i + 1) % n]],
                "neg": [texts[(i + 2) % n]],
            })
            .to_string()
        })
        .collect();
    std::fs::write(&train, lines.join("\n")).unwrap();
    let yaml = dir.join("ft.yaml");
    std::fs::write(&yaml, config).unwrap();
    (train, yaml)
}

/// `effir finetune --quiet --model MODEL --train TRAIN --out OUT --config CONFIG EXTRA...`.
pub fn finetune(
    model: &Path,
    train: &Path,
    out: &Path,
    config: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "finetune",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    effir(&args)
}

/// `effir export --model MODEL --out OUT EXTRA...`.
pub fn export_output(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    effir(&args)
}

/// [`export_output`], which must succeed.
pub fn export(model: &Path, out: &Path, extra: &[&str]) {
    let run = export_output(model, out, extra);
    assert!(
        run.status.success(),
        "export {} {extra:?}: {}",
        model.display(),
        stderr(&run)
    );
}

/// A request that must be refused before writing anything: a failed run
/// (`what` names the request), `needle` in its stderr, nothing at `out`.
pub fn assert_refused(
    run: &std::process::Output,
    what: &dyn std::fmt::Debug,
    needle: &str,
    out: &Path,
) {
    assert!(!run.status.success(), "{what:?} succeeded");
    assert!(
        stderr(run).contains(needle),
        "{what:?}: `{needle}` not in {}",
        stderr(run)
    );
    assert!(!out.exists(), "{what:?} wrote output");
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

/// The gradient of `loss` with respect to `var`, flattened.
pub fn gradient(loss: &Tensor, var: &candle_core::Var) -> Vec<f32> {
    loss.backward()
        .unwrap()
        .get(var.as_tensor())
        .expect("the loss depends on the variable")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The Euclidean norm of `v`, in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// `start` moved by `step` along `direction` (one entry per element), for
/// finite differences.
pub fn moved_along(start: &Tensor, direction: &[f64], step: f64) -> Tensor {
    let values: Vec<f32> = start.flatten_all().unwrap().to_vec1().unwrap();
    let moved: Vec<f32> = values
        .iter()
        .zip(direction)
        .map(|(w, u)| (*w as f64 + step * u) as f32)
        .collect();
    Tensor::from_vec(moved, start.shape().clone(), &Device::Cpu).unwrap()
}

/// Whether ONNX Runtime's u8×s8 products can saturate on this CPU: x86
/// without VNNI sums pairs of 8-bit products in 16 bits (`VPMADDUBSW`). There
/// a u8s8 graph can leave the int8 gate (measured: RESULTS.md, the AVX2
/// frontier), so the kernels that cannot saturate carry the gate's checks.
pub fn u8s8_can_saturate() -> bool {
    effir_onnx::cpu_features::CpuFeatures::detect().u8s8_may_saturate()
}

/// The int8 kernel the gate tests use: u8s8 (the default), or u8u8 where
/// u8s8 can saturate.
pub fn gated_int8_kernel() -> &'static str {
    if u8s8_can_saturate() {
        "u8u8"
    } else {
        "u8s8"
    }
}
