//! `effir rewrite` on graphs another exporter made (Optimum exports of the
//! BERT, Llama, Qwen2 and Gemma3 fixtures, `tests/fixtures/optimum/*/model.onnx`,
//! written by `tests/fixtures/optimum/make_exports.py`): the slimmed graph computes the
//! pruned (or fine-tuned) model, keeps the original's exact interface, and
//! graphs it cannot map are refused with nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_refused, effir, stderr};

use common::{assert_rows_match, fixture};
use effir_onnx::graph_file::GraphFile;
use effir_onnx::providers::ProviderSettings;
use effir_onnx::{GraphLocation, OnnxEncoder};
use effir_pipeline::{Embedder, LoadOptions, TextEmbedder};

fn optimum_graph(arch: &str) -> PathBuf {
    fixture("optimum").join(arch).join("model.onnx")
}

const TEXTS: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello world",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "Numbers 12 345 and symbols % & $ appear here.",
];

/// Drops MLP 1 and narrows the rest to half the MLP parameters.
fn prune(arch: &str, work: &Path) -> PathBuf {
    common::prune_fixture(
        arch,
        work,
        &TEXTS,
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    )
}

fn rewrite(graph: &Path, model: &Path, out: &Path) -> Output {
    rewrite_with(graph, model, out, &[])
}

fn rewrite_with(graph: &Path, model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "rewrite",
        "--onnx",
        graph.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    effir(&args)
}

fn embed(model: &dyn TextEmbedder) -> Vec<Vec<f32>> {
    model
        .embed_texts(&TEXTS, "", 2, &mut |_| {})
        .unwrap()
        .rows()
        .into_iter()
        .map(|r| r.to_vec())
        .collect()
}

/// Names, element types and axes of the graph's inputs and outputs.
fn interface(path: &Path) -> Vec<effir_onnx::graph_file::IoInfo> {
    let file = GraphFile::read(path).unwrap();
    file.inputs().into_iter().chain(file.outputs()).collect()
}

fn check_rewritten(original: &Path, rewritten_dir: &Path, model: &Path, what: &str) {
    let graph = rewritten_dir.join("model.onnx");
    assert_eq!(
        interface(&graph),
        interface(original),
        "{what}: interface changed"
    );
    let (a, b) = (
        GraphFile::read(original).unwrap(),
        GraphFile::read(&graph).unwrap(),
    );
    assert_eq!(
        a.model.opset_import, b.model.opset_import,
        "{what}: opset changed"
    );
    // The metadata is the original's, plus the model the graph now
    // computes, relative to the graph (validate compares it with that).
    let (source, kept): (Vec<_>, Vec<_>) = b
        .model
        .metadata_props
        .iter()
        .cloned()
        .partition(|p| p.key == "effir.source_model");
    assert_eq!(a.model.metadata_props, kept, "{what}: metadata changed");
    let recorded = rewritten_dir.join(&source[0].value);
    assert_eq!(
        std::fs::canonicalize(recorded).unwrap(),
        std::fs::canonicalize(model).unwrap(),
        "{what}: effir.source_model"
    );
    let candle = Embedder::load(model, &LoadOptions::default()).unwrap();
    assert_rows_match(what, &graph_embeddings(&graph), &embed(&candle));
    assert_onnx_checker_passes(rewritten_dir, what);
}

/// The embeddings ONNX Runtime computes with `graph`.
fn graph_embeddings(graph: &Path) -> Vec<Vec<f32>> {
    let onnx = OnnxEncoder::load(
        GraphLocation::resolve(graph).unwrap(),
        &LoadOptions::default(),
        &ProviderSettings::default(),
    )
    .unwrap();
    embed(&onnx)
}

/// ONNX checker and shape inference (Python onnx) accept the export in `dir`.
fn assert_onnx_checker_passes(dir: &Path, what: &str) {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_client.py"))
        .args(["--export", dir.to_str().unwrap(), "--check-only"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: onnx checker: {}",
        stderr(&out)
    );
}

#[test]
fn optimum_exports_are_slimmed_to_the_pruned_model_keeping_their_interface() {
    let work = tempfile::tempdir().unwrap();
    for arch in ["bert", "llama", "qwen2", "gemma3"] {
        let pruned = prune(arch, work.path());
        let out = work.path().join(format!("{arch}-rewritten"));
        let o = rewrite(&optimum_graph(arch), &pruned, &out);
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("MLPs dropped [1], narrowed [0, 2]"),
            "{arch}: {stdout}"
        );
        check_rewritten(&optimum_graph(arch), &out, &pruned, arch);
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(
            size(&out.join("model.onnx")) < size(&optimum_graph(arch)),
            "{arch}: not smaller"
        );
    }
}

