//! `effir export --precision int8`: the transformer's linear layers become
//! dynamically quantized `MatMulInteger` products (int8 weights per output
//! channel), every other part stays float32, the graph runs in an
//! independent ONNX Runtime client within the int8 parity gate, and
//! `effir validate` applies the int8 gates and records the kernel and CPU.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_refused, effir, export_output, fixture, gated_int8_kernel, minilm_dir, python_client,
    read_json, stderr, u8s8_can_saturate,
};
use effir_onnx::cpu_features::CpuFeatures;
use effir_onnx::graph_file::GraphFile;

const ARCHITECTURES: [&str; 6] = ["bert", "gemma3", "llama", "mistral", "qwen2", "qwen3"];
const KERNELS: [&str; 3] = ["u8s8", "u8u8", "reduce-range"];
/// `configs/gates.yaml`'s `parity.int8.min_cosine`.
const INT8_MIN_COSINE: f64 = 0.99;

/// An export with the sentence-transformers profile (the head in the graph).
fn export(model: &Path, out: &Path, extra: &[&str]) {
    let args = [&["--profile", "sentence-transformers"], extra].concat();
    common::export(model, out, &args);
}

fn op_count(graph: &GraphFile, op: &str) -> usize {
    graph.op_counts().get(op).copied().unwrap_or(0)
}

#[test]
fn int8_exports_of_every_architecture_stay_within_the_int8_gate() {
    let work = tempfile::tempdir().unwrap();
    for arch in ARCHITECTURES {
        let model = fixture(arch);
        let fp32_dir = work.path().join(format!("{arch}-fp32"));
        export(&model, &fp32_dir, &[]);
        let fp32 = GraphFile::read(&fp32_dir.join("model.onnx")).unwrap();
        assert_eq!(fp32.metadata("effir.precision"), Some("fp32"));
        for kernel in KERNELS {
            let name = format!("{arch}-int8-{kernel}");
            let dir = work.path().join(&name);
            export(
                &model,
                &dir,
                &["--precision", "int8", "--int8-kernel", kernel],
            );
            let int8 = GraphFile::read(&dir.join("model.onnx")).unwrap();
            // Every linear layer of the transformer, and nothing else, is
            // an integer product: the attention products and the
            // sentence-transformers head stay float MatMuls.
            let integer = op_count(&int8, "MatMulInteger");
            assert!(integer > 0, "{name}: no MatMulInteger");
            assert_eq!(
                op_count(&fp32, "MatMul"),
                op_count(&int8, "MatMul") + integer,
                "{name}: float products replaced one for one"
            );
            assert!(op_count(&int8, "DynamicQuantizeLinear") < integer);
            assert_eq!(int8.metadata("effir.precision"), Some("int8"));
            assert_eq!(int8.metadata("effir.int8_kernel"), Some(kernel));
            let summary = read_json(&dir.join("effir_export.json"));
            assert_eq!(summary["precision"], "int8", "{name}");
            assert_eq!(summary["int8_kernel"], kernel, "{name}");
            assert!(summary["cpu_features"]["vnni"].is_boolean(), "{name}");
            // An independent client: the onnx checker, and onnxruntime
            // against transformers' embeddings within the int8 gate (not
            // asked of u8s8 where it can saturate: loaded, not gated).
            let gate = if kernel == "u8s8" && u8s8_can_saturate() {
                eprintln!("{name}: this CPU has no VNNI, u8s8 checked for loading only");
                -1.0
            } else {
                INT8_MIN_COSINE
            };
            python_client(&dir, &model, gate);
        }
    }
}

