//! `effir export` and the ONNX Runtime encoder, as a serving stack sees
//! them: every architecture's graph reproduces transformers /
//! sentence-transformers (checked by effir and by an independent Python
//! client), pruned models export as smaller graphs that compute exactly what
//! the pruned candle model computes, and bad input fails cleanly.
//!
//! Needs the ONNX Runtime library and Python `onnx`/`onnxruntime`
//! (`scripts/install-onnxruntime.sh`, run by `make test`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{effir, stderr};

use common::{assert_rows_match, fixture, minilm_dir, python_client, MIN_COSINE};
use effir_onnx::emit::{AttentionMask, EmitOptions, Profile};
use effir_onnx::export::{export, ExportOptions, ExternalData, Layout, Target};
use effir_onnx::graph::WeightStorage;
use effir_onnx::graph_file::GraphFile;
use effir_onnx::proto::tensor_proto::DataType;
use effir_onnx::providers::{GraphOptimization, Provider, ProviderSettings};
use effir_onnx::quantize::{Int8Kernel, MatmulPrecision};
use effir_onnx::{GraphLocation, OnnxEncoder};
use effir_pipeline::{Embedder, LoadOptions, TextEmbedder};

const ARCHITECTURES: [&str; 6] = ["bert", "gemma3", "llama", "mistral", "qwen2", "qwen3"];

fn options(profile: Profile) -> ExportOptions {
    ExportOptions {
        emit: EmitOptions {
            profile,
            ..Default::default()
        },
        layout: Layout::Flat,
        external_data: ExternalData::Auto,
        target: Target::TensorRt,
        overwrite: false,
        calibration: None,
        triton: None,
        stream: false,
    }
}

/// Exports `model` into `work/name` and returns the directory.
fn export_to(model: &Path, work: &Path, name: &str, options: &ExportOptions) -> PathBuf {
    let out = work.join(name);
    export(model, &out, options).unwrap_or_else(|e| panic!("export {}: {e}", model.display()));
    out
}

fn open(export_dir: &Path) -> OnnxEncoder {
    OnnxEncoder::load(
        GraphLocation::resolve(export_dir).unwrap(),
        &LoadOptions::default(),
        &ProviderSettings::default(),
    )
    .unwrap()
}

