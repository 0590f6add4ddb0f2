//! The precisions `effir export` calibrates on text first:
//! - `--precision fp16`: the projection products in float16, range-checked
//!   on the calibration text; a product that would overflow float16 stays
//!   float32 (or, with `--strict`, the export is refused, naming it);
//! - `--precision int8 --target tensorrt`: static symmetric int8 in
//!   QuantizeLinear/DequantizeLinear form, activation scales calibrated.
//!
//! Each graph loads in an independent ONNX Runtime client within its
//! precision's parity gate, and `effir validate` judges it by that gate; a
//! graph that produces NaN or Inf fails validation naming where.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{
    assert_refused, calibration_file, copy_model, edit_weights, effir, export_st, exported_st,
    fixture, python_client, read_json, stderr,
};
use effir_onnx::graph_file::GraphFile;

const ARCHITECTURES: [&str; 6] = ["bert", "gemma3", "llama", "mistral", "qwen2", "qwen3"];
/// `configs/gates.yaml`'s `parity.fp16.min_cosine` and `parity.int8.min_cosine`.
const FP16_MIN_COSINE: f64 = 0.9995;
const INT8_MIN_COSINE: f64 = 0.99;

/// `effir validate` of `graph_dir` against `model` in candle with the
/// gates file `gates`, on the tiny fixture dataset; returns
/// `validation.json` (the exit status is the caller's to judge).
fn validate(model: &Path, graph_dir: &Path, gates: &Path, report: &Path) -> serde_json::Value {
    let _ = common::validate_on_tiny(model, graph_dir, gates, Some(report));
    read_json(&report.join("validation.json"))
}

