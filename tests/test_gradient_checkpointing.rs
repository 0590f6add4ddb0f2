//! Gradient checkpointing (`gradient_checkpointing: true` in a finetune
//! config) trades compute for memory and nothing else: a run with it writes
//! the same weights and logs the same losses and gradient norms, bit for
//! bit, as the same run without it. Checked for every architecture family,
//! with trainable embeddings (the gradient must reach the stem), with LoRA,
//! with the label-free objective, and on a pruned model whose layers differ.

mod common;

use std::path::Path;

use common::{fixture, stderr, SAMPLE_TEXTS};

/// Runs `config` twice, without and with checkpointing, and asserts that
/// both runs log the same steps and write the same tensors.
fn assert_checkpointing_changes_nothing(model: &Path, config: &str, label_free: bool) {
    let work = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for checkpointing in [false, true] {
        let dir = work.path().join(format!("run-{checkpointing}"));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml =
            format!("{config}checkpoint_every: 0\ngradient_checkpointing: {checkpointing}\n");
        let (train, yaml) = common::tiny_finetune_inputs(&dir, &SAMPLE_TEXTS, &yaml);
        let out = dir.join("out");
        let o = if label_free {
            let texts = dir.join("texts.txt");
            std::fs::write(&texts, SAMPLE_TEXTS.join("\n")).unwrap();
            common::effir(&[
                "finetune",
                "--quiet",
                "--model",
                model.to_str().unwrap(),
                "--train-texts",
                texts.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--config",
                yaml.to_str().unwrap(),
            ])
        } else {
            common::finetune(model, &train, &out, &yaml, &[])
        };
        assert!(o.status.success(), "{}", stderr(&o));
        outputs.push(out);
    }
    let steps = |out: &Path| -> Vec<(f64, f64)> {
        std::fs::read_to_string(out.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["loss"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (plain, checkpointed) = (steps(&outputs[0]), steps(&outputs[1]));
    assert!(plain.len() >= 2, "{plain:?}");
    assert_eq!(
        plain,
        checkpointed,
        "{}: (loss, grad norm) per step, without checkpointing and with",
        model.display()
    );
    let a = common::load_tensors(&outputs[0].join("model.safetensors"));
    let b = common::load_tensors(&outputs[1].join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{}: {name}: max |diff| {}",
            model.display(),
            common::max_abs_diff(&x, &y)
        );
    }
    // The runs trained: the first step's weights moved.
    let original = common::load_tensors(&model.join("model.safetensors"));
    assert!(
        a.iter()
            .any(|(name, t)| original.get(name).is_some_and(|o| {
                let (t, o): (Vec<f32>, Vec<f32>) = (
                    t.flatten_all().unwrap().to_vec1().unwrap(),
                    o.to_dtype(candle_core::DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
                common::max_abs_diff(&t, &o) > 0.0
            })),
        "nothing trained"
    );
}

/// Full fine-tuning of the layers, contrastive loss with a hard negative.
const FULL: &str = "max_steps: 3\nbatch_size: 4\nlearning_rate: 1.0e-3\n";

#[test]
fn checkpointing_gives_the_same_run_for_every_architecture() {
    for arch in ["bert", "llama", "qwen2", "qwen3", "mistral", "gemma3"] {
        assert_checkpointing_changes_nothing(&fixture(arch), FULL, false);
    }
}

/// With the token embeddings trainable, the gradient also goes through the
/// embedding step (BERT's position and type tables and its norm too), and
/// the rows of the table that the queries' and the documents' passes share
/// add up in the same order as in the ordinary backward pass.
#[test]
fn checkpointing_trains_the_embeddings_as_well() {
    let config = format!("{FULL}freeze_embeddings: false\n");
    for arch in ["bert", "gemma3"] {
        assert_checkpointing_changes_nothing(&fixture(arch), &config, false);
    }
}

#[test]
fn checkpointing_gives_the_same_lora_run() {
    let config = "max_steps: 3\nbatch_size: 4\nlearning_rate: 5.0e-3\n\
                  lora:\n  rank: 4\n  alpha: 8\n  targets: [q_proj, v_proj, up_proj, down_proj]\n";
    assert_checkpointing_changes_nothing(&fixture("llama"), config, false);
}

/// Label-free distillation of a pruned Llama (one MLP dropped, the others
/// narrowed to different widths) from the unpruned model, two micro-batches
/// a step.
#[test]
fn checkpointing_gives_the_same_distillation_of_a_pruned_model() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("llama");
    let pruned = common::prune_fixture(
        "llama",
        work.path(),
        &SAMPLE_TEXTS,
        &["--drop-mlp", "1", "--mlp-keep", "0.4"],
    );
    let config = format!(
        "objective: distill\nmax_steps: 2\nbatch_size: 3\ngradient_accumulation: 2\n\
         learning_rate: 1.0e-3\nembedding_distillation:\n  teacher: {}\n",
        teacher.display()
    );
    assert_checkpointing_changes_nothing(&pruned, &config, true);
}

/// A run killed without checkpointing resumes with it switched on (what a
/// user does after running out of memory) and ends where the uninterrupted
/// run ends.
#[test]
fn a_run_resumes_with_checkpointing_switched_on() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("qwen3");
    let base = "max_steps: 4\nbatch_size: 4\nlearning_rate: 1.0e-3\ncheckpoint_every: 2\n";
    let (train, plain) = common::tiny_finetune_inputs(work.path(), &SAMPLE_TEXTS, base);
    let switched = work.path().join("switched.yaml");
    std::fs::write(&switched, format!("{base}gradient_checkpointing: true\n")).unwrap();
    let straight = work.path().join("straight");
    let o = common::finetune(&model, &train, &straight, &plain, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = work.path().join("resumed");
    let o = common::finetune(
        &model,
        &train,
        &resumed,
        &plain,
        &["--abort-after-step", "2"],
    );
    assert!(!o.status.success() && !resumed.exists());
    let o = common::finetune(&model, &train, &resumed, &switched, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed at 2"));
    let a = common::load_tensors(&straight.join("model.safetensors"));
    let b = common::load_tensors(&resumed.join("model.safetensors"));
    for (name, x) in &a {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs after resuming with checkpointing"
        );
    }
}