/// Texts of a fixture's reference file.
fn reference_texts(dir: &Path) -> Vec<String> {
    let meta = common::read_json(&dir.join("reference.json"));
    meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn rows(m: ndarray::Array2<f32>) -> Vec<Vec<f32>> {
    m.rows().into_iter().map(|r| r.to_vec()).collect()
}

/// Embeds `texts` with the model's default prompt through `model`.
fn embed(model: &dyn TextEmbedder, texts: &[String]) -> Vec<Vec<f32>> {
    let prefix = model
        .setup()
        .prefix(&effir_pipeline::Prompt::Default)
        .unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    rows(model.embed_texts(&refs, &prefix, 2, &mut |_| {}).unwrap())
}

/// ONNX checker and strict shape inference (Python `onnx`) on an export.
fn python_check(export_dir: &Path) {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_client.py"))
        .args(["--export", export_dir.to_str().unwrap(), "--check-only"])
        .output()
        .expect("python3 tests/onnx_client.py");
    assert!(
        out.status.success(),
        "onnx checker on {}: {}",
        export_dir.display(),
        stderr(&out)
    );
}

#[test]
fn every_architecture_exports_a_graph_that_matches_transformers_in_both_profiles() {
    let work = tempfile::tempdir().unwrap();
    for arch in ARCHITECTURES {
        let model = fixture(arch);
        let candle = Embedder::load(&model, &LoadOptions::default()).unwrap();
        let texts = reference_texts(&model);
        let want = embed(&candle, &texts);
        for profile in [Profile::Optimum, Profile::SentenceTransformers] {
            let name = format!("{arch}-{}", profile.name());
            let dir = export_to(&model, work.path(), &name, &options(profile));
            // ONNX Runtime through effir: the same embeddings as candle.
            let onnx = open(&dir);
            assert_eq!(onnx.providers(), &[Provider::Cpu]);
            assert_rows_match(&name, &embed(&onnx, &texts), &want);
            // The interface serving stacks expect.
            let file = GraphFile::read(&dir.join("model.onnx")).unwrap();
            let inputs: Vec<String> = file.inputs().into_iter().map(|i| i.name).collect();
            let mut expected = vec!["input_ids", "attention_mask"];
            if arch == "bert" {
                expected.push("token_type_ids");
            }
            assert_eq!(inputs, expected, "{name}");
            let outputs: Vec<String> = file.outputs().into_iter().map(|o| o.name).collect();
            match profile {
                Profile::Optimum => assert_eq!(outputs, ["last_hidden_state"], "{name}"),
                Profile::SentenceTransformers => {
                    assert_eq!(
                        outputs,
                        ["last_hidden_state", "sentence_embedding"],
                        "{name}"
                    )
                }
            }
            for io in file.inputs() {
                assert_eq!(io.dim_names, ["batch_size", "sequence_length"], "{name}");
            }
            assert!(file.opset().unwrap() >= 17);
            assert_eq!(
                file.metadata("effir.architecture"),
                Some(candle.architecture().model_type())
            );
            for f in ["tokenizer.json", "config.json", "effir_export.json"] {
                assert!(dir.join(f).is_file(), "{name}: {f}");
            }
            // An independent client: onnx checker + onnxruntime vs transformers.
            python_client(&dir, &model, MIN_COSINE);
        }
    }
}

#[test]
fn pruned_models_export_smaller_graphs_that_equal_the_pruned_candle_model() {
    let work = tempfile::tempdir().unwrap();
    let calibration = [
        "The quick brown fox jumps over the lazy dog.",
        "Dense retrieval keeps attention.",
        "hello world",
        "Numbers 12 345 appear here.",
    ];
    for arch in ["bert", "llama", "gemma3", "qwen2"] {
        let pruned = common::prune_fixture(
            arch,
            work.path(),
            &calibration,
            &["--drop-layers", "1", "--mlp-keep", "0.4"],
        );
        let candle = Embedder::load(&pruned, &LoadOptions::default()).unwrap();
        let shape = candle.shape().clone();
        assert!(shape.layers[1].mlp.is_none());

        let full = export_to(
            &fixture(arch),
            work.path(),
            &format!("{arch}-full"),
            &options(Profile::SentenceTransformers),
        );
        let dir = export_to(
            &pruned,
            work.path(),
            &format!("{arch}-pruned-onnx"),
            &options(Profile::SentenceTransformers),
        );
        let texts = reference_texts(&fixture(arch));
        assert_rows_match(arch, &embed(&open(&dir), &texts), &embed(&candle, &texts));
        python_check(&dir);

        // No nodes for the dropped MLP; narrowed matrices for the others.
        let file = GraphFile::read(&dir.join("model.onnx")).unwrap();
        let graph = file.model.graph.as_ref().unwrap();
        let init = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.dims.clone())
        };
        let (dropped, kept) = if arch == "bert" {
            (
                "encoder.layer.1.intermediate.dense.weight_t",
                "encoder.layer.0.intermediate.dense.weight_t",
            )
        } else {
            (
                "layers.1.mlp.gate_proj.weight_t",
                "layers.0.mlp.gate_proj.weight_t",
            )
        };
        assert_eq!(
            init(dropped),
            None,
            "{arch}: dropped MLP still in the graph"
        );
        let width = shape.layers[0].mlp.unwrap().intermediate_size as i64;
        assert_eq!(init(kept).unwrap()[1], width, "{arch}: narrowed width");
        let size = |d: &Path| std::fs::metadata(d.join("model.onnx")).unwrap().len();
        assert!(
            size(&dir) < size(&full),
            "{arch}: pruned graph is not smaller"
        );
        // The pruning record travels with the graph.
        assert!(file.metadata("effir.pruning_plan").is_some());
        assert!(file
            .metadata("effir.shape")
            .unwrap()
            .contains("\"mlp\":null"));
    }
}

#[test]
fn external_data_float16_storage_and_the_hub_layout_load_and_check() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let texts = reference_texts(&model);
    let candle = Embedder::load(&model, &LoadOptions::default()).unwrap();
    let want = embed(&candle, &texts);

    let mut external = options(Profile::SentenceTransformers);
    external.external_data = ExternalData::Always;
    external.layout = Layout::OnnxSubdir;
    let dir = export_to(&model, work.path(), "external", &external);
    assert!(dir.join("onnx/model.onnx").is_file());
    assert!(dir.join("onnx/model.onnx_data").is_file());
    assert_rows_match("external data", &embed(&open(&dir), &texts), &want);
    python_client(&dir, &model, MIN_COSINE);

    let mut half = options(Profile::SentenceTransformers);
    half.emit.storage = WeightStorage::Float16;
    let dir16 = export_to(&model, work.path(), "fp16", &half);
    python_check(&dir16);
    let full = export_to(
        &model,
        work.path(),
        "fp32",
        &options(Profile::SentenceTransformers),
    );
    let size = |d: &Path| std::fs::metadata(d.join("model.onnx")).unwrap().len();
    assert!(
        size(&dir16) * 10 < size(&full) * 6,
        "float16 storage is not ~half the size"
    );
    // float16 weights: close, not identical.
    for (got, want) in embed(&open(&dir16), &texts).iter().zip(&want) {
        let cos = common::cosine(got, want);
        assert!(cos > 0.999, "float16 cosine {cos}");
    }
}

