//! Label-free recovery (`effir finetune` with `objective: distill`): the
//! student learns the teacher's embeddings of unlabeled text. A model
//! distilled from itself has nothing to learn, the loss's gradient is
//! right, a pruned model moves toward its teacher on texts it never saw
//! (through its embeddings, or token by token through its last hidden
//! states), query text keeps the student's prompt while a teacher of
//! another tokenizer reads it with its own, `--seed` overrides the config's,
//! a killed run resumes bit for bit (killed while its teacher embeds, too,
//! after the teacher's saved parts), a combined run can replay unlabeled
//! texts beside its labeled batches (`text_batch_size`), and bad input
//! fails before training with nothing written.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor, Var};
use common::{effir, fixture, stderr};
use effir_pipeline::finetune::trainer::distillation_loss_of_texts;
use effir_pipeline::finetune::{EmbeddingDistillationSettings, FinetuneConfig, Objective};
use effir_pipeline::model::synthetic::{write_synthetic_model, SyntheticShape};
use effir_pipeline::{Embedder, LoadOptions};

/// Unlabeled training text: no queries, no judgments.
const TRAIN_TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "hello world, how are you",
    "Numbers 12 345 appear here.",
    "Attention heads mix information across positions.",
    "abcdefghijklmnopqrstuvwxyz",
    "A retriever maps queries and documents to vectors.",
    "Pruning removes neurons that contribute little.",
    "The cat sat on the mat.",
    "Gradient descent follows the slope downhill.",
    "Vectors close in angle have similar meaning.",
    "Compression trades quality for speed.",
];

/// Unlabeled query text (`--train-queries`).
const TRAIN_QUERIES: &[&str] = &[
    "which animal jumps over the dog",
    "what do pruned layers keep",
    "how are vectors compared",
    "where did the cat sit",
    "what does compression trade",
    "why does gradient descent go downhill",
];

/// Texts the distillation never sees.
const HELD_OUT: &[&str] = &[
    "A dog runs across the field.",
    "Retrieval quality is measured by nDCG.",
    "Weights and biases of a linear layer.",
    "how are you today, world",
    "Seventeen apples in a basket.",
    "The fox hides from the hunter.",
];

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn train_texts(dir: &Path) -> PathBuf {
    write(dir, "texts.txt", &TRAIN_TEXTS.join("\n"))
}

fn distill_config(dir: &Path, teacher: &Path, extra: &str) -> PathBuf {
    write(
        dir,
        "distill.yaml",
        &format!(
            "objective: distill\nbatch_size: 4\nseed: 3\n{extra}\
             embedding_distillation:\n  teacher: {}\n  loss: cosine\n  weight: 1.0\n  \
             similarity_weight: 1.0\n  similarity_temperature: 0.05\n",
            teacher.display()
        ),
    )
}

