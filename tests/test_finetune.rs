//! `effir finetune`: gradients are right, a killed run resumes bit for bit,
//! LoRA merges into a plain model directory, and bad training input fails
//! before any training.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{effir, finetune, stderr};

use candle_core::{Tensor, Var};
use common::fixture;
use effir_pipeline::finetune::data::TrainingExample;
use effir_pipeline::finetune::trainer::loss_of_examples;
use effir_pipeline::finetune::FinetuneConfig;
use effir_pipeline::{Embedder, LoadOptions};

fn examples() -> Vec<TrainingExample> {
    let e = |q: &str, p: &str, n: &str| TrainingExample {
        query: q.into(),
        positives: vec![p.into()],
        negatives: vec![n.into()],
    };
    vec![
        e(
            "quick brown fox",
            "The quick brown fox jumps over the lazy dog.",
            "Numbers 12 345 appear here.",
        ),
        e(
            "pruned mlp layers",
            "Dense retrieval with pruned MLP layers keeps attention intact.",
            "hello world",
        ),
        e(
            "greeting",
            "hello world, how are you",
            "abcdefghijklmnopqrstuvwxyz",
        ),
    ]
}

/// Training data as the generic JSONL format.
fn write_jsonl(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let mut text = String::new();
    for (i, e) in examples().iter().cycle().take(12).enumerate() {
        text += &serde_json::json!({
            "query": format!("{} {i}", e.query),
            "pos": e.positives,
            "neg": e.negatives,
        })
        .to_string();
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn loss_gradients_match_finite_differences() {
    let config = FinetuneConfig {
        temperature: 0.05,
        hard_negatives: 1,
        ..Default::default()
    };
    for (arch, weight) in [
        ("bert", "encoder.layer.0.intermediate.dense.weight"),
        ("gemma3", "layers.0.mlp.up_proj.weight"),
        ("gemma3", "layers.1.post_feedforward_layernorm.weight"),
    ] {
        let dir = fixture(arch);
        let base: HashMap<String, Tensor> =
            effir_pipeline::io::weights::load_all_tensors(&dir).unwrap();
        let name = base
            .keys()
            .find(|k| k.ends_with(weight))
            .unwrap_or_else(|| panic!("{arch}: no {weight}"))
            .clone();
        let var = Var::from_tensor(&base[&name]).unwrap();
        let mut tensors = base.clone();
        tensors.insert(name.clone(), var.as_tensor().clone());
        let loss = loss_of_examples(&dir, tensors, &examples(), &config).unwrap();
        let grad = common::gradient(&loss, &var);
        // Directional derivatives: along the gradient itself (where the
        // loss changes most, well above float32 noise) and along a fixed
        // pseudo-random direction.
        let norm = common::norm(&grad);
        assert!(norm > 0.0, "{arch} {name}: zero gradient");
        let mut state = 12345u64;
        let random: Vec<f64> = (0..grad.len())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect();
        let random_norm = random.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (what, direction) in [
            (
                "gradient",
                grad.iter().map(|g| *g as f64 / norm).collect::<Vec<f64>>(),
            ),
            ("random", random.iter().map(|x| x / random_norm).collect()),
        ] {
            // A step that moves the loss by about 0.01: above float32 noise, small
            // enough for the linear term to dominate.
            let eps = (1e-2 / norm).clamp(1e-4, 5e-2);
            let loss_at = |step: f64| -> f64 {
                let mut t = base.clone();
                t.insert(
                    name.clone(),
                    common::moved_along(&base[&name], &direction, step),
                );
                loss_of_examples(&dir, t, &examples(), &config)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            let analytic: f64 = grad
                .iter()
                .zip(&direction)
                .map(|(g, u)| *g as f64 * u)
                .sum();
            // Relative to the gradient's norm (the largest directional derivative).
            let err = (numeric - analytic).abs() / norm;
            assert!(
                err < 0.02,
                "{arch} {name} along the {what}: analytic {analytic:.6e}, numeric {numeric:.6e} (|grad| {norm:.3e})"
            );
        }
    }
}

const RESUME_CONFIG: &str = "max_steps: 6\nbatch_size: 3\nlearning_rate: 1.0e-3\nwarmup_steps: 2\nhard_negatives: 1\ncheckpoint_every: 3\nseed: 7\n";

#[test]
fn a_killed_run_resumes_to_the_same_weights_bit_for_bit() {
    let work = tempfile::tempdir().unwrap();
    let train = write_jsonl(work.path());
    let config = write_config(work.path(), "ft.yaml", RESUME_CONFIG);
    let model = fixture("bert");

    let straight = work.path().join("straight");
    let out = finetune(&model, &train, &straight, &config, &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Crash right after the step-3 checkpoint, then resume.
    let resumed = work.path().join("resumed");
    let out = finetune(
        &model,
        &train,
        &resumed,
        &config,
        &["--abort-after-step", "3"],
    );
    assert!(!out.status.success(), "the run was meant to abort");
    assert!(!resumed.exists(), "an aborted run left an output directory");
    let checkpoints = work.path().join("resumed.checkpoints");
    assert!(checkpoints.join("step-0000003/state.json").is_file());
    // Without --resume the old checkpoints are not silently reused.
    let out = finetune(&model, &train, &resumed, &config, &[]);
    assert!(
        !out.status.success() && stderr(&out).contains("--resume"),
        "{}",
        stderr(&out)
    );
    let out = finetune(&model, &train, &resumed, &config, &["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed at 3"));

    let a = common::load_tensors(&straight.join("model.safetensors"));
    let b = common::load_tensors(&resumed.join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    let original = common::load_tensors(&model.join("model.safetensors"));
    let mut changed = 0;
    for (name, ta) in &a {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resume"
        );
        let vo: Vec<f32> = original[name].flatten_all().unwrap().to_vec1().unwrap();
        changed += (va != vo) as usize;
    }
    assert!(changed > 10, "training changed only {changed} tensors");
    // The output is a normal model directory with its training record.
    Embedder::load(&resumed, &LoadOptions::default()).unwrap();
    let record = common::read_json(&resumed.join("effir_finetune.json"));
    assert_eq!(record["outcome"]["steps"], 6);
    assert!(resumed.join("train_log.jsonl").is_file());
}

#[test]
fn lora_merges_into_a_plain_model_and_pruned_widths_survive() {
    let work = tempfile::tempdir().unwrap();
    let train = write_jsonl(work.path());
    // A pruned model: MLP 1 dropped, the others narrowed.
    let pruned = common::prune_fixture(
        "llama",
        work.path(),
        &[
            "hello world",
            "The quick brown fox jumps.",
            "Numbers 12 345.",
        ],
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    );
    let config = write_config(
        work.path(),
        "lora.yaml",
        "max_steps: 3\nbatch_size: 4\nlearning_rate: 5.0e-3\ncheckpoint_every: 0\nlora:\n  rank: 4\n  alpha: 8\n  targets: [q_proj, v_proj, up_proj, down_proj]\n",
    );
    let out_dir = work.path().join("lora-out");
    let o = finetune(&pruned, &train, &out_dir, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tensors = common::load_tensors(&out_dir.join("model.safetensors"));
    assert!(
        tensors.keys().all(|k| !k.contains("lora")),
        "adapters left in the output"
    );
    let before = common::load_tensors(&pruned.join("model.safetensors"));
    let key = tensors
        .keys()
        .find(|k| k.ends_with("layers.0.self_attn.q_proj.weight"))
        .unwrap();
    assert_ne!(
        tensors[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        before[key].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "LoRA did not change q_proj"
    );
    let untouched = tensors
        .keys()
        .find(|k| k.ends_with("layers.0.self_attn.k_proj.weight"))
        .unwrap();
    assert_eq!(
        tensors[untouched]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        before[untouched]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        "a projection outside the targets changed"
    );
    let model = Embedder::load(&out_dir, &LoadOptions::default()).unwrap();
    assert!(model.shape().layers[1].mlp.is_none(), "pruned widths lost");
    // The fine-tuned pruned model exports like any other.
    let onnx = work.path().join("onnx");
    let o = effir(&[
        "export",
        "--model",
        out_dir.to_str().unwrap(),
        "--out",
        onnx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // ...and validates, its report saying how it was made (read back from
    // effir_prune.json and effir_finetune.json).
    let gates = write_config(
        work.path(),
        "gates.yaml",
        "parity:\n  min_cosine: 0.99999\n",
    );
    let report_dir = work.path().join("validation");
    let tiny = fixture("eval/tiny");
    let reference = fixture("llama");
    let o = effir(&[
        "validate",
        "--quiet",
        "--no-cache",
        "--reference",
        reference.to_str().unwrap(),
        "--candidate",
        onnx.to_str().unwrap(),
        "--data",
        tiny.to_str().unwrap(),
        "--gates",
        gates.to_str().unwrap(),
        "--out",
        report_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = common::read_json(&report_dir.join("validation.json"));
    let provenance = &report["provenance"];
    assert_eq!(
        provenance["pruning"]["dropped_mlps"],
        serde_json::json!([1])
    );
    assert!(provenance["pruning"]["mlp_keep"].as_f64().unwrap() < 0.6);
    assert_eq!(
        provenance["tuned_on"],
        serde_json::json!([train.to_str().unwrap()])
    );
    let md = std::fs::read_to_string(report_dir.join("validation.md")).unwrap();
    assert!(md.contains("- pruned: MLPs [1] dropped"), "{md}");
    assert!(md.contains("- fine-tuned on:"), "{md}");
}

#[test]
fn development_evaluation_keeps_the_best_step() {
    let work = tempfile::tempdir().unwrap();
    let train = write_jsonl(work.path());
    let tiny = fixture("eval/tiny");
    // Every step is checkpointed (and kept), so each step's weights can be
    // compared with the output's.
    let config = write_config(
        work.path(),
        "dev.yaml",
        &format!(
            "max_steps: 4\nbatch_size: 4\nlearning_rate: 5.0e-2\ncheckpoint_every: 1\nkeep_checkpoints: 10\ndev:\n  data: {}\n  split: test\n  every: 1\n",
            tiny.display()
        ),
    );
    let out_dir = work.path().join("out");
    let o = finetune(&fixture("bert"), &train, &out_dir, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The best step is the first with the highest development score.
    let log = std::fs::read_to_string(out_dir.join("train_log.jsonl")).unwrap();
    let scores: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["dev"]
                .as_f64()
                .expect("dev score")
        })
        .collect();
    assert_eq!(scores.len(), 4);
    let best_score = scores.iter().copied().fold(f64::MIN, f64::max);
    let best_step = 1 + scores.iter().position(|s| *s == best_score).unwrap();
    let record = common::read_json(&out_dir.join("effir_finetune.json"));
    assert_eq!(
        record["outcome"]["best_dev"],
        serde_json::json!([best_score, best_step])
    );
    assert_ne!(
        best_step, 4,
        "the last step must not be the best, or this test cannot tell the best step's weights from the last: scores {scores:?}"
    );

    // The output holds the best step's weights, not the last step's.
    let output = common::load_tensors(&out_dir.join("model.safetensors"));
    let mut checkpoints = out_dir.into_os_string();
    checkpoints.push(".checkpoints");
    let step_weights = |step: usize| {
        common::load_tensors(
            &Path::new(&checkpoints)
                .join(format!("step-{step:07}"))
                .join("trainable.safetensors"),
        )
    };
    let same = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for step in 1..=4 {
        let trained = step_weights(step);
        assert!(!trained.is_empty());
        let equal = trained.iter().all(|(name, t)| same(t, &output[name]));
        assert_eq!(
            equal,
            step == best_step,
            "step {step}: output weights {} that step's (best step {best_step}, scores {scores:?})",
            if equal { "equal" } else { "differ from" }
        );
    }
}

#[test]
fn bad_training_input_fails_before_training() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), "ok.yaml", "max_steps: 1\nbatch_size: 2\n");
    let model = fixture("bert");
    let check = |train: &Path, config: &Path, extra: &[&str], expect: &str| {
        let out_dir = work.path().join("never");
        let o = finetune(&model, train, &out_dir, config, extra);
        assert!(!o.status.success(), "expected failure: {expect}");
        let err = stderr(&o);
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
        assert!(!out_dir.exists());
    };
    // A query with no positive.
    let no_pos = work.path().join("nopos.jsonl");
    std::fs::write(
        &no_pos,
        "{\"query\": \"q\", \"pos\": [\"d\"]}\n{\"query\": \"lonely\", \"pos\": []}\n",
    )
    .unwrap();
    check(&no_pos, &config, &[], "nopos.jsonl");
    check(&no_pos, &config, &[], "has no positive document");
    // Ids missing from the corpus (BEIR hard negatives).
    let beir = work.path().join("beir");
    std::fs::create_dir_all(beir.join("qrels")).unwrap();
    std::fs::write(
        beir.join("corpus.jsonl"),
        "{\"_id\": \"d1\", \"title\": \"\", \"text\": \"doc one\"}\n",
    )
    .unwrap();
    std::fs::write(
        beir.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"query one\"}\n",
    )
    .unwrap();
    std::fs::write(
        beir.join("qrels/train.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\n",
    )
    .unwrap();
    let negs = work.path().join("negs.jsonl");
    std::fs::write(
        &negs,
        "{\"query_id\": \"q1\", \"pos_ids\": [\"d1\"], \"neg_ids\": [\"d404\"]}\n",
    )
    .unwrap();
    check(
        &beir,
        &config,
        &["--hard-negatives", negs.to_str().unwrap()],
        "document `d404` is not in the corpus",
    );
    // Configs that cannot train.
    let train = write_jsonl(work.path());
    for (yaml, expect) in [
        ("learning_rate: 0\n", "learning_rate must be > 0"),
        ("learning_rate: -1.0e-5\n", "learning_rate must be > 0"),
        ("batch_size: 0\n", "batch_size must be at least 1"),
        ("batch_sise: 4\n", "batch_sise"),
    ] {
        let bad = write_config(work.path(), "bad.yaml", yaml);
        check(&train, &bad, &[], expect);
    }
    // A checkpoint from a different model shape.
    let small = write_config(
        work.path(),
        "small.yaml",
        "max_steps: 2\nbatch_size: 2\ncheckpoint_every: 1\n",
    );
    let first = work.path().join("first");
    let ckpt = work.path().join("ckpt");
    let o = finetune(
        &model,
        &train,
        &first,
        &small,
        &["--checkpoints", ckpt.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        &["hello world", "The quick brown fox jumps."],
        &["--mlp-keep", "0.5"],
    );
    let second = work.path().join("second");
    let o = finetune(
        &pruned,
        &train,
        &second,
        &small,
        &["--checkpoints", ckpt.to_str().unwrap(), "--resume"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("different model shape"),
        "{}",
        stderr(&o)
    );
    assert!(!second.exists());
}

/// Score distillation compares scores, not embeddings: a teacher of another
/// architecture and tokenizer (BERT teaching a Llama decoder, as
/// all-MiniLM-L6-v2 teaches SmolLM2) trains, reading each text as it
/// formats text itself. A teacher that writes documents another way is
/// refused before training, with nothing written.
#[test]
fn a_teacher_with_another_tokenizer_teaches_scores() {
    let work = tempfile::tempdir().unwrap();
    let train = write_jsonl(work.path());
    let config = write_config(
        work.path(),
        "cross.yaml",
        &format!(
            "max_steps: 2\nbatch_size: 4\nhard_negatives: 1\nfreeze_embeddings: true\n\
             distillation:\n  teacher: {}\n  weight: 1.0\n",
            fixture("bert").display()
        ),
    );
    // The student asks for an instruction before each query; the teacher
    // reads the bare query.
    let student = common::copy_model(&fixture("llama"));
    std::fs::write(
        student.path().join("config_sentence_transformers.json"),
        r#"{"prompts": {"query": "Instruct: find the answer\nQuery: ", "document": ""}}"#,
    )
    .unwrap();
    let out = work.path().join("llama-taught-by-bert");
    let run = finetune(student.path(), &train, &out, &config, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    for line in log.lines() {
        let step: serde_json::Value = serde_json::from_str(line).unwrap();
        let kl = step["distillation"].as_f64().expect("a distillation term");
        assert!(kl.is_finite() && kl > 0.0, "step {}: KL {kl}", step["step"]);
    }

    // EmbeddingGemma-style document prompts against BERT's plain documents.
    let refused = work.path().join("gemma3-taught-by-bert");
    let run = finetune(&fixture("gemma3"), &train, &refused, &config, &[]);
    assert!(
        !run.status.success(),
        "a teacher writing documents differently was accepted"
    );
    assert!(
        stderr(&run).contains("writes documents as"),
        "{}",
        stderr(&run)
    );
    assert!(!refused.exists());
}