/// Pruned models export to int8 as whole ones do: a drop + narrow plan of
/// every architecture, exported with `--precision int8`, stays within the
/// int8 parity gate of the *pruned* model run in candle (the graph names
/// its source model; `validate` is given the unpruned one as reference),
/// and only the linear layers that pruning kept become integer products.
#[test]
fn int8_exports_of_pruned_models_stay_within_the_int8_gate() {
    let work = tempfile::tempdir().unwrap();
    let gates = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml");
    let calibration = [
        "Pruned projections are quantized per output channel.",
        "A dropped MLP has no weights left to quantize.",
        "Calibration text decides which neurons stay.",
    ];
    for arch in ARCHITECTURES {
        let pruned = common::prune_fixture(
            arch,
            work.path(),
            &calibration,
            &["--drop-layers", "1", "--mlp-keep", "0.5"],
        );
        let fp32_dir = work.path().join(format!("{arch}-pruned-fp32"));
        export(&pruned, &fp32_dir, &[]);
        let dir = work.path().join(format!("{arch}-pruned-int8"));
        // The default kernel (u8s8), or u8u8 where u8s8 can saturate.
        let kernel = gated_int8_kernel();
        export(
            &pruned,
            &dir,
            &["--precision", "int8", "--int8-kernel", kernel],
        );
        let fp32 = GraphFile::read(&fp32_dir.join("model.onnx")).unwrap();
        let int8 = GraphFile::read(&dir.join("model.onnx")).unwrap();
        let integer = op_count(&int8, "MatMulInteger");
        assert!(integer > 0, "{arch}: no MatMulInteger");
        assert_eq!(
            op_count(&fp32, "MatMul"),
            op_count(&int8, "MatMul") + integer,
            "{arch}: the pruned graph's float products replaced one for one"
        );
        let report = work.path().join(format!("{arch}-report"));
        let _ = common::validate_on_tiny(&fixture(arch), &dir, &gates, Some(&report));
        let json = read_json(&report.join("validation.json"));
        assert_eq!(json["precision"], "int8", "{arch}");
        let candle_model = json["parity"]["candle_model"].as_str().unwrap_or_default();
        assert!(
            candle_model.ends_with(&format!("{arch}-pruned")),
            "{arch}: parity against {candle_model}, not the pruned model"
        );
        let min_cosine = json["parity"]["min_cosine"]
            .as_f64()
            .unwrap_or_else(|| panic!("{arch}: no parity in {json}"));
        assert!(
            min_cosine >= INT8_MIN_COSINE,
            "{arch}: pruned int8 parity {min_cosine} under {INT8_MIN_COSINE}"
        );
    }
}

/// The two kernels a user chooses between on x86 rank Cranfield alike, and
/// `validate` judges int8 graphs by the int8 parity gate and says which
/// kernel and CPU it measured.
#[test]
fn both_int8_kernels_rank_cranfield_alike_and_validate_records_them() {
    let work = tempfile::tempdir().unwrap();
    let data = common::dataset("cranfield");
    let gates = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml");
    let cache = work.path().join("cache");
    let ndcg = |kernel: &str| -> (f64, serde_json::Value) {
        let dir = work.path().join(format!("minilm-{kernel}"));
        export(
            &minilm_dir(),
            &dir,
            &["--precision", "int8", "--int8-kernel", kernel],
        );
        let report = work.path().join(format!("report-{kernel}"));
        // The verdict is not asserted: whether int8 MiniLM passes the
        // 98 % retention gate is a measurement (RESULTS.md), not a spec.
        let _ = effir(&[
            "validate",
            "--quiet",
            "--reference",
            minilm_dir().to_str().unwrap(),
            "--candidate",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--gates",
            gates.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--out",
            report.to_str().unwrap(),
        ]);
        let json = read_json(&report.join("validation.json"));
        let value = json["quality"][0]["candidate_ndcg_at_10"]
            .as_f64()
            .unwrap_or_else(|| panic!("{kernel}: no nDCG@10 in {json}"));
        (value, json)
    };
    // Without VNNI u8s8 saturates (0.3683 against u8u8's 0.3809 measured
    // on such a host): there the two kernels that cannot saturate are the
    // pair a user chooses between.
    let (first, second) = if u8s8_can_saturate() {
        ("u8u8", "reduce-range")
    } else {
        ("u8s8", "u8u8")
    };
    let (a, report) = ndcg(first);
    let (b, _) = ndcg(second);
    assert!((a - b).abs() <= 0.01, "nDCG@10 {first} {a} vs {second} {b}");
    assert_eq!(report["precision"], "int8");
    assert_eq!(report["int8_kernel"], first);
    assert!(report["cpu_features"]["avx2"].is_boolean());
    assert_eq!(
        report["cpu_features"]["vnni"],
        CpuFeatures::detect().vnni,
        "validate records the CPU it ran on"
    );
    let gates: Vec<&str> = report["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gate"].as_str().unwrap())
        .collect();
    assert!(gates.contains(&"parity.int8.min_cosine"), "{gates:?}");
    assert!(!gates.contains(&"parity.max_abs_diff"), "{gates:?}");
}