/// A graph with half-precision weights keeps them at that size when ONNX
/// Runtime runs it as stored (`--graph-optimization none`): every weight's
/// `Cast` leads the node list, so ONNX Runtime's default order runs each
/// just before the product that reads it, and embedding tables are gathered
/// before their rows are cast, never cast whole. Unoptimized, the graph
/// computes what the optimized one does.
#[test]
fn half_precision_graphs_cast_each_weight_where_it_is_used() {
    let work = tempfile::tempdir().unwrap();
    for (arch, storage) in [
        ("bert", WeightStorage::Float16),
        ("llama", WeightStorage::BFloat16),
        ("gemma3", WeightStorage::Float16),
    ] {
        let model = fixture(arch);
        let mut half = options(Profile::SentenceTransformers);
        half.emit.storage = storage;
        let dir = export_to(&model, work.path(), arch, &half);
        let file = GraphFile::read(&dir.join("model.onnx")).unwrap();
        let graph = file.model.graph.as_ref().unwrap();
        let initializers: std::collections::HashMap<&str, i32> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t.data_type))
            .collect();
        let half_type = |name: &str| {
            initializers
                .get(name)
                .is_some_and(|&t| t == DataType::Float16 as i32 || t == DataType::Bfloat16 as i32)
        };
        let casts_of_weights = graph
            .node
            .iter()
            .take_while(|n| n.op_type == "Cast" && half_type(&n.input[0]))
            .count();
        assert!(
            casts_of_weights > 0,
            "{arch}: no weight casts lead the graph"
        );
        for (i, node) in graph.node.iter().enumerate().skip(casts_of_weights) {
            assert!(
                !(node.op_type == "Cast" && half_type(&node.input[0])),
                "{arch}: node {i} casts the weight {} after the computation began",
                node.input[0]
            );
        }
        let gathers_of_half_tables = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Gather" && half_type(&n.input[0]))
            .count();
        assert!(
            gathers_of_half_tables >= 1,
            "{arch}: the token table is not gathered in half precision"
        );
        let texts = reference_texts(&model);
        let optimized = embed(&open(&dir), &texts);
        let as_stored = OnnxEncoder::load(
            GraphLocation::resolve(&dir).unwrap(),
            &LoadOptions::default(),
            &ProviderSettings {
                graph_optimization: GraphOptimization::None,
                ..Default::default()
            },
        )
        .unwrap();
        assert_rows_match(
            &format!("{arch}, run as stored"),
            &embed(&as_stored, &texts),
            &optimized,
        );
    }
}

#[test]
fn exported_minilm_matches_sentence_transformers_in_an_independent_client() {
    let work = tempfile::tempdir().unwrap();
    for profile in [Profile::Optimum, Profile::SentenceTransformers] {
        let dir = export_to(
            &minilm_dir(),
            work.path(),
            profile.name(),
            &options(profile),
        );
        python_client(&dir, &fixture("minilm"), MIN_COSINE);
    }
}