#[test]
fn fine_tuned_weights_replace_every_matched_weight() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune("bert", work.path());
    // A few steps of full fine-tuning change every layer's weights, the
    // LayerNorms included (identical in the original: resolved by structure).
    let (train, config) = common::tiny_finetune_inputs(
        work.path(),
        &TEXTS,
        "max_steps: 3\nbatch_size: 4\nlearning_rate: 1.0e-2\ncheckpoint_every: 0\n",
    );
    let tuned = work.path().join("tuned");
    let o = common::finetune(&pruned, &train, &tuned, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = work.path().join("rewritten");
    let o = rewrite(&optimum_graph("bert"), &tuned, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    check_rewritten(&optimum_graph("bert"), &out, &tuned, "fine-tuned bert");
}

/// `--int8-smoothing` smooths the rewritten int8 products as `effir export`
/// does: the same integer products, each distinct input divided by a `Mul`
/// or, where it can be, by a tensor upstream; the interface kept, within the
/// int8 gate of the pruned model.
#[test]
fn optimum_exports_are_rewritten_to_smoothed_int8() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calibration.txt");
    std::fs::write(
        &calib,
        "Dense retrievers encode queries and documents.\nhello world\nNumbers 12 345 and symbols % & $.\n",
    )
    .unwrap();
    let ops = |graph: &Path, op: &str| {
        GraphFile::read(graph)
            .unwrap()
            .op_counts()
            .get(op)
            .copied()
            .unwrap_or(0)
    };
    for arch in ["bert", "llama"] {
        let pruned = prune(arch, work.path());
        let plain = work.path().join(format!("{arch}-int8"));
        let o = rewrite_with(
            &optimum_graph(arch),
            &pruned,
            &plain,
            &["--precision", "int8"],
        );
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        let out = work.path().join(format!("{arch}-smoothed"));
        let o = rewrite_with(
            &optimum_graph(arch),
            &pruned,
            &out,
            &[
                "--precision",
                "int8",
                "--int8-smoothing",
                "0.75",
                "--calib",
                calib.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("smoothed, strength 0.75"),
            "{arch}: {stdout}"
        );
        let (graph, plain) = (out.join("model.onnx"), plain.join("model.onnx"));
        assert_eq!(interface(&graph), interface(&optimum_graph(arch)), "{arch}");
        let products = ops(&plain, "MatMulInteger");
        assert_eq!(ops(&graph, "MatMulInteger"), products, "{arch}");
        let quantized_inputs = ops(&graph, "DynamicQuantizeLinear");
        assert!(
            quantized_inputs > 0 && quantized_inputs < products,
            "{arch}"
        );
        // BERT divides each quantized input with a Mul of its own; the
        // pre-norm Llama folds most divisions into its norm scales and up
        // projections instead.
        let added = ops(&graph, "Mul") - ops(&plain, "Mul");
        if arch == "bert" {
            assert_eq!(
                added, quantized_inputs,
                "{arch}: one Mul per quantized input"
            );
        } else {
            assert!(
                added < quantized_inputs,
                "{arch}: {added} Muls added, none folded"
            );
        }
        let candle = Embedder::load(&pruned, &LoadOptions::default()).unwrap();
        for (i, (a, b)) in graph_embeddings(&graph)
            .iter()
            .zip(embed(&candle))
            .enumerate()
        {
            let cos = common::cosine(a, &b);
            assert!(cos >= 0.99, "{arch}: row {i}: cosine {cos}");
        }
        assert_onnx_checker_passes(&out, arch);
    }
    let pruned = work.path().join("bert-pruned");
    let out = work.path().join("refused");
    let c = calib.to_str().unwrap();
    for (extra, needle) in [
        (
            vec!["--int8-smoothing", "0.75", "--calib", c],
            "--int8-smoothing applies to --precision int8",
        ),
        (
            vec!["--precision", "int8", "--int8-smoothing", "0.75"],
            "calibration text",
        ),
        (
            vec!["--precision", "int8", "--int8-smoothing", "2", "--calib", c],
            "(0, 1]",
        ),
        (
            vec!["--precision", "int8", "--calib", c],
            "apply to --int8-smoothing",
        ),
    ] {
        let o = rewrite_with(&optimum_graph("bert"), &pruned, &out, &extra);
        assert_refused(&o, &extra, needle, &out);
    }
}

/// `--precision int8` turns every MatMul by a transformer projection of an
/// Optimum export into the dynamic int8 chain (standard operators only),
/// keeping the interface: the graph reads as int8, passes the ONNX checker,
/// keeps no float product by a weight matrix, and stays within the int8
/// parity gate (0.99) of the pruned model in candle, for both kernels.
#[test]
fn optimum_exports_are_rewritten_to_int8_keeping_their_interface() {
    let work = tempfile::tempdir().unwrap();
    for arch in ["bert", "llama", "qwen2", "gemma3"] {
        let pruned = prune(arch, work.path());
        for kernel in ["u8s8", "u8u8"] {
            let out = work.path().join(format!("{arch}-{kernel}"));
            let o = rewrite_with(
                &optimum_graph(arch),
                &pruned,
                &out,
                &["--precision", "int8", "--int8-kernel", kernel],
            );
            // Where u8s8 can saturate, rewrite may refuse it by its own
            // parity check, writing nothing; the safe kernel must pass.
            if kernel == "u8s8" && common::u8s8_can_saturate() && !o.status.success() {
                assert!(
                    stderr(&o).contains("does not compute") && !out.exists(),
                    "{arch} {kernel}: {}",
                    stderr(&o)
                );
                continue;
            }
            assert!(o.status.success(), "{arch} {kernel}: {}", stderr(&o));
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                stdout.contains(&format!("projection products in int8 ({kernel})")),
                "{arch}: {stdout}"
            );
            let graph = out.join("model.onnx");
            assert_eq!(
                interface(&graph),
                interface(&optimum_graph(arch)),
                "{arch}: interface changed"
            );
            let file = GraphFile::read(&graph).unwrap();
            assert_eq!(file.precision(), "int8");
            let g = file.model.graph.as_ref().unwrap();
            let initializers: std::collections::HashMap<&str, usize> = g
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t.dims.len()))
                .collect();
            let float_weight_products = g
                .node
                .iter()
                .filter(|n| {
                    n.op_type == "MatMul" && initializers.get(n.input[1].as_str()) == Some(&2)
                })
                .count();
            assert_eq!(float_weight_products, 0, "{arch}: float products left");
            let integer = g
                .node
                .iter()
                .filter(|n| n.op_type == "MatMulInteger")
                .count();
            assert!(
                stdout.contains(&format!("; {integer} projection products")),
                "{arch}: {integer} MatMulInteger nodes, {stdout}"
            );
            // The dropped MLP has no product; every other projection has one.
            assert!(integer >= 3 * 4 + 2 * 2, "{arch}: {integer}");
            assert!(
                g.node
                    .iter()
                    .all(|n| n.domain.is_empty() || n.domain == "ai.onnx"),
                "{arch}: a contrib operator"
            );
            let candle = Embedder::load(&pruned, &LoadOptions::default()).unwrap();
            for (i, (a, b)) in graph_embeddings(&graph)
                .iter()
                .zip(embed(&candle))
                .enumerate()
            {
                let cos = common::cosine(a, &b);
                assert!(cos >= 0.99, "{arch} {kernel}: row {i}: cosine {cos}");
            }
            assert_onnx_checker_passes(&out, arch);
        }
    }
    // Bad requests: refused before anything is written.
    let pruned = work.path().join("bert-pruned");
    let out = work.path().join("refused");
    for (extra, needle) in [
        (
            vec!["--int8-kernel", "u8u8"],
            "--int8-kernel applies to --precision int8 only",
        ),
        (
            vec!["--precision", "fp16"],
            "rewrite writes fp32 or int8 products",
        ),
    ] {
        let o = rewrite_with(&optimum_graph("bert"), &pruned, &out, &extra);
        assert_refused(&o, &extra, needle, &out);
    }
    // A graph older than the int8 operators (opset 10).
    let mut file = GraphFile::read(&optimum_graph("bert")).unwrap();
    for o in file.model.opset_import.iter_mut() {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = 10;
        }
    }
    let old = work.path().join("opset10.onnx");
    std::fs::write(&old, prost::Message::encode_to_vec(&file.model)).unwrap();
    let o = rewrite_with(&old, &pruned, &out, &["--precision", "int8"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("int8 needs opset 11"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn graphs_that_cannot_be_mapped_are_refused_and_nothing_is_written() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune("bert", work.path());

    // An exporter pattern effir does not know: a contrib op computes layer 1's down projection.
    let mut file = GraphFile::read(&optimum_graph("bert")).unwrap();
    let down_t: Vec<f32> = {
        let t = common::load_tensors(&fixture("bert").join("model.safetensors"));
        let w = t
            .iter()
            .find(|(k, _)| k.ends_with("encoder.layer.1.output.dense.weight"))
            .unwrap()
            .1;
        w.t()
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let bytes: Vec<u8> = down_t.iter().flat_map(|v| v.to_le_bytes()).collect();
    let g = file.model.graph.as_mut().unwrap();
    let init = g
        .initializer
        .iter()
        .find(|t| t.raw_data == bytes)
        .expect("down weight by value")
        .name
        .clone();
    let node = g
        .node
        .iter_mut()
        .find(|n| n.op_type == "MatMul" && n.input[1] == init)
        .unwrap();
    node.op_type = "FusedMatMul".into();
    node.domain = "com.microsoft".into();
    let odd = work.path().join("odd.onnx");
    std::fs::write(&odd, prost::Message::encode_to_vec(&file.model)).unwrap();
    let out = work.path().join("refused");
    // Refused the same way whether the rewrite keeps float32 or is asked
    // for int8: the graph is mapped before anything is quantized.
    for precision in [&[][..], &["--precision", "int8"][..]] {
        let o = rewrite_with(&odd, &pruned, &out, precision);
        assert!(!o.status.success(), "{precision:?}");
        let err = stderr(&o);
        assert!(
            err.contains("layer 1") && err.contains("com.microsoft::FusedMatMul"),
            "{precision:?}: {err}"
        );
        assert!(!out.exists(), "{precision:?}");
    }

    // A graph of another model: its weights match nothing of this one.
    let other = prune("qwen2", work.path());
    for precision in [&[][..], &["--precision", "int8"][..]] {
        let o = rewrite_with(&optimum_graph("bert"), &other, &out, precision);
        assert!(!o.status.success(), "{precision:?}");
        assert!(
            stderr(&o).contains("no graph weight equals"),
            "{precision:?}: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "{precision:?}");
    }

    // An int8 graph (here effir's own, its weights in external data): the
    // float weights it would be mapped by are gone.
    let int8 = work.path().join("int8");
    common::export(
        &fixture("bert"),
        &int8,
        &["--precision", "int8", "--external-data", "always"],
    );
    let o = rewrite(&int8.join("model.onnx"), &pruned, &out);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("computes in int8") && stderr(&o).contains("--precision int8"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());

    // A truncated file.
    let bytes = std::fs::read(optimum_graph("bert")).unwrap();
    let cut = work.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let o = rewrite(&cut, &pruned, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cut.onnx"), "{}", stderr(&o));
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".effir"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_graph_with_external_data_keeps_it() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune("llama", work.path());
    // The same Optimum graph with its weights in model.onnx_data.
    let original_dir = work.path().join("external");
    std::fs::create_dir_all(&original_dir).unwrap();
    let file = GraphFile::read(&optimum_graph("llama")).unwrap();
    effir_onnx::graph_file::write_model(file.model, &original_dir, "model.onnx", true).unwrap();
    let original = original_dir.join("model.onnx");
    assert!(original_dir.join("model.onnx_data").is_file());
    let out = work.path().join("rewritten");
    let o = rewrite(&original, &pruned, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.join("model.onnx_data").is_file(),
        "external data not kept"
    );
    check_rewritten(&original, &out, &pruned, "external data");
}

/// Exporters that skip constant folding keep weights in `Constant` nodes
/// rather than initializers; they are matched and replaced the same way.
#[test]
fn weights_held_in_constant_nodes_are_rewritten() {
    use effir_onnx::proto::{
        attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, NodeProto,
    };
    let work = tempfile::tempdir().unwrap();
    let pruned = prune("bert", work.path());
    let mut file = GraphFile::read(&optimum_graph("bert")).unwrap();
    let g = file.model.graph.as_mut().unwrap();
    let (weights, rest): (Vec<_>, Vec<_>) = g
        .initializer
        .drain(..)
        .partition(|t| t.data_type == DataType::Float as i32 && t.dims.iter().product::<i64>() > 1);
    g.initializer = rest;
    let constants: Vec<NodeProto> = weights
        .into_iter()
        .map(|t| NodeProto {
            op_type: "Constant".into(),
            name: format!("{}_constant", t.name),
            output: vec![t.name.clone()],
            attribute: vec![AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(t),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    let weight_names: std::collections::HashSet<String> =
        constants.iter().map(|n| n.output[0].clone()).collect();
    let n_constants = constants.len();
    assert!(n_constants > 20);
    g.node.splice(0..0, constants);
    let dir = work.path().join("constants");
    std::fs::create_dir_all(&dir).unwrap();
    let original = dir.join("model.onnx");
    std::fs::write(&original, prost::Message::encode_to_vec(&file.model)).unwrap();

    let out = work.path().join("rewritten");
    let o = rewrite(&original, &pruned, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("MLPs dropped [1], narrowed [0, 2]"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    check_rewritten(&original, &out, &pruned, "constant weights");
    let rewritten = GraphFile::read(&out.join("model.onnx")).unwrap();
    let kept = rewritten
        .model
        .graph
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type == "Constant" && weight_names.contains(&n.output[0]))
        .count();
    // The dropped MLP's weights are gone with it; the rest stay Constants.
    assert!(kept > 0 && kept < n_constants, "{kept} of {n_constants}");

    // int8 quantizes weights held in initializers only: here there are none
    // to quantize, so it is refused with nothing written.
    let out = work.path().join("int8");
    let o = rewrite_with(&original, &pruned, &out, &["--precision", "int8"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no MatMul of this graph"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}
