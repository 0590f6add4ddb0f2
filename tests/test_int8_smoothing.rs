//! Smoothed dynamic int8: `effir export --precision int8 --int8-smoothing
//! ALPHA --calib-data DIR` divides each projection's input channels by
//! SmoothQuant factors measured on the calibration text and multiplies the
//! weights' rows by them, so that one activation channel with large values
//! no longer sets the int8 step of every other channel.
//!
//! - Every architecture's smoothed graph is an int8 graph like the
//!   unsmoothed one (the same integer products, no float product by a
//!   weight) within the int8 parity gate in an independent client.
//! - On a model with outlier channels, built so that its float function is
//!   unchanged, smoothing gives back the parity that the outliers cost.
//! - Requests that cannot be met are refused before anything is written.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_refused, calibration_file, copy_model, edit_weights, export_st, exported_st, fixture,
    python_client, read_json,
};
use effir_onnx::graph_file::GraphFile;

const ARCHITECTURES: [&str; 6] = ["bert", "gemma3", "llama", "mistral", "qwen2", "qwen3"];
/// `configs/gates.yaml`'s `parity.int8.min_cosine`.
const INT8_MIN_COSINE: f64 = 0.99;

fn op_count(graph: &GraphFile, op: &str) -> usize {
    graph.op_counts().get(op).copied().unwrap_or(0)
}

/// The lowest cosine `effir validate` measures between `graph_dir` and
/// `model` in candle (the fixture evaluation set's texts).
fn parity(model: &Path, graph_dir: &Path, report: &Path) -> f64 {
    let gates = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml");
    let _ = common::validate_on_tiny(model, graph_dir, &gates, Some(report));
    let json = read_json(&report.join("validation.json"));
    json["parity"]["min_cosine"]
        .as_f64()
        .unwrap_or_else(|| panic!("no parity in {json}"))
}

#[test]
fn smoothed_int8_exports_of_every_architecture_stay_within_the_int8_gate() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    let calib = calib.to_str().unwrap();
    for arch in ARCHITECTURES {
        let model = fixture(arch);
        // u8s8, or u8u8 where u8s8 can saturate (common::u8s8_can_saturate).
        let kernel = common::gated_int8_kernel();
        let plain = exported_st(
            &model,
            &work.path().join(format!("{arch}-int8")),
            &["--precision", "int8", "--int8-kernel", kernel],
        );
        let dir = work.path().join(format!("{arch}-smoothed"));
        let smoothed = exported_st(
            &model,
            &dir,
            &[
                "--precision",
                "int8",
                "--int8-kernel",
                kernel,
                "--int8-smoothing",
                "0.75",
                "--calib",
                calib,
            ],
        );
        // The same integer products, each input quantized once.
        let products = op_count(&plain, "MatMulInteger");
        assert!(products > 0, "{arch}");
        assert_eq!(op_count(&smoothed, "MatMulInteger"), products, "{arch}");
        assert_eq!(
            op_count(&smoothed, "DynamicQuantizeLinear"),
            op_count(&plain, "DynamicQuantizeLinear"),
            "{arch}"
        );
        // The float products left are the unsmoothed graph's (a
        // sentence-transformers Dense head), none by a projection matrix.
        let float_products = |graph: &GraphFile| -> Vec<String> {
            let g = graph.model.graph.as_ref().unwrap();
            g.node
                .iter()
                .filter(|n| n.op_type == "MatMul" && n.input[1].ends_with(".weight_t"))
                .map(|n| n.input[1].clone())
                .collect()
        };
        assert_eq!(float_products(&smoothed), float_products(&plain), "{arch}");
        let summary = read_json(&dir.join("effir_export.json"));
        assert_eq!(summary["precision"], "int8");
        let smoothing = &summary["calibration"]["smoothing"];
        assert_eq!(smoothing["alpha"], 0.75, "{arch}: {summary}");
        let recorded = smoothing["products"].as_array().unwrap();
        assert_eq!(recorded.len(), products, "{arch}");
        for p in recorded {
            let (lo, hi) = (
                p["factor_range"][0].as_f64().unwrap(),
                p["factor_range"][1].as_f64().unwrap(),
            );
            assert!(lo > 0.0 && lo <= hi && hi.is_finite(), "{arch}: {p}");
        }
        // Where each division went: BERT's norms also feed the residual
        // stream, so its inputs keep a Mul; a pre-norm decoder's divisions
        // fold into the norm scales (Q/K/V, gate/up) and the up projection's
        // columns (down), leaving a Mul for the attention output only.
        let mut divided_by_mul = std::collections::BTreeSet::new();
        for p in recorded {
            let module = p["module"].as_str().unwrap();
            let division = p["division"].as_str().unwrap();
            let attention_output = ["o_proj", "attention.output.dense"]
                .iter()
                .any(|o| module.ends_with(o));
            if arch == "bert" || attention_output {
                assert_eq!(division, "mul", "{arch}: {p}");
            } else if module.ends_with("down_proj") {
                assert!(division.contains("up_proj"), "{arch}: {p}");
            } else {
                assert!(division.contains("layernorm"), "{arch}: {p}");
            }
            if division == "mul" {
                // Products sharing an input share its Mul.
                let layer = p["layer"].as_u64().unwrap();
                let group = ["query", "key", "value", "q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|q| module.ends_with(q));
                divided_by_mul.insert((layer, if group { "qkv" } else { module }));
            }
        }
        assert_eq!(
            op_count(&smoothed, "Mul"),
            op_count(&plain, "Mul") + divided_by_mul.len(),
            "{arch}: one Mul per input divided by a Mul, none for folded ones"
        );
        assert_eq!(smoothed.metadata("effir.int8_smoothing"), Some("0.75"));
        assert_eq!(smoothed.metadata("effir.precision"), Some("int8"));
        python_client(&dir, &model, INT8_MIN_COSINE);
    }
}