#[test]
fn the_tensorrt_lint_passes_effir_graphs_and_names_what_tensorrt_rejects() {
    let work = tempfile::tempdir().unwrap();
    let dir = export_to(
        &fixture("qwen3"),
        work.path(),
        "qwen3",
        &options(Profile::SentenceTransformers),
    );
    let graph = dir.join("model.onnx");
    let out = effir(&["lint-onnx", graph.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Add a node TensorRT's parser does not take, and a contrib op.
    let mut file = GraphFile::read(&graph).unwrap();
    let g = file.model.graph.as_mut().unwrap();
    let mut unique = g.node[0].clone();
    unique.op_type = "Unique".into();
    unique.output = vec!["unique_out".into()];
    unique.name = "unique".into();
    let mut contrib = g.node[0].clone();
    contrib.op_type = "FastGelu".into();
    contrib.domain = "com.microsoft".into();
    contrib.output = vec!["contrib_out".into()];
    contrib.name = "contrib".into();
    g.node.push(unique);
    g.node.push(contrib);
    let bad = work.path().join("bad.onnx");
    std::fs::write(&bad, prost::Message::encode_to_vec(&file.model)).unwrap();
    let out = effir(&["lint-onnx", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Unique (1 node(s)): not supported"), "{text}");
    assert!(text.contains("com.microsoft::FastGelu"), "{text}");
}

#[test]
fn execution_providers_fall_back_or_fail_strictly_when_unavailable() {
    let work = tempfile::tempdir().unwrap();
    let dir = export_to(
        &fixture("bert"),
        work.path(),
        "bert",
        &options(Profile::Optimum),
    );
    let location = GraphLocation::resolve(&dir).unwrap();
    // What the loaded ONNX Runtime library offers decides what must happen:
    // the CPU wheel has neither CUDA nor TensorRT, a GPU build may have both.
    let cuda = Provider::Cuda.is_available().unwrap();
    let tensorrt = Provider::TensorRt.is_available().unwrap();
    assert!(Provider::Cpu.is_available().unwrap());
    let fallback = ProviderSettings {
        order: vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu],
        ..Default::default()
    };
    let encoder = OnnxEncoder::load(location.clone(), &LoadOptions::default(), &fallback).unwrap();
    let registered = encoder.providers();
    assert_eq!(registered.last(), Some(&Provider::Cpu), "{registered:?}");
    for provider in registered {
        assert!(
            provider.is_available().unwrap(),
            "{provider} registered but unavailable"
        );
    }
    if !cuda && !tensorrt {
        assert_eq!(registered, &[Provider::Cpu]);
    }

    let strict = ProviderSettings {
        order: vec![Provider::Cuda, Provider::Cpu],
        strict: true,
        ..Default::default()
    };
    match OnnxEncoder::load(location, &LoadOptions::default(), &strict) {
        Ok(encoder) => {
            assert!(cuda, "strict CUDA loaded without a CUDA library");
            assert_eq!(encoder.providers().first(), Some(&Provider::Cuda));
        }
        Err(err) if !cuda => assert!(
            err.to_string()
                .contains("`cuda` was requested in strict mode"),
            "{err}"
        ),
        // CUDA in the library but not usable here (no device, missing cuDNN).
        Err(err) => assert!(err.to_string().contains("cuda"), "{err}"),
    }

    // The same through the CLI, with an unknown provider name too.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/tiny");
    let gates = work.path().join("gates.yaml");
    std::fs::write(&gates, "parity:\n  min_cosine: 0.99999\n").unwrap();
    let validate = |providers: &str, strict: bool| {
        let reference = fixture("bert");
        let mut args = vec![
            "validate",
            "--quiet",
            "--no-cache",
            "--reference",
            reference.to_str().unwrap(),
            "--candidate",
            dir.to_str().unwrap(),
            "--data",
            tiny.to_str().unwrap(),
            "--gates",
            gates.to_str().unwrap(),
            "--providers",
            providers,
        ];
        if strict {
            args.push("--strict-providers");
        }
        effir(&args)
    };
    let out = validate("cuda,cpu", false);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = validate("cuda", true);
    if !cuda {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("strict mode"), "{}", stderr(&out));
    }
    let out = validate("cpu,tpu", false);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown execution provider `tpu`"),
        "{}",
        stderr(&out)
    );
}

/// Texts of every length the fixtures' batches pad: empty, one word, long.
fn padded_batch_texts(model: &Path) -> Vec<String> {
    let mut texts = reference_texts(model);
    texts.push(String::new());
    texts.push("x".into());
    texts.push("a longer text that makes every other text in its batch padding-heavy ".repeat(4));
    texts
}

fn export_bert(
    work: &Path,
    name: &str,
    precision: MatmulPrecision,
    mask: Option<AttentionMask>,
) -> PathBuf {
    let mut opts = options(Profile::SentenceTransformers);
    opts.target = Target::Any;
    opts.emit.precision = precision;
    opts.emit.attention_mask = mask;
    export_to(&fixture("bert"), work, name, &opts)
}

#[test]
fn bert_graphs_fold_the_padding_mask_into_the_score_product_and_compute_the_same_embeddings() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("bert");
    let layers = common::read_json(&model.join("config.json"))["num_hidden_layers"]
        .as_u64()
        .unwrap() as usize;
    let texts = padded_batch_texts(&model);
    let want = embed(
        &Embedder::load(&model, &LoadOptions::default()).unwrap(),
        &texts,
    );
    for precision in [
        MatmulPrecision::Float32,
        MatmulPrecision::Int8(Int8Kernel::U8s8),
    ] {
        // fp32 and dynamic int8 fold by default; `added` is the other form.
        let folded = export_bert(
            work.path(),
            &format!("{}-default", precision.name()),
            precision,
            None,
        );
        let added = export_bert(
            work.path(),
            &format!("{}-added", precision.name()),
            precision,
            Some(AttentionMask::Added),
        );
        let summary = |dir: &Path| common::read_json(&dir.join("effir_export.json"));
        assert_eq!(summary(&folded)["attention_mask"], "folded");
        assert_eq!(summary(&added)["attention_mask"], "added");
        let ops = |dir: &Path| {
            GraphFile::read(&dir.join("model.onnx"))
                .unwrap()
                .op_counts()
        };
        let (f, a) = (ops(&folded), ops(&added));
        let count = |ops: &std::collections::BTreeMap<String, usize>, op: &str| {
            ops.get(op).copied().unwrap_or(0)
        };
        // One (B, H, T, T) Add fewer per layer, two Concats more.
        assert_eq!(count(&a, "Add") - count(&f, "Add"), layers, "{f:?}\n{a:?}");
        assert_eq!(count(&f, "Concat") - count(&a, "Concat"), 2 * layers);
        // The same embeddings on padded batches, empty and one-token texts
        // included: against each other, and the float graph against candle.
        let got_folded = embed(&open(&folded), &texts);
        let got_added = embed(&open(&added), &texts);
        for (i, (x, y)) in got_folded.iter().zip(&got_added).enumerate() {
            let diff = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-5,
                "{}: text {i} differs by {diff}",
                precision.name()
            );
        }
        if precision == MatmulPrecision::Float32 {
            assert_rows_match("folded fp32", &got_folded, &want);
        }
        python_check(&folded);
    }
}