/// Without `--int8-kernel` (or with `auto`) the kernel is chosen for the
/// CPU that exports: u8s8 where its products cannot saturate, reduce-range
/// (the same fast instructions, 7-bit weights) where they can. The choice
/// and the CPU are recorded, and no saturation warning is printed.
#[test]
fn the_default_int8_kernel_is_the_fast_one_that_cannot_saturate_on_this_cpu() {
    let work = tempfile::tempdir().unwrap();
    let cpu = CpuFeatures::detect();
    let expected = if cpu.u8s8_may_saturate() {
        "reduce-range"
    } else {
        "u8s8"
    };
    for (name, extra) in [
        ("default", &["--precision", "int8"][..]),
        (
            "auto",
            &["--precision", "int8", "--int8-kernel", "auto"][..],
        ),
    ] {
        let dir = work.path().join(name);
        let run = export_output(&fixture("bert"), &dir, extra);
        assert!(run.status.success(), "{name}: {}", stderr(&run));
        let int8 = GraphFile::read(&dir.join("model.onnx")).unwrap();
        assert_eq!(int8.metadata("effir.int8_kernel"), Some(expected), "{name}");
        let summary = read_json(&dir.join("effir_export.json"));
        assert_eq!(summary["int8_kernel"], expected, "{name}");
        assert_eq!(summary["cpu_features"]["vnni"], cpu.vnni, "{name}");
        assert!(
            !stderr(&run).contains("can saturate here"),
            "{name}: the chosen kernel is not the one the warning is about: {}",
            stderr(&run)
        );
    }
    // Asking for u8s8 gets it, with the export's warning where it can
    // saturate; validation on such a CPU notes it in its report too.
    let dir = work.path().join("u8s8");
    let run = export_output(
        &fixture("bert"),
        &dir,
        &["--precision", "int8", "--int8-kernel", "u8s8"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        stderr(&run).contains("can saturate here"),
        cpu.u8s8_may_saturate(),
        "{}",
        stderr(&run)
    );
    let gates = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml");
    for name in ["u8s8", "auto"] {
        let report = work.path().join(format!("report-{name}"));
        let _ = common::validate_on_tiny(
            &fixture("bert"),
            &work.path().join(name),
            &gates,
            Some(&report),
        );
        let markdown = std::fs::read_to_string(report.join("validation.md")).unwrap();
        let noted = markdown.contains("u8s8 products can saturate here");
        assert_eq!(
            noted,
            name == "u8s8" && cpu.u8s8_may_saturate(),
            "{name}: {markdown}"
        );
    }
}

#[test]
fn int8_requests_that_cannot_be_met_fail_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let out: PathBuf = work.path().join("out");
    let model = fixture("bert");
    for (extra, needle) in [
        (&["--precision", "fp16"][..], "fp16"),
        (&["--precision", "int4"][..], "int4"),
        (&["--int8-kernel", "u8u8"][..], "--precision int8"),
        (
            &["--precision", "int8", "--int8-kernel", "s8s8"][..],
            "s8s8",
        ),
        (
            &["--precision", "int8", "--target", "tensorrt"][..],
            "calibration",
        ),
        (
            &[
                "--precision",
                "int8",
                "--target",
                "tensorrt",
                "--int8-kernel",
                "u8u8",
            ][..],
            "QDQ",
        ),
    ] {
        let run = export_output(&model, &out, extra);
        assert_refused(&run, &extra, needle, &out);
    }
}

/// A quantized graph effir did not write (no `effir.precision`, as
/// Optimum's int8 exports) is recognised by its integer products and judged
/// by the int8 parity gates; a float graph without metadata stays fp32.
#[test]
fn a_third_party_int8_graph_is_judged_by_the_int8_gates() {
    let work = tempfile::tempdir().unwrap();
    let gates = work.path().join("gates.yaml");
    std::fs::write(
        &gates,
        "parity:\n  min_cosine: 0.99999\n  int8:\n    min_cosine: 0.9\n",
    )
    .unwrap();
    for (precision, extra) in [("int8", &["--precision", "int8"][..]), ("fp32", &[][..])] {
        let dir = work.path().join(precision);
        export(&fixture("bert"), &dir, extra);
        let path = dir.join("model.onnx");
        let mut file = GraphFile::read(&path).unwrap();
        file.model
            .metadata_props
            .retain(|p| !p.key.starts_with("effir."));
        std::fs::write(&path, prost::Message::encode_to_vec(&file.model)).unwrap();
        assert_eq!(GraphFile::read(&path).unwrap().precision(), precision);
        let report = work.path().join(format!("report-{precision}"));
        let out = effir(&[
            "validate",
            "--quiet",
            "--no-cache",
            "--reference",
            fixture("bert").to_str().unwrap(),
            "--candidate",
            dir.to_str().unwrap(),
            "--candidate-model",
            fixture("bert").to_str().unwrap(),
            "--data",
            fixture("eval/tiny").to_str().unwrap(),
            "--gates",
            gates.to_str().unwrap(),
            "--out",
            report.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{precision}: {}", stderr(&out));
        let json = read_json(&report.join("validation.json"));
        assert_eq!(json["precision"], precision);
        let gate = json["gates"][0]["gate"].as_str().unwrap();
        let want = if precision == "int8" {
            "parity.int8.min_cosine"
        } else {
            "parity.min_cosine"
        };
        assert_eq!(gate, want);
    }
}