fn distill(model: &Path, texts: &[&Path], out: &Path, config: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "finetune".to_string(),
        "--quiet".into(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    for t in texts {
        args.push("--train-texts".into());
        args.push(t.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    effir(&refs)
}

fn as_strs(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

fn step_log(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn embed(model: &Path, texts: &[&str]) -> Vec<Vec<f32>> {
    let e = Embedder::load(model, &LoadOptions::default()).unwrap();
    let m = e.embed(texts, "", 8, &mut |_| {}).unwrap();
    m.outer_iter().map(|r| r.to_vec()).collect()
}

/// Mean `1 − cos` between the rows of `a` and `b`.
fn mean_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| 1.0 - common::cosine(x, y))
        .sum::<f64>()
        / a.len() as f64
}

/// `distilled` is closer than `start` to the teacher's embeddings of the
/// texts no run trains on (mean `1 − cos`).
fn assert_closer_on_held_out(teacher: &Path, start: &Path, distilled: &Path) {
    let want = embed(teacher, HELD_OUT);
    let before = mean_distance(&embed(start, HELD_OUT), &want);
    let after = mean_distance(&embed(distilled, HELD_OUT), &want);
    assert!(
        after < before,
        "held-out 1 - cos to the teacher: {before:.5} before, {after:.5} after"
    );
}

#[test]
fn a_model_distilled_from_itself_starts_at_zero_loss_and_stays_there() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("bert");
    let texts = train_texts(work.path());
    // No weight decay, and a small rate: AdamW scales even float-noise
    // gradients up to about the learning rate per step.
    let config = distill_config(
        work.path(),
        &model,
        "max_steps: 3\nlearning_rate: 1.0e-6\nweight_decay: 0.0\n",
    );
    let out = work.path().join("self");
    let o = distill(&model, &[&texts], &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = step_log(&out);
    assert_eq!(log.len(), 3);
    for step in &log {
        assert!(
            step["info_nce"].is_null(),
            "label-free steps have no InfoNCE"
        );
        for (term, bound) in [
            ("embedding_distance", 1e-5),
            ("similarity_kl", 1e-5),
            ("loss", 1e-5),
            // At the minimum the gradient vanishes (up to float noise).
            ("grad_norm", 1e-3),
        ] {
            let v = step[term]
                .as_f64()
                .unwrap_or_else(|| panic!("{term}: {step}"));
            assert!(v.abs() < bound, "step {}: {term} {v}", step["step"]);
        }
    }
    let before = embed(&model, HELD_OUT);
    let after = embed(&out, HELD_OUT);
    assert!(mean_distance(&before, &after) < 1e-5);
    let record = common::read_json(&out.join("effir_finetune.json"));
    assert_eq!(record["config"]["objective"], "distill");
    assert!(record["train"].is_null());
    // Recorded relative to the fine-tuned directory.
    assert_eq!(record["train_texts"], serde_json::json!(["../texts.txt"]));
}

#[test]
fn distillation_gradients_match_finite_differences() {
    let dir = fixture("bert");
    let teacher_texts = &TRAIN_TEXTS[..5];
    let teacher = {
        let rows = embed(&dir, teacher_texts);
        let d = rows[0].len();
        Tensor::from_vec(rows.concat(), (rows.len(), d), &Device::Cpu).unwrap()
    };
    let base: HashMap<String, Tensor> =
        effir_pipeline::io::weights::load_all_tensors(&dir).unwrap();
    let name = base
        .keys()
        .find(|k| k.ends_with("encoder.layer.0.intermediate.dense.weight"))
        .unwrap()
        .clone();
    // Start away from the teacher, where the loss has a gradient.
    let start = (&base[&name] * 1.5).unwrap();
    // The teacher model, for the token term (the unmodified fixture).
    let teacher_model = Embedder::load(&dir, &LoadOptions::default()).unwrap();
    for (loss, token_weight) in [("cosine", 0.0), ("mse", 0.0), ("cosine", 2.0)] {
        let config = FinetuneConfig {
            objective: Objective::Distill,
            embedding_distillation: Some(EmbeddingDistillationSettings {
                teacher: dir.clone(),
                loss: serde_yaml::from_str(loss).unwrap(),
                weight: 1.0,
                similarity_weight: 0.5,
                similarity_temperature: 0.1,
                contrastive_weight: 1.0,
                token_weight,
                text_batch_size: 0,
            }),
            ..Default::default()
        };
        let loss = format!("{loss}, token weight {token_weight}");
        let loss_with = |weight: Tensor| -> Tensor {
            let mut t = base.clone();
            t.insert(name.clone(), weight);
            distillation_loss_of_texts(
                &dir,
                t,
                teacher_texts,
                &teacher,
                Some(&teacher_model),
                &config,
            )
            .unwrap()
        };
        let var = Var::from_tensor(&start).unwrap();
        let grad = common::gradient(&loss_with(var.as_tensor().clone()), &var);
        let norm = common::norm(&grad);
        assert!(norm > 0.0, "{loss}: zero gradient");
        // The derivative along the gradient's direction, numerically.
        let direction: Vec<f64> = grad.iter().map(|g| *g as f64 / norm).collect();
        let eps = (1e-2 / norm).clamp(1e-4, 5e-2);
        let at = |step: f64| -> f64 {
            loss_with(common::moved_along(&start, &direction, step))
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        // Along the unit gradient the analytic derivative is the norm itself.
        let err = (numeric - norm).abs() / norm;
        assert!(
            err < 0.02,
            "{loss}: analytic {norm:.6e}, numeric {numeric:.6e}"
        );
    }
}

#[test]
fn a_pruned_model_moves_toward_its_teacher_on_texts_it_never_saw() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        TRAIN_TEXTS,
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    );
    let texts = train_texts(work.path());
    let config = distill_config(
        work.path(),
        &teacher,
        "epochs: 6\nlearning_rate: 2.0e-3\nwarmup_steps: 2\n",
    );
    let out = work.path().join("distilled");
    let o = distill(&pruned, &[&texts], &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_closer_on_held_out(&teacher, &pruned, &out);
    // The pruned shape is kept.
    let widths = |dir: &Path| -> Vec<usize> {
        let mut w: Vec<(String, usize)> = common::load_tensors(&dir.join("model.safetensors"))
            .into_iter()
            .filter(|(k, _)| k.ends_with("intermediate.dense.weight"))
            .map(|(k, t)| (k, t.dim(0).unwrap()))
            .collect();
        w.sort();
        w.into_iter().map(|(_, d)| d).collect()
    };
    assert_eq!(widths(&out), widths(&pruned));
}

/// The same for the Gemma3 fixture (pre-norm, gated MLP, GELU-tanh: the
/// architecture of EmbeddingGemma), at a learning rate its small weights
/// allow: at the BERT fixture's 2e-3 it moves away from the teacher (held
/// out 1 − cos 0.063 → 0.194), as EmbeddingGemma diverged at rates that
/// suit MiniLM (RESULTS.md).
#[test]
fn a_pruned_gemma3_moves_toward_its_teacher_on_texts_it_never_saw() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("gemma3");
    let pruned = common::prune_fixture("gemma3", work.path(), TRAIN_TEXTS, &["--mlp-keep", "0.5"]);
    let texts = train_texts(work.path());
    let config = distill_config(
        work.path(),
        &teacher,
        "epochs: 6\nlearning_rate: 2.0e-4\nwarmup_steps: 2\n",
    );
    let out = work.path().join("distilled");
    let o = distill(&pruned, &[&texts], &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_closer_on_held_out(&teacher, &pruned, &out);
}

/// `trained: mlp` repairs only what pruning narrowed: after distillation
/// every attention, embedding and non-MLP norm weight is bit-identical to
/// the pruned start, every kept MLP has moved, and the model is still
/// closer to its teacher on texts it never saw. For the BERT fixture
/// (post-norm, `intermediate`/`output` names) and the Gemma3 one (gated
/// MLP, four norms a layer).
#[test]
fn trained_mlp_moves_only_the_mlp_weights_toward_the_teacher() {
    for (arch, rate, mlp_names) in [
        ("bert", "2.0e-3", &["intermediate.", "output."][..]),
        ("gemma3", "2.0e-4", &["mlp.", "feedforward_layernorm"][..]),
    ] {
        let work = tempfile::tempdir().unwrap();
        let teacher = fixture(arch);
        let pruned = common::prune_fixture(arch, work.path(), TRAIN_TEXTS, &["--mlp-keep", "0.5"]);
        let texts = train_texts(work.path());
        let config = distill_config(
            work.path(),
            &teacher,
            &format!("epochs: 6\nlearning_rate: {rate}\nwarmup_steps: 2\ntrained: mlp\n"),
        );
        let out = work.path().join("distilled");
        let o = distill(&pruned, &[&texts], &out, &config, &[]);
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        assert_closer_on_held_out(&teacher, &pruned, &out);
        let before = common::load_tensors(&pruned.join("model.safetensors"));
        let after = common::load_tensors(&out.join("model.safetensors"));
        let (mut moved, mut kept) = (0, 0);
        for (name, start) in &before {
            let same = start
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                == after[name]
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
            // BERT's attention block also has an `output.` module
            // (`attention.output.dense`): it is attention's.
            let mlp = name.contains("layer")
                && !name.contains("attention")
                && mlp_names.iter().any(|m| name.contains(m));
            if mlp {
                moved += usize::from(!same);
            } else {
                assert!(same, "{arch}: {name} is not an MLP weight but changed");
                kept += 1;
            }
        }
        assert!(kept > 0, "{arch}: no frozen weight was checked");
        let mlp_weights = before
            .keys()
            .filter(|n| {
                n.contains("layer")
                    && !n.contains("attention")
                    && mlp_names.iter().any(|m| n.contains(m))
            })
            .count();
        assert_eq!(moved, mlp_weights, "{arch}: every MLP weight should move");
    }
}

/// `trained: mlp` beside LoRA (which chooses its own weights) or beside
/// trainable embeddings is refused, naming the contradiction, with nothing
/// written.
#[test]
fn trained_mlp_beside_lora_or_trainable_embeddings_is_refused() {
    for (extra, message) in [
        (
            "trained: mlp\nlora:\n  rank: 4\n  alpha: 8\n  targets: [query, value]\n",
            "trained: mlp is for full fine-tuning",
        ),
        (
            "trained: mlp\nfreeze_embeddings: false\n",
            "freeze_embeddings: false contradicts it",
        ),
    ] {
        let work = tempfile::tempdir().unwrap();
        let teacher = fixture("bert");
        let texts = train_texts(work.path());
        let config = distill_config(work.path(), &teacher, extra);
        let out = work.path().join("distilled");
        let o = distill(&teacher, &[&texts], &out, &config, &[]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(message), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

/// The teacher reads each text only as far as the student does
/// (`max_length`): a model distilled from itself at 4 tokens, on texts
/// longer than that, starts at zero distance. A teacher embedding whole
/// texts would set targets the truncated student cannot reach.
#[test]
fn the_teacher_truncates_texts_at_the_runs_max_length() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("bert");
    let texts = train_texts(work.path());
    let config = distill_config(
        work.path(),
        &model,
        "max_steps: 1\nmax_length: 4\ncheckpoint_every: 0\n",
    );
    let out = work.path().join("out");
    let o = distill(&model, &[&texts], &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = &step_log(&out)[0];
    let distance = first["embedding_distance"].as_f64().unwrap();
    assert!(distance.abs() < 1e-6, "{first}");
}

/// `--seed` overrides the config's seed (the data order, so which texts
/// share a batch): the run records it, and its first batch is another one.
#[test]
fn the_seed_flag_overrides_the_configs_seed() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        TRAIN_TEXTS,
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    );
    let texts = train_texts(work.path());
    // distill_config's seed is 3.
    let config = distill_config(work.path(), &teacher, "max_steps: 2\ncheckpoint_every: 0\n");
    let run = |name: &str, extra: &[&str]| {
        let out = work.path().join(name);
        let o = distill(&pruned, &[&texts], &out, &config, extra);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        out
    };
    let (by_config, by_flag) = (run("seed-3", &[]), run("seed-5", &["--seed", "5"]));
    let seed =
        |dir: &Path| common::read_json(&dir.join("effir_finetune.json"))["config"]["seed"].clone();
    assert_eq!(seed(&by_config), 3);
    assert_eq!(seed(&by_flag), 5);
    let first_loss = |dir: &Path| step_log(dir)[0]["loss"].as_f64().unwrap();
    assert_ne!(first_loss(&by_config), first_loss(&by_flag));
}

/// The token term alone (`token_weight`, the other terms off): nothing to
/// learn from the teacher itself, and a pruned model pulled toward the
/// teacher's hidden states ends closer to its embeddings on unseen texts.
#[test]
fn the_token_term_is_zero_for_the_teacher_itself_and_pulls_a_pruned_model_closer() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let texts = train_texts(work.path());
    let config = |name: &str, extra: &str| {
        write(
            work.path(),
            name,
            &format!(
                "objective: distill\nbatch_size: 4\nseed: 3\n{extra}\
                 embedding_distillation:\n  teacher: {}\n  weight: 0.0\n  \
                 similarity_weight: 0.0\n  token_weight: 1.0\n",
                teacher.display()
            ),
        )
    };
    let out = work.path().join("self");
    let self_config = config(
        "self.yaml",
        "max_steps: 2\nlearning_rate: 1.0e-6\nweight_decay: 0.0\n",
    );
    let o = distill(&teacher, &[&texts], &out, &self_config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for step in step_log(&out) {
        let d = step["token_distance"].as_f64().expect("token_distance");
        assert!(d.abs() < 1e-5, "step {}: token distance {d}", step["step"]);
        assert!(step["loss"].as_f64().unwrap().abs() < 1e-5, "{step}");
        assert!(step["embedding_distance"].is_null(), "{step}");
    }
    let record = common::read_json(&out.join("effir_finetune.json"));
    assert_eq!(
        record["config"]["embedding_distillation"]["token_weight"],
        1.0
    );

    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        TRAIN_TEXTS,
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    );
    let out = work.path().join("distilled");
    let train = config(
        "pruned.yaml",
        "epochs: 6\nlearning_rate: 2.0e-3\nwarmup_steps: 2\n",
    );
    let o = distill(&pruned, &[&texts], &out, &train, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = step_log(&out);
    let first = log[0]["token_distance"].as_f64().unwrap();
    let last = log.last().unwrap()["token_distance"].as_f64().unwrap();
    assert!(first > 1e-3, "a pruned model starts away: {first}");
    assert!(last < first, "token distance {first} -> {last}");
    assert_closer_on_held_out(&teacher, &pruned, &out);
}

/// The token term compares hidden states directly: a teacher that reads
/// text the same way but has a wider residual stream is refused before
/// training, naming both sizes, with nothing written.
#[test]
fn a_token_term_teacher_of_another_hidden_size_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let tiny = SyntheticShape::named("tiny").unwrap();
    let student = work.path().join("student");
    let teacher = work.path().join("teacher");
    let narrow = SyntheticShape {
        hidden: 64,
        intermediate: 192,
        ..tiny
    };
    write_synthetic_model(&narrow, &student, 256 << 10, 1).unwrap();
    write_synthetic_model(&tiny, &teacher, 256 << 10, 1).unwrap();
    let read = |dir: &Path| std::fs::read(dir.join("tokenizer.json")).unwrap();
    assert_eq!(read(&student), read(&teacher), "one tokenizer for both");
    let texts = train_texts(work.path());
    let config = write(
        work.path(),
        "wider.yaml",
        &format!(
            "objective: distill\nmax_steps: 1\nbatch_size: 2\nembedding_distillation:\n  \
             teacher: {}\n  weight: 0.0\n  token_weight: 1.0\n",
            teacher.display()
        ),
    );
    let out = work.path().join("out");
    let o = distill(&student, &[&texts], &out, &config, &[]);
    assert!(!o.status.success(), "accepted");
    let err = stderr(&o);
    assert!(
        err.contains("the teacher's hidden states have 128 dimensions")
            && err.contains(") 64; the token term"),
        "{err}"
    );
    assert!(!out.exists(), "wrote {}", out.display());
}

#[test]
fn a_killed_distillation_resumes_to_the_same_weights_bit_for_bit() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let pruned = common::prune_fixture("bert", work.path(), TRAIN_TEXTS, &["--mlp-keep", "0.5"]);
    // Texts from two sources, one of them JSONL.
    let texts = train_texts(work.path());
    let jsonl = write(
        work.path(),
        "more.jsonl",
        "\"a plain JSON string\"\n{\"title\": \"Titled\", \"text\": \"an object with a title\"}\n",
    );
    let config = distill_config(
        work.path(),
        &teacher,
        "max_steps: 6\nlearning_rate: 1.0e-3\ncheckpoint_every: 3\n",
    );
    let straight = work.path().join("straight");
    let o = distill(&pruned, &[&texts, &jsonl], &straight, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = work.path().join("resumed");
    let o = distill(
        &pruned,
        &[&texts, &jsonl],
        &resumed,
        &config,
        &["--abort-after-step", "3"],
    );
    assert!(!o.status.success() && !resumed.exists());
    // A run killed later than its checkpoint has logged steps the resumed
    // run repeats (here step 4, written as such a kill leaves it).
    let log = work.path().join("resumed.checkpoints/train_log.jsonl");
    let mut lines = std::fs::read_to_string(&log).unwrap();
    lines.push_str("{\"step\":4,\"loss\":99.0}\n");
    std::fs::write(&log, lines).unwrap();
    let o = distill(&pruned, &[&texts, &jsonl], &resumed, &config, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed at 3"));
    // The log holds each step once, as the straight run's does.
    let steps = |out: &Path| -> Vec<u64> {
        step_log(out)
            .iter()
            .map(|s| s["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&resumed), (1..=6).collect::<Vec<u64>>());
    assert_eq!(steps(&resumed), steps(&straight));
    assert!(step_log(&resumed)
        .iter()
        .all(|s| s["loss"].as_f64() != Some(99.0)));
    let a = common::load_tensors(&straight.join("model.safetensors"));
    let b = common::load_tensors(&resumed.join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resume"
        );
    }
    // Resuming those checkpoints with other text is refused.
    let checkpoints = work.path().join("resumed.checkpoints");
    let other = work.path().join("other");
    let o = distill(
        &pruned,
        &[&texts],
        &other,
        &config,
        &["--resume", "--checkpoints", checkpoints.to_str().unwrap()],
    );
    assert!(!o.status.success(), "resumed with other text");
    assert!(stderr(&o).contains("other training data"), "{}", stderr(&o));
    assert!(!other.exists());
    // So is resuming them with other trained tensors (`trained: mlp`): the
    // message names the setting, beside a model shape.
    let mlp_only = distill_config(
        work.path(),
        &teacher,
        "max_steps: 6\nlearning_rate: 1.0e-3\ncheckpoint_every: 3\ntrained: mlp\n",
    );
    let o = distill(
        &pruned,
        &[&texts, &jsonl],
        &other,
        &mlp_only,
        &["--resume", "--checkpoints", checkpoints.to_str().unwrap()],
    );
    assert!(!o.status.success(), "resumed with other settings");
    assert!(
        stderr(&o).contains("or other trained tensors (`trained:`, `lora:`)"),
        "{}",
        stderr(&o)
    );
    assert!(!other.exists());
}

/// The one teacher cache file (`teacher-*.safetensors`) in `dir`, and the
/// unfinished parts directories there.
fn teacher_cache(dir: &Path) -> (Option<PathBuf>, Vec<PathBuf>) {
    let mut cache = None;
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("teacher-") && name.ends_with(".safetensors") {
            assert!(cache.is_none(), "two teacher caches in {}", dir.display());
            cache = Some(path);
        } else if name.contains(".parts-") {
            parts.push(path);
        }
    }
    (cache, parts)
}

#[test]
fn a_run_killed_while_its_teacher_embeds_resumes_after_the_saved_parts() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let pruned = common::prune_fixture("bert", work.path(), TRAIN_TEXTS, &["--mlp-keep", "0.5"]);
    // Parts are whole blocks of 1,024 texts (the embedder's batching
    // block): 2,600 texts make three, the last of 552.
    let many: Vec<String> = (0..2600)
        .map(|i| {
            format!(
                "text {i}: {}",
                TRAIN_TEXTS[i % TRAIN_TEXTS.len()].repeat(1 + i % 3)
            )
        })
        .collect();
    let texts = write(work.path(), "many.txt", &many.join("\n"));
    let config = distill_config(work.path(), &teacher, "max_steps: 1\n");
    let run = |out: &Path, cache: &Path, extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--quiet",
            "--model",
            pruned.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--train-texts",
            texts.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        // EFFIR_LOG=info for the resume message; effir writes no colour
        // codes into a pipe, so it reads as plain `saved=N`.
        common::effir_env(
            &args,
            &[
                ("EFFIR_CACHE_DIR", cache.to_str().unwrap()),
                ("EFFIR_LOG", "info"),
            ],
        )
    };
    // Uninterrupted, in one part (5,000 texts a part): one cache file and
    // no parts left behind.
    let straight_cache = work.path().join("cache-straight");
    let o = run(
        &work.path().join("straight"),
        &straight_cache,
        &["--teacher-save-every", "5000"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (straight, parts) = teacher_cache(&straight_cache);
    assert!(parts.is_empty(), "parts left: {parts:?}");
    let straight = straight.expect("a teacher cache");

    // Parts of 1 text are parts of 1,024. Killed 1,100 texts in: the first
    // part is saved, the second was not, the third never started; no cache.
    let cache = work.path().join("cache-killed");
    let out = work.path().join("resumed");
    let small_parts = ["--teacher-save-every", "1"];
    let o = run(
        &out,
        &cache,
        &[&small_parts[..], &["--abort-after-teacher-texts", "1100"]].concat(),
    );
    assert!(!o.status.success(), "the abort did not happen");
    assert!(!out.exists());
    let (none, parts) = teacher_cache(&cache);
    assert!(none.is_none(), "a cache after the kill");
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(parts[0].to_string_lossy().ends_with(".parts-1024"));
    let saved: Vec<String> = std::fs::read_dir(&parts[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(saved, ["part-000000.safetensors"]);

    // Run again: the teacher starts after the 1,024 saved texts, and the
    // cache equals the one-part run's bit for bit.
    let o = run(&out, &cache, &[&small_parts[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("resuming after the saved parts") && err.contains("saved=1024"),
        "{err}"
    );
    let (resumed, parts) = teacher_cache(&cache);
    assert!(parts.is_empty(), "parts left: {parts:?}");
    let resumed = resumed.expect("a teacher cache");
    assert_eq!(resumed.file_name(), straight.file_name());
    assert_eq!(
        std::fs::read(&resumed).unwrap(),
        std::fs::read(&straight).unwrap()
    );
}

#[test]
fn bad_distillation_input_fails_before_training_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("gemma3");
    let texts = train_texts(work.path());
    let empty = write(work.path(), "empty.txt", "\n  \n");
    let not_utf8 = work.path().join("latin1.txt");
    std::fs::write(&not_utf8, b"fine line\nsecond line\ncaf\xe9 au lait\n").unwrap();
    let bad_json = write(work.path(), "bad.jsonl", "\"ok\"\n{\"body\": 3}\n");
    // Same tokenizer, but the embedding stops after the first Dense layer (96
    // dimensions instead of 64).
    let wide = common::copy_model(&model);
    let modules: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(wide.path().join("modules.json")).unwrap())
            .unwrap();
    std::fs::write(
        wide.path().join("modules.json"),
        serde_json::to_string(&modules[..3]).unwrap(),
    )
    .unwrap();
    let good = distill_config(work.path(), &model, "max_steps: 1\n");
    let cases: Vec<(&str, Vec<&Path>, PathBuf, &str)> = vec![
        (
            "an empty text file",
            vec![&empty],
            good.clone(),
            "empty.txt: no training text",
        ),
        (
            "a non-UTF-8 line",
            vec![&not_utf8],
            good.clone(),
            "latin1.txt:3",
        ),
        (
            "a JSONL line that is no text",
            vec![&bad_json],
            good.clone(),
            "bad.jsonl:2",
        ),
        (
            "a teacher with another tokenizer",
            vec![&texts],
            write(
                work.path(),
                "other-tokenizer.yaml",
                &format!(
                    "objective: distill\nmax_steps: 1\nembedding_distillation:\n  teacher: {}\n",
                    fixture("llama").display()
                ),
            ),
            "tokenizer.json differs",
        ),
        (
            "a teacher with another embedding size",
            vec![&texts],
            write(
                work.path(),
                "other-size.yaml",
                &format!(
                    "objective: distill\nmax_steps: 1\nembedding_distillation:\n  teacher: {}\n",
                    wide.path().display()
                ),
            ),
            "96 dimensions",
        ),
        (
            "a token term with a teacher of another tokenizer",
            vec![&texts],
            write(
                work.path(),
                "token-other-tokenizer.yaml",
                &format!(
                    "objective: distill\nmax_steps: 1\nembedding_distillation:\n  teacher: {}\n  \
                     weight: 0.0\n  token_weight: 1.0\n",
                    fixture("llama").display()
                ),
            ),
            "the token term (token_weight) compares hidden states of the same tokens",
        ),
        (
            "a token term in a combined run",
            vec![&texts],
            write(
                work.path(),
                "token-combined.yaml",
                &format!(
                    "objective: combined\nmax_steps: 1\nembedding_distillation:\n  teacher: {}\n  \
                     token_weight: 1.0\n",
                    model.display()
                ),
            ),
            "token_weight trains on unlabeled text",
        ),
        (
            "a distill objective without a teacher",
            vec![&texts],
            write(
                work.path(),
                "no-teacher.yaml",
                "objective: distill\nmax_steps: 1\n",
            ),
            "needs an embedding_distillation section",
        ),
        (
            "no --train-texts",
            vec![],
            good.clone(),
            "pass --train-texts",
        ),
    ];
    for (what, sources, config, message) in cases {
        let out = work.path().join("out");
        let o = distill(&model, &sources, &out, &config, &[]);
        assert!(!o.status.success(), "{what}: accepted");
        let err = stderr(&o);
        assert!(err.contains(message), "{what}: {err}");
        assert!(!out.exists(), "{what}: wrote {}", out.display());
        assert!(
            !work.path().join("out.checkpoints").exists(),
            "{what}: left a checkpoint directory"
        );
    }
    // Query sources are checked the same way.
    let titled = write(
        work.path(),
        "titled.jsonl",
        "{\"title\": \"T\", \"text\": \"q\"}\n",
    );
    for (what, queries, message) in [
        (
            "an empty query file",
            &empty,
            "empty.txt: no training queries",
        ),
        (
            "a query with a title",
            &titled,
            "titled.jsonl:1: a query has no title",
        ),
    ] {
        let out = work.path().join("out");
        let o = distill(
            &model,
            &[&texts],
            &out,
            &good,
            &["--train-queries", queries.to_str().unwrap()],
        );
        assert!(!o.status.success(), "{what}: accepted");
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        assert!(!out.exists(), "{what}: wrote {}", out.display());
    }
    // Labeled data is refused for the label-free objective.
    let o = effir(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        texts.to_str().unwrap(),
        "--out",
        work.path().join("out").to_str().unwrap(),
        "--config",
        good.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("pass --train-texts (or --train-queries) instead")
    );
}

/// Every committed fine-tuning config parses and passes its checks; the
/// recovery config is label-free.
#[test]
fn the_committed_finetune_configs_parse() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("finetune-") || name.starts_with("recover-")) {
            continue;
        }
        let config: FinetuneConfig = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        if name.starts_with("recover-") {
            assert_eq!(config.objective, Objective::Distill, "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 3, "found {seen} configs");
}

/// Labeled examples (JSONL) over the training texts: query i's positive is
/// text i, its negative text i + 5.
fn labeled_pairs(dir: &Path) -> PathBuf {
    let mut pairs = String::new();
    for (i, t) in TRAIN_TEXTS.iter().enumerate() {
        pairs += &serde_json::json!({
            "query": format!("query {i}"),
            "pos": [t],
            "neg": [TRAIN_TEXTS[(i + 5) % TRAIN_TEXTS.len()]],
        })
        .to_string();
        pairs.push('\n');
    }
    write(dir, "pairs.jsonl", &pairs)
}

/// `objective: combined`: the labeled loss plus the label-free terms on the
/// batch's own texts, each logged every step.
#[test]
fn the_combined_objective_trains_on_both_terms() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("bert");
    let train = labeled_pairs(work.path());
    let config = write(
        work.path(),
        "combined.yaml",
        &format!(
            "objective: combined\nmax_steps: 2\nbatch_size: 4\ncheckpoint_every: 0\n\
             embedding_distillation:\n  teacher: {}\n  contrastive_weight: 0.5\n",
            model.display()
        ),
    );
    let out = work.path().join("combined");
    let o = common::finetune(&model, &train, &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for step in step_log(&out) {
        let term = |k: &str| step[k].as_f64().unwrap_or_else(|| panic!("{k}: {step}"));
        let (nce, distance, kl) = (
            term("info_nce"),
            term("embedding_distance"),
            term("similarity_kl"),
        );
        // The teacher is the model itself: its terms start at zero, InfoNCE does not.
        assert!(nce > 0.1, "{step}");
        let loss = term("loss");
        assert!(
            (loss - (0.5 * nce + distance + kl)).abs() < 1e-4,
            "loss {loss} is not 0.5 x InfoNCE + the distillation terms: {step}"
        );
    }
    // --train-texts is refused for it.
    let texts = train_texts(work.path());
    let o = distill(
        &model,
        &[&texts],
        &work.path().join("x"),
        &config,
        &["--train", train.to_str().unwrap()],
    );
    assert!(
        !o.status.success()
            && stderr(&o).contains("--train-texts and --train-queries are for objective distill")
    );
}

/// A combined config whose batches carry `text_batch_size` unlabeled texts
/// beside 4 labeled queries (`text_batch_size: 0`: none).
fn replay_config(dir: &Path, name: &str, teacher: &Path, text_batch_size: usize) -> PathBuf {
    write(
        dir,
        name,
        &format!(
            "objective: combined\nmax_steps: 4\nbatch_size: 4\nlearning_rate: 1.0e-3\n\
             checkpoint_every: 2\nseed: 5\nembedding_distillation:\n  teacher: {}\n  \
             contrastive_weight: 0.5\n  text_batch_size: {text_batch_size}\n",
            teacher.display()
        ),
    )
}

/// `objective: combined` with `text_batch_size`: each labeled batch also
/// carries unlabeled texts (`--train-texts`) on which the label-free terms
/// are computed, logged as `unlabeled_distillation` and added to the loss.
/// From the teacher itself that term is zero; from a pruned student it is
/// not, it changes what the run learns, and a killed run resumes to the
/// same weights bit for bit (the texts' own order is in the checkpoint).
#[test]
fn a_combined_run_replays_unlabeled_texts_beside_its_labeled_batches() {
    let work = tempfile::tempdir().unwrap();
    let teacher = fixture("bert");
    let train = labeled_pairs(work.path());
    // Texts of their own, 5 of them: 4 steps of 3 go through them more than
    // twice, and the checkpoint at step 2 stands in their second epoch
    // (epoch 1, one text in), which the resumed run must pick up.
    let unlabeled = write(work.path(), "unlabeled.txt", &HELD_OUT[..5].join("\n"));
    let replay = replay_config(work.path(), "replay.yaml", &teacher, 3);
    let texts_flag = ["--train-texts", unlabeled.to_str().unwrap()];

    let itself = work.path().join("itself");
    let o = common::finetune(&teacher, &train, &itself, &replay, &texts_flag);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = &step_log(&itself)[0];
    let term = |step: &serde_json::Value, k: &str| {
        step[k].as_f64().unwrap_or_else(|| panic!("{k}: {step}"))
    };
    assert!(
        term(first, "unlabeled_distillation").abs() < 1e-5,
        "{first}"
    );

    let pruned = common::prune_fixture("bert", work.path(), TRAIN_TEXTS, &["--mlp-keep", "0.5"]);
    let straight = work.path().join("straight");
    let o = common::finetune(&pruned, &train, &straight, &replay, &texts_flag);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = step_log(&straight);
    assert_eq!(log.len(), 4);
    for step in &log {
        let unlabeled = term(step, "unlabeled_distillation");
        assert!(unlabeled > 1e-4, "{step}");
        let expected = 0.5 * term(step, "info_nce")
            + term(step, "embedding_distance")
            + term(step, "similarity_kl")
            + unlabeled;
        assert!(
            (term(step, "loss") - expected).abs() < 1e-4,
            "loss is not 0.5 x InfoNCE + the labeled texts' terms + the unlabeled texts': {step}"
        );
    }

    // Without the unlabeled texts the same run learns something else.
    let plain = work.path().join("plain");
    let o = common::finetune(
        &pruned,
        &train,
        &plain,
        &replay_config(work.path(), "plain.yaml", &teacher, 0),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(step_log(&plain)[0].get("unlabeled_distillation").is_none());
    let weights = |out: &Path| common::load_tensors(&out.join("model.safetensors"));
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let (a, b) = (weights(&straight), weights(&plain));
    assert!(
        a.iter().any(|(name, t)| bits(t) != bits(&b[name])),
        "the unlabeled texts changed no weight"
    );

    // Killed after step 2, resumed: the same weights as the straight run.
    let resumed = work.path().join("resumed");
    let mut flags = texts_flag.to_vec();
    flags.extend(["--abort-after-step", "2"]);
    let o = common::finetune(&pruned, &train, &resumed, &replay, &flags);
    assert!(!o.status.success() && !resumed.exists());
    let mut flags = texts_flag.to_vec();
    flags.push("--resume");
    let o = common::finetune(&pruned, &train, &resumed, &replay, &flags);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed at 2"));
    let c = weights(&resumed);
    assert_eq!(a.len(), c.len());
    for (name, t) in &a {
        assert!(bits(t) == bits(&c[name]), "{name} differs after resume");
    }
    // The record names the unlabeled texts beside the labeled data.
    let record = common::read_json(&straight.join("effir_finetune.json"));
    assert!(
        record["train_texts"].to_string().contains("unlabeled.txt"),
        "{record}"
    );
}

/// Unlabeled texts and `text_batch_size` must come together, in a combined
/// run: each half alone is refused before training, naming what is
/// missing, with nothing written.
#[test]
fn unlabeled_texts_beside_labeled_data_need_text_batch_size_and_back() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture("bert");
    let train = labeled_pairs(work.path());
    let texts = train_texts(work.path());
    let empty = write(work.path(), "empty.txt", "\n");
    let with_texts = ["--train-texts", texts.to_str().unwrap()];
    let cases: Vec<(&str, PathBuf, Vec<&str>, &str)> = vec![
        (
            "texts without text_batch_size",
            replay_config(work.path(), "zero.yaml", &model, 0),
            with_texts.to_vec(),
            "objective combined with embedding_distillation.text_batch_size",
        ),
        (
            "text_batch_size without texts",
            replay_config(work.path(), "three.yaml", &model, 3),
            vec![],
            "embedding_distillation.text_batch_size is 3: pass the unlabeled texts",
        ),
        (
            "an empty text file",
            replay_config(work.path(), "three.yaml", &model, 3),
            vec!["--train-texts", empty.to_str().unwrap()],
            "empty.txt: no training text",
        ),
    ];
    for (what, config, flags, message) in cases {
        let out = work.path().join("out");
        let o = common::finetune(&model, &train, &out, &config, &flags);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        assert!(!out.exists(), "{what}: wrote {}", out.display());
        assert!(
            !work.path().join("out.checkpoints").exists(),
            "{what}: left a checkpoint directory"
        );
    }
    // text_batch_size is for combined runs only.
    let label_free = write(
        work.path(),
        "distill-texts.yaml",
        &format!(
            "objective: distill\nmax_steps: 1\nembedding_distillation:\n  teacher: {}\n  \
             text_batch_size: 3\n",
            model.display()
        ),
    );
    let out = work.path().join("out");
    let o = distill(&model, &[&texts], &out, &label_free, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("text_batch_size adds unlabeled texts to the labeled batches"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// A teacher of another architecture, tokenizer and embedding size (the
/// BERT fixture teaching the Llama fixture, as all-MiniLM-L6-v2 would teach
/// a decoder LLM) teaches the in-batch similarities alone (`weight: 0`): the
/// run logs only the similarity term, and on texts it never saw the
/// student's similarity distributions move toward the teacher's. With the
/// embedding term the same teacher is refused (`bad_distillation_input…`).
#[test]
fn a_teacher_of_another_architecture_teaches_in_batch_similarities() {
    use effir_pipeline::finetune::objective::similarity_kl;
    let work = tempfile::tempdir().unwrap();
    let (student, teacher) = (fixture("llama"), fixture("bert"));
    let texts = train_texts(work.path());
    let config = write(
        work.path(),
        "similarities.yaml",
        &format!(
            "objective: distill\nmax_steps: 8\nbatch_size: 6\nlearning_rate: 2.0e-3\n\
             checkpoint_every: 0\nseed: 3\nembedding_distillation:\n  teacher: {}\n  \
             weight: 0.0\n  similarity_weight: 1.0\n  similarity_temperature: 0.05\n",
            teacher.display()
        ),
    );
    let out = work.path().join("out");
    let o = distill(&student, &[&texts], &out, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for step in step_log(&out) {
        assert!(step["embedding_distance"].is_null(), "{step}");
        assert!(step["similarity_kl"].as_f64().unwrap() > 0.0, "{step}");
    }
    let matrix = |rows: Vec<Vec<f32>>| {
        let d = rows[0].len();
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        Tensor::from_vec(flat, (HELD_OUT.len(), d), &Device::Cpu).unwrap()
    };
    let teacher_rows = matrix(embed(&teacher, HELD_OUT));
    let kl = |model: &Path| -> f32 {
        similarity_kl(&matrix(embed(model, HELD_OUT)), &teacher_rows, 0.05)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (before, after) = (kl(&student), kl(&out));
    assert!(
        after < before,
        "held-out similarity KL to the teacher: {before} before, {after} after"
    );
}

/// `--train-queries`: query text is written with the student's query prompt
/// (an instruction-following retriever such as the SmolLM2 one asks for it),
/// and a teacher that formats text its own way reads it with its own prompt
/// (the BERT fixture: none). With every text in one batch, the first step's
/// similarity term is the KL between the student's embeddings of the
/// prompted queries and the teacher's of the bare ones; the record lists
/// where the queries came from.
#[test]
fn training_queries_carry_the_students_prompt_and_the_teacher_reads_them_bare() {
    use effir_pipeline::finetune::objective::similarity_kl;
    // Long enough to change the teacher's similarities if it read it.
    const PROMPT: &str = "Instruct: given a question, retrieve the passage that answers it; \
                          the passage may be long or short, plain or technical\nQuery: ";
    let work = tempfile::tempdir().unwrap();
    let student = common::copy_model(&fixture("llama"));
    let st_config = student.path().join("config_sentence_transformers.json");
    let mut st = common::read_json(&st_config);
    st["prompts"]["query"] = PROMPT.into();
    std::fs::write(&st_config, st.to_string()).unwrap();
    let teacher = fixture("bert");
    let documents = &TRAIN_TEXTS[..6];
    let queries = TRAIN_QUERIES;
    let documents_file = write(work.path(), "documents.txt", &documents.join("\n"));
    let queries_file = write(
        work.path(),
        "queries.jsonl",
        &queries
            .iter()
            .map(|q| serde_json::json!(q).to_string() + "\n")
            .collect::<String>(),
    );
    let config = write(
        work.path(),
        "similarities.yaml",
        &format!(
            "objective: distill\nmax_steps: 1\nbatch_size: {}\ncheckpoint_every: 0\n\
             embedding_distillation:\n  teacher: {}\n  weight: 0.0\n  similarity_weight: 1.0\n  \
             similarity_temperature: 0.05\n",
            documents.len() + queries.len(),
            teacher.display()
        ),
    );
    let out = work.path().join("out");
    let o = distill(
        student.path(),
        &[&documents_file],
        &out,
        &config,
        &["--train-queries", queries_file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let logged = step_log(&out)[0]["similarity_kl"].as_f64().unwrap();

    let bare: Vec<String> = documents
        .iter()
        .chain(queries)
        .map(|t| t.to_string())
        .collect();
    let prompted: Vec<String> = documents
        .iter()
        .map(|d| d.to_string())
        .chain(queries.iter().map(|q| format!("{PROMPT}{q}")))
        .collect();
    let matrix = |rows: Vec<Vec<f32>>| {
        let (n, d) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
    };
    let student_rows = matrix(embed(student.path(), &as_strs(&prompted)));
    let kl = |teacher_texts: &[String]| -> f64 {
        let teacher_rows = matrix(embed(&teacher, &as_strs(teacher_texts)));
        let kl = similarity_kl(&student_rows, &teacher_rows, 0.05).unwrap();
        kl.to_scalar::<f32>().unwrap() as f64
    };
    let (teacher_bare, teacher_prompted) = (kl(&bare), kl(&prompted));
    // The random fixture teacher's similarities move little with the
    // prompt, so the bound is relative: the logged term is ten times closer
    // to the bare reading than the two readings are to each other.
    let separation = (teacher_bare - teacher_prompted).abs();
    assert!(
        (logged - teacher_bare).abs() < 0.1 * separation,
        "logged similarity KL {logged}: the teacher reading bare queries gives {teacher_bare}, \
         reading them prompted {teacher_prompted}"
    );
    let record = common::read_json(&out.join("effir_finetune.json"));
    assert_eq!(
        record["train_texts"],
        serde_json::json!(["../documents.txt"])
    );
    assert_eq!(
        record["train_queries"],
        serde_json::json!(["../queries.jsonl"])
    );
    assert!(record["train_queries_split"].is_null(), "{record}");
    // A BEIR directory's queries come from --split, which is recorded.
    let beir = fixture("eval/tiny");
    let out = work.path().join("from-beir");
    let o = distill(
        student.path(),
        &[&documents_file],
        &out,
        &config,
        &["--train-queries", beir.to_str().unwrap(), "--split", "test"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let record = common::read_json(&out.join("effir_finetune.json"));
    assert_eq!(record["train_queries_split"], "test", "{record}");
}
