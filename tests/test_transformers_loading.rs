//! Pruned and fine-tuned directories load in `transformers` and
//! sentence-transformers (PyTorch) and compute what effir computes.
//!
//! A pruned model whose layers differ in MLP width, or lack their MLP,
//! ships `modeling_effir_<type>.py` and `auto_map`: both
//! `AutoModel.from_pretrained(dir, trust_remote_code=True)` and
//! `SentenceTransformer(dir, trust_remote_code=True)` must give effir's
//! embeddings (cosine ≥ 0.99999). One the source architecture can express
//! (every MLP the same width) gets a plain `config.json` and loads without
//! remote code. The client (`tests/transformers_client.py`) runs in its own
//! venv, which `make test` makes (`runs/venv-transformers`).

mod common;

use std::path::{Path, PathBuf};

use common::{effir, fixture, stderr};

const CALIBRATION: &[&str] = &[
    "the cat sat on the mat",
    "proteins fold in cells",
    "rivers flow to the sea",
    "quantum physics of light",
];

const TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "x",
    "Numbers 12 345 and ünïcödé appear here.",
];

/// The Python of the venv holding torch, transformers and
/// sentence-transformers: `$EFFIR_TRANSFORMERS_PYTHON`, else
/// `runs/venv-transformers/bin/python`.
fn transformers_python() -> PathBuf {
    let python = std::env::var_os("EFFIR_TRANSFORMERS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("runs/venv-transformers/bin/python")
        });
    assert!(
        python.exists(),
        "{}: no transformers venv; `make test` makes it (or set EFFIR_TRANSFORMERS_PYTHON)",
        python.display()
    );
    python
}

/// The fixture `arch` pruned so that `config.json` cannot describe it: MLP
/// 1 dropped, the others narrowed to half their neurons in all.
fn prune_unevenly(arch: &str, work: &Path) -> PathBuf {
    common::prune_fixture(
        arch,
        work,
        CALIBRATION,
        &["--drop-layers", "1", "--mlp-keep", "0.5"],
    )
}

/// effir's embeddings of [`TEXTS`] by `model`, as `.npy`, and the texts as JSON.
fn effir_embeddings(model: &Path, work: &Path, name: &str) -> (PathBuf, PathBuf) {
    let input = work.join(format!("{name}-texts.txt"));
    std::fs::write(&input, TEXTS.join("\n")).unwrap();
    let texts = work.join(format!("{name}-texts.json"));
    std::fs::write(&texts, serde_json::to_string(TEXTS).unwrap()).unwrap();
    let npy = work.join(format!("{name}.npy"));
    let o = effir(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        npy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "embed {name}: {}", stderr(&o));
    (npy, texts)
}

/// Runs the client on `model` with `loader`; `plain`: the directory must
/// load without remote code. Returns the client's output on success.
fn client(
    model: &Path,
    work: &Path,
    name: &str,
    loader: &str,
    plain: bool,
    save: Option<&Path>,
) -> std::process::Output {
    let (npy, texts) = effir_embeddings(model, work, name);
    let mut command = std::process::Command::new(transformers_python());
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transformers_client.py"))
        .args(["--model", model.to_str().unwrap()])
        .args(["--texts", texts.to_str().unwrap()])
        .args(["--embeddings", npy.to_str().unwrap()])
        .args(["--loader", loader])
        // Remote code is copied into this cache; keep it out of $HOME.
        .env("HF_MODULES_CACHE", work.join("hf-modules"))
        .env("HF_HUB_OFFLINE", "1");
    if plain {
        command.arg("--plain");
    }
    if let Some(save) = save {
        command.args(["--save", save.to_str().unwrap()]);
    }
    command.output().expect("transformers client")
}

fn assert_loads(model: &Path, work: &Path, name: &str, loader: &str, plain: bool) {
    let o = client(model, work, name, loader, plain, None);
    assert!(
        o.status.success(),
        "{name} through {loader}:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

#[test]
fn a_pruned_bert_loads_in_transformers_and_sentence_transformers() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_unevenly("bert", work.path());
    let config = common::read_json(&pruned.join("config.json"));
    assert_eq!(
        config["auto_map"]["AutoModel"],
        "modeling_effir_bert.EffirBertModel"
    );
    assert!(pruned.join("modeling_effir_bert.py").is_file());
    // LLM-Drop's keys stay.
    assert_eq!(config["drop_mlp_list"].as_array().unwrap().len(), 1);
    for loader in ["transformers", "sentence-transformers"] {
        assert_loads(&pruned, work.path(), "bert", loader, false);
    }
}

#[test]
fn a_pruned_gemma3_with_dense_head_loads_in_both() {
    // Gemma3's MLP sub-layer has a norm before and after it; a dropped MLP
    // takes both along.
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_unevenly("gemma3", work.path());
    for loader in ["transformers", "sentence-transformers"] {
        assert_loads(&pruned, work.path(), "gemma3", loader, false);
    }
}

#[test]
fn pruned_llama_qwen2_qwen3_and_mistral_load_in_transformers() {
    // sentence-transformers does not append EOS before last-token pooling
    // where the tokenizer does not, and effir does; the backbone is what
    // the remote code provides, so these go through `AutoModel` with
    // effir's input rule.
    let work = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3", "mistral"] {
        let pruned = prune_unevenly(arch, work.path());
        assert_loads(&pruned, work.path(), arch, "transformers", false);
    }
}