/// The gate called `name` in a validation report.
fn gate(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["gates"]
        .as_array()
        .and_then(|gates| gates.iter().find(|g| g["gate"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no gate {name} in {report}"))
}

fn configs_gates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml")
}

fn op_count(graph: &GraphFile, op: &str) -> usize {
    graph.op_counts().get(op).copied().unwrap_or(0)
}

/// The element types of the graph's initializers, by name.
fn initializer_types(graph: &GraphFile) -> Vec<(String, i32)> {
    let g = graph.model.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .map(|t| (t.name.clone(), t.data_type))
        .collect()
}

#[test]
fn fp16_exports_of_every_architecture_stay_within_the_fp16_gate() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    for arch in ARCHITECTURES {
        let model = fixture(arch);
        let fp32 = exported_st(&model, &work.path().join(format!("{arch}-fp32")), &[]);
        let dir = work.path().join(format!("{arch}-fp16"));
        let fp16 = exported_st(
            &model,
            &dir,
            &["--precision", "fp16", "--calib", calib.to_str().unwrap()],
        );
        // Every float32 matrix product is still a MatMul; the projections'
        // weights are float16 now, and the head and embeddings float32.
        assert_eq!(
            op_count(&fp32, "MatMul"),
            op_count(&fp16, "MatMul"),
            "{arch}"
        );
        let summary = read_json(&dir.join("effir_export.json"));
        let products = summary["calibration"]["float16"]["products"]
            .as_array()
            .unwrap_or_else(|| panic!("{arch}: no float16 products in {summary}"));
        let half_weights = initializer_types(&fp16)
            .iter()
            .filter(|(_, t)| *t == 10)
            .count();
        assert_eq!(
            half_weights,
            products.len(),
            "{arch}: one float16 matrix per product"
        );
        assert!(
            products.len() >= 4 * 2,
            "{arch}: {} products",
            products.len()
        );
        for p in products {
            assert_eq!(p["precision"], "fp16", "{arch}: {p}");
            assert!(p["input_max_abs"].as_f64().unwrap() > 0.0, "{arch}: {p}");
            assert!(p["output_max_abs"].as_f64().unwrap() > 0.0, "{arch}: {p}");
        }
        assert_eq!(summary["precision"], "fp16");
        assert_eq!(fp16.metadata("effir.precision"), Some("fp16"));
        assert_eq!(summary["calibration"]["texts"], 6);
        python_client(&dir, &model, FP16_MIN_COSINE);
    }
}

#[test]
fn qdq_int8_exports_parse_in_tensorrt_and_stay_within_the_int8_gate() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    for arch in ARCHITECTURES {
        let model = fixture(arch);
        let dir = work.path().join(format!("{arch}-qdq"));
        let qdq = exported_st(
            &model,
            &dir,
            &[
                "--precision",
                "int8",
                "--target",
                "tensorrt",
                "--calib",
                calib.to_str().unwrap(),
            ],
        );
        // Static QDQ, none of the dynamic CPU operators TensorRT lacks.
        assert_eq!(op_count(&qdq, "DynamicQuantizeLinear"), 0, "{arch}");
        assert_eq!(op_count(&qdq, "MatMulInteger"), 0, "{arch}");
        let summary = read_json(&dir.join("effir_export.json"));
        let scales = summary["calibration"]["activation_scales"]
            .as_array()
            .unwrap_or_else(|| panic!("{arch}: no activation scales in {summary}"));
        let quantized: Vec<&serde_json::Value> =
            scales.iter().filter(|s| s["quantized"] == true).collect();
        // Q, K, V (and gate), up are quantized; the output projections not.
        assert!(
            !quantized.is_empty() && quantized.len() < scales.len(),
            "{arch}"
        );
        for s in &quantized {
            let module = s["module"].as_str().unwrap();
            assert!(
                !["o_proj", "down_proj", "output.dense"]
                    .iter()
                    .any(|o| module.ends_with(o)),
                "{arch}: {module} is an output projection"
            );
            let (max, scale) = (
                s["input_max_abs"].as_f64().unwrap(),
                s["scale"].as_f64().unwrap(),
            );
            assert!(
                (scale * 127.0 - max).abs() <= 1e-5 * max.max(1.0),
                "{arch}: {s}"
            );
        }
        // One weight DequantizeLinear per quantized product, and one
        // activation pair per distinct input (Q, K and V share theirs).
        assert!(
            op_count(&qdq, "DequantizeLinear") > quantized.len(),
            "{arch}"
        );
        assert!(op_count(&qdq, "QuantizeLinear") < quantized.len(), "{arch}");
        // Symmetric: every zero point TensorRT reads is an int8 zero.
        let g = qdq.model.graph.as_ref().unwrap();
        for t in g
            .initializer
            .iter()
            .filter(|t| t.name.contains("zero_point"))
        {
            assert_eq!(t.data_type, 3, "{arch}: {} is not int8", t.name);
            assert!(
                t.raw_data.iter().all(|&b| b == 0),
                "{arch}: {} not zero",
                t.name
            );
        }
        assert_eq!(summary["int8_form"], "qdq");
        assert_eq!(summary["target"], "tensorrt");
        assert_eq!(qdq.metadata("effir.int8_form"), Some("qdq"));
        let lint = effir(&["lint-onnx", dir.join("model.onnx").to_str().unwrap()]);
        assert!(
            lint.status.success(),
            "{arch}: TensorRT lint: {}",
            stderr(&lint)
        );
        python_client(&dir, &model, INT8_MIN_COSINE);
    }
}

/// The BERT fixture with layer 1's MLP output projection scaled up so that
/// its product reaches ~10⁵ on ordinary text: finite in float32 (the
/// LayerNorm after the residual brings it back), beyond float16's 65504.
fn overflowing_fixture() -> tempfile::TempDir {
    let dir = copy_model(&fixture("bert"));
    edit_weights(dir.path(), |tensors| {
        let name = "encoder.layer.1.output.dense.weight";
        let w: &Tensor = &tensors[name];
        let scaled = (w * 1.0e6).unwrap();
        tensors.insert(name.into(), scaled);
    });
    dir
}