#[test]
fn onnx_runtime_runs_the_emitted_gelu_as_one_fused_operator() {
    let work = tempfile::tempdir().unwrap();
    // BERT's erf GELU (fp32 and dynamic int8) and Gemma's tanh GELU.
    let bert = export_bert(work.path(), "bert-fp32", MatmulPrecision::Float32, None);
    let bert_int8 = export_bert(
        work.path(),
        "bert-int8",
        MatmulPrecision::Int8(Int8Kernel::U8s8),
        None,
    );
    let mut opts = options(Profile::Optimum);
    opts.target = Target::Any;
    let gemma = export_to(&fixture("gemma3"), work.path(), "gemma3", &opts);
    let erf_fusions: &[&str] = &["com.microsoft::Gelu", "com.microsoft::BiasGelu"];
    let tanh_fusions: &[&str] = &["com.microsoft::FastGelu"];
    for (dir, fused) in [
        (&bert, erf_fusions),
        (&bert_int8, erf_fusions),
        (&gemma, tanh_fusions),
    ] {
        let written = GraphFile::read(&dir.join("model.onnx"))
            .unwrap()
            .op_counts();
        let run = effir_onnx::session::runtime_operators(&dir.join("model.onnx")).unwrap();
        // One fused operator per activation the file writes.
        let activations = written.get("Erf").or(written.get("Tanh")).copied().unwrap();
        let fused_count: usize = fused
            .iter()
            .map(|op| run.get(*op).copied().unwrap_or(0))
            .sum();
        assert_eq!(fused_count, activations, "{}: {run:?}", dir.display());
        for gone in ["Erf", "Tanh", "Pow"] {
            assert!(
                !run.contains_key(gone),
                "{}: {gone} left unfused: {run:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn the_folded_mask_is_refused_where_it_cannot_work_and_nothing_is_written() {
    let work = tempfile::tempdir().unwrap();
    let cases = [
        (
            "bert",
            Target::TensorRt,
            MatmulPrecision::Float32,
            "TensorRT",
        ),
        ("bert", Target::Any, MatmulPrecision::Float16, "float16"),
        (
            "llama",
            Target::Any,
            MatmulPrecision::Float32,
            "depends on the query",
        ),
    ];
    for (arch, target, precision, message) in cases {
        let mut opts = options(Profile::Optimum);
        opts.target = target;
        opts.emit.precision = precision;
        opts.emit.attention_mask = Some(AttentionMask::Folded);
        let out = work.path().join(format!("{arch}-{}", precision.name()));
        let err = export(&fixture(arch), &out, &opts)
            .expect_err(message)
            .to_string();
        assert!(err.contains(message), "{err}");
        assert!(!out.exists(), "{}", out.display());
    }
    // TensorRT's default is the added form.
    let mut opts = options(Profile::Optimum);
    opts.target = Target::TensorRt;
    let dir = export_to(&fixture("bert"), work.path(), "bert-tensorrt", &opts);
    assert_eq!(
        common::read_json(&dir.join("effir_export.json"))["attention_mask"],
        "added"
    );
}