/// The Llama fixture with outlier channels that leave its float function
/// unchanged: in every layer, channel 0 of both norms' weights is scaled by
/// `FACTOR` and the matching input column of the projections that read the
/// norm (Q, K, V; gate, up) divided by it. The norms' outputs feed only
/// those projections in a pre-norm decoder, so only int8 notices.
fn outlier_llama() -> tempfile::TempDir {
    const FACTOR: f64 = 300.0;
    let dir = copy_model(&fixture("llama"));
    edit_weights(dir.path(), |tensors| {
        let layers = tensors
            .keys()
            .filter(|k| k.ends_with("input_layernorm.weight"))
            .count();
        assert!(layers > 0);
        let channel = |n: usize, value: f64| {
            let mut v = vec![1f32; n];
            v[0] = value as f32;
            Tensor::from_vec(v, n, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for i in 0..layers {
            let layer = format!("model.layers.{i}");
            for (norm, projections) in [
                (
                    "input_layernorm",
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..],
                ),
                (
                    "post_attention_layernorm",
                    &["mlp.gate_proj", "mlp.up_proj"][..],
                ),
            ] {
                let name = format!("{layer}.{norm}.weight");
                let w = &tensors[&name];
                let scaled = w
                    .broadcast_mul(&channel(w.dim(0).unwrap(), FACTOR))
                    .unwrap();
                tensors.insert(name, scaled);
                for p in projections {
                    let name = format!("{layer}.{p}.weight");
                    let w = &tensors[&name]; // (out, in)
                    let columns = channel(w.dim(1).unwrap(), 1.0 / FACTOR);
                    let scaled = w.broadcast_mul(&columns.unsqueeze(0).unwrap()).unwrap();
                    tensors.insert(name, scaled);
                }
            }
        }
    });
    dir
}

#[test]
fn smoothing_gives_back_what_an_outlier_channel_costs_int8() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    let calib = calib.to_str().unwrap();
    let model = outlier_llama();
    // The edit keeps the float function: the float32 export matches the
    // original fixture's reference embeddings.
    let fp32 = work.path().join("fp32");
    exported_st(model.path(), &fp32, &[]);
    python_client(&fp32, &fixture("llama"), 0.99999);

    let plain = work.path().join("int8");
    exported_st(model.path(), &plain, &["--precision", "int8"]);
    let smoothed = work.path().join("int8-smoothed");
    exported_st(
        model.path(),
        &smoothed,
        &[
            "--precision",
            "int8",
            "--int8-smoothing",
            "0.75",
            "--calib",
            calib,
        ],
    );
    let before = parity(model.path(), &plain, &work.path().join("report-int8"));
    let after = parity(
        model.path(),
        &smoothed,
        &work.path().join("report-smoothed"),
    );
    assert!(
        before < INT8_MIN_COSINE,
        "the outliers were meant to fail the int8 gate unsmoothed: {before}"
    );
    assert!(
        after >= INT8_MIN_COSINE,
        "smoothed int8 is within the gate: {after} (unsmoothed {before})"
    );
    let summary = read_json(&smoothed.join("effir_export.json"));
    for p in summary["calibration"]["smoothing"]["products"]
        .as_array()
        .unwrap()
    {
        let module = p["module"].as_str().unwrap();
        if module.ends_with("q_proj") || module.ends_with("up_proj") {
            // The outlier channel's range moved into the weights.
            assert!(
                p["smoothed_input_max_abs"].as_f64().unwrap()
                    < p["input_max_abs"].as_f64().unwrap() / 10.0,
                "{p}"
            );
        }
    }
}

#[test]
fn smoothing_requests_that_cannot_be_met_are_refused_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let calib = calibration_file(work.path());
    let c = calib.to_str().unwrap();
    let out = work.path().join("out");
    let model = fixture("bert");
    for (extra, needle) in [
        (
            &["--precision", "int8", "--int8-smoothing", "0.75"][..],
            "calibration text",
        ),
        (
            &[
                "--precision",
                "int8",
                "--int8-smoothing",
                "1.5",
                "--calib",
                c,
            ][..],
            "(0, 1]",
        ),
        (
            &["--precision", "int8", "--int8-smoothing", "0", "--calib", c][..],
            "(0, 1]",
        ),
        (
            &["--int8-smoothing", "0.75", "--calib", c][..],
            "applies to dynamic int8",
        ),
        (
            &[
                "--precision",
                "fp16",
                "--int8-smoothing",
                "0.75",
                "--calib",
                c,
            ][..],
            "applies to dynamic int8",
        ),
        (
            &[
                "--precision",
                "int8",
                "--target",
                "tensorrt",
                "--int8-smoothing",
                "0.75",
                "--calib",
                c,
            ][..],
            "applies to dynamic int8",
        ),
        (
            &[
                "--precision",
                "int8",
                "--int8-smoothing",
                "0.75",
                "--calib",
                c,
                "--stream",
            ][..],
            "--stream",
        ),
    ] {
        let run = export_st(&model, &out, extra);
        assert_refused(&run, &extra, needle, &out);
    }
}