#[test]
fn the_range_check_keeps_an_overflowing_product_in_float32_or_refuses_it() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    let model = overflowing_fixture();
    let dir = work.path().join("fp16");
    exported_st(
        model.path(),
        &dir,
        &["--precision", "fp16", "--calib", calib.to_str().unwrap()],
    );
    let summary = read_json(&dir.join("effir_export.json"));
    let float16 = &summary["calibration"]["float16"];
    assert_eq!(
        float16["kept_float32"],
        serde_json::json!(["encoder.layer.1.output.dense"]),
        "{float16}"
    );
    let kept = float16["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["module"] == "encoder.layer.1.output.dense")
        .unwrap();
    assert!(kept["output_max_abs"].as_f64().unwrap() > 65504.0, "{kept}");
    assert_eq!(kept["precision"], "fp32");
    // With the product kept float32 the graph is still the model (its
    // fixture reference embeddings are the unedited model's: compare with
    // the edited model in candle).
    let report = validate(
        model.path(),
        &dir,
        &configs_gates(),
        &work.path().join("report"),
    );
    let fp16 = gate(&report, "parity.fp16.min_cosine");
    assert_eq!(fp16["passed"], true, "{fp16}");

    // --strict refuses, naming the layer, and writes nothing.
    let strict = work.path().join("strict");
    let run = export_st(
        model.path(),
        &strict,
        &[
            "--precision",
            "fp16",
            "--calib",
            calib.to_str().unwrap(),
            "--strict",
        ],
    );
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(
        err.contains("layer 1 (encoder.layer.1.output.dense)") && err.contains("65504"),
        "{err}"
    );
    assert!(!strict.exists());
}

/// A graph whose layer 1 MLP output projection holds infinite weights (a
/// corrupt checkpoint, or an overflow baked in) produces NaN; `validate`
/// fails it and names the first node that did, with the weight it reads.
#[test]
fn validate_fails_a_graph_that_produces_nan_naming_where() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&fixture("bert"));
    edit_weights(model.path(), |tensors| {
        let name = "encoder.layer.1.output.dense.weight";
        let w = tensors[name].ones_like().unwrap();
        tensors.insert(name.into(), (w * f64::INFINITY).unwrap());
    });
    let dir = work.path().join("nan");
    exported_st(model.path(), &dir, &[]);
    let report = work.path().join("report");
    let gates = work.path().join("gates.yaml");
    std::fs::write(&gates, "parity:\n  min_cosine: 0.99\n").unwrap();
    let run = common::validate_on_tiny(model.path(), &dir, &gates, Some(&report));
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(err.contains("parity.non_finite"), "{err}");
    assert!(
        err.contains("encoder.layer.1.output.dense.weight_t"),
        "the layer is not named: {err}"
    );
    let json = read_json(&report.join("validation.json"));
    assert!(json["parity"]["non_finite"].as_u64().unwrap() > 0);
    assert_eq!(json["passed"], false);
}

/// `validate` judges an fp16 graph by `parity.fp16` and a QDQ graph by
/// `parity.int8`.
#[test]
fn validate_applies_each_precisions_parity_gate() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    for (name, extra, gate_name, precision) in [
        (
            "fp16",
            &["--precision", "fp16"][..],
            "parity.fp16.min_cosine",
            "fp16",
        ),
        (
            "qdq",
            &["--precision", "int8", "--target", "tensorrt"][..],
            "parity.int8.min_cosine",
            "int8",
        ),
    ] {
        let dir = work.path().join(name);
        let args = [extra, &["--calib", calib.to_str().unwrap()]].concat();
        exported_st(&fixture("bert"), &dir, &args);
        let report = validate(
            &fixture("bert"),
            &dir,
            &configs_gates(),
            &work.path().join(format!("report-{name}")),
        );
        assert_eq!(gate(&report, gate_name)["passed"], true, "{name}: {report}");
        assert_eq!(report["precision"], precision, "{name}");
    }
}

#[test]
fn calibrated_precisions_refuse_bad_requests_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = work.path().join("out");
    let model = fixture("bert");
    let c = calib.to_str().unwrap();
    for (extra, needle) in [
        (&["--precision", "fp16"][..], "calibration text"),
        (&["--precision", "fp8", "--calib", c][..], "fp8"),
        (
            &["--precision", "fp16", "--calib", c, "--fp16"][..],
            "--fp16",
        ),
        (
            &[
                "--precision",
                "fp16",
                "--calib",
                c,
                "--fp16-headroom",
                "0.5",
            ][..],
            "headroom",
        ),
        (
            &["--precision", "fp16", "--calib", empty.to_str().unwrap()][..],
            "empty.txt",
        ),
        (&["--calib", c][..], "apply to --precision fp16"),
        (
            &["--precision", "int8", "--strict"][..],
            "apply to --precision fp16",
        ),
        // A token budget for a calibration that does not happen.
        (
            &["--precision", "int8", "--calib-tokens", "4096"][..],
            "--calib-tokens, --strict",
        ),
    ] {
        let run = export_st(&model, &out, extra);
        assert_refused(&run, &extra, needle, &out);
    }
}