#[test]
fn equal_widths_give_a_plain_config_without_remote_code() {
    let work = tempfile::tempdir().unwrap();
    let plan = work.path().join("uniform.yaml");
    // Every MLP at its floor, which is the kept fraction: one width.
    std::fs::write(
        &plan,
        "fine:\n  mlp_keep: 0.5\n  min_width_fraction: 0.5\n  alignment: 8\n",
    )
    .unwrap();
    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        CALIBRATION,
        &["--plan", plan.to_str().unwrap()],
    );
    let config = common::read_json(&pruned.join("config.json"));
    assert_eq!(config["intermediate_size"], 48, "{config}");
    assert!(config.get("auto_map").is_none() && config.get("effir_intermediate_sizes").is_none());
    assert!(!pruned.join("modeling_effir_bert.py").exists());
    for loader in ["transformers", "sentence-transformers"] {
        assert_loads(&pruned, work.path(), "uniform", loader, true);
    }
}

#[test]
fn the_client_notices_a_model_built_with_the_wrong_widths() {
    // Without the per-layer widths the remote code builds the source's
    // uniform stack, which cannot hold the narrowed weights; the check
    // fails rather than passing by accident.
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_unevenly("bert", work.path());
    let (npy, _) = effir_embeddings(&pruned, work.path(), "before");
    let path = pruned.join("config.json");
    let mut config = common::read_json(&path);
    let widths = config["effir_intermediate_sizes"].clone();
    // Keep the narrowed widths but forget the dropped MLP: layer 1 gets a
    // fresh, randomly initialised MLP of the source's width.
    let dropped = widths
        .as_array()
        .unwrap()
        .iter()
        .position(|w| w.is_null())
        .unwrap();
    config["effir_intermediate_sizes"][dropped] = config["intermediate_size"].clone();
    std::fs::write(&path, config.to_string()).unwrap();
    let o = client(&pruned, work.path(), "edited", "transformers", false, None);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(!o.status.success(), "{out}");
    // effir reads `effir_shape.json`, so it still embeds as before; with
    // the edited config alone (no shape file) it refuses the weights.
    let (again, _) = effir_embeddings(&pruned, work.path(), "after");
    assert_eq!(std::fs::read(&npy).unwrap(), std::fs::read(&again).unwrap());
    std::fs::remove_file(pruned.join("effir_shape.json")).unwrap();
    let o = effir(&[
        "embed",
        "--model",
        pruned.to_str().unwrap(),
        "--input",
        work.path().join("after-texts.txt").to_str().unwrap(),
        "--output",
        work.path().join("refused.npy").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("intermediate"), "{}", stderr(&o));
}

#[test]
fn effir_reads_the_widths_from_config_json_after_a_transformers_round_trip() {
    // sentence-transformers saves what it loaded: config.json (with the
    // widths and auto_map), the code, the weights; no effir_shape.json.
    // effir loads that directory and gives the same embeddings.
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_unevenly("gemma3", work.path());
    let saved = work.path().join("saved");
    let o = client(
        &pruned,
        work.path(),
        "pruned",
        "sentence-transformers",
        false,
        Some(&saved),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!saved.join("effir_shape.json").exists());
    assert!(saved.join("modeling_effir_gemma3_text.py").is_file());
    let (before, _) = effir_embeddings(&pruned, work.path(), "pruned");
    let (after, _) = effir_embeddings(&saved, work.path(), "saved");
    let read = |p: &Path| effir_pipeline::io::npy::read_npy(p).unwrap();
    let (a, b) = (read(&before), read(&after));
    assert_eq!(a.dim(), b.dim());
    for (x, y) in a.rows().into_iter().zip(b.rows()) {
        let cosine = common::cosine(x.as_slice().unwrap(), y.as_slice().unwrap());
        assert!(cosine > 0.99999, "{cosine}");
    }
}

#[test]
fn a_fine_tuned_pruned_model_keeps_its_loading_code() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_unevenly("bert", work.path());
    // A source pruned before effir wrote loading code: the fine-tuned copy
    // gets it anyway.
    std::fs::remove_file(pruned.join("modeling_effir_bert.py")).unwrap();
    let (train, config) = common::tiny_finetune_inputs(
        work.path(),
        CALIBRATION,
        "max_steps: 2\nbatch_size: 4\nlearning_rate: 1.0e-3\ncheckpoint_every: 0\n",
    );
    let tuned = work.path().join("tuned");
    let o = common::finetune(&pruned, &train, &tuned, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tuned.join("modeling_effir_bert.py").is_file());
    let card = std::fs::read_to_string(tuned.join("README.md")).unwrap();
    assert!(card.contains("trust_remote_code=True"), "{card}");
    assert_loads(&tuned, work.path(), "tuned", "sentence-transformers", false);
    // The unpruned fixture fine-tuned stays plain, config untouched.
    let plain_tuned = work.path().join("plain-tuned");
    let o = common::finetune(&fixture("bert"), &train, &plain_tuned, &config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(plain_tuned.join("config.json")).unwrap(),
        std::fs::read(fixture("bert").join("config.json")).unwrap()
    );
}
