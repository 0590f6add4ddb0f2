//! What effir writes is readable by whoever serves it, and a served
//! tokenizer encodes what was validated:
//! - output files get the modes ordinary files get (0666 less the umask),
//!   directories those of ordinary directories, never the owner-only
//!   modes of temporary files;
//! - an export's `tokenizer.json` truncates at the length effir encodes at
//!   and pads each batch to its longest text, whatever the source file
//!   said (all-MiniLM-L6-v2's pads every text to 128 tokens), and
//!   `effir_export.json` records those settings.

mod common;

use std::path::Path;

use common::{effir, fixture, minilm_dir, prune_fixture, read_json, stderr};

/// `effir prune` of `model` to half its MLP neurons, calibrated on the
/// text file `calib`, into `out`.
fn prune_half(model: &Path, calib: &Path, out: &Path) {
    let run = effir(&[
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--mlp-keep",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
}

#[test]
fn pruned_and_exported_directories_are_readable_by_other_users() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_fixture(
        "bert",
        work.path(),
        &["some calibration text", "and a little more of it"],
        &["--mlp-keep", "0.5"],
    );
    common::assert_ordinary_modes(&pruned);
    let export = work.path().join("export");
    common::export(&pruned, &export, &["--layout", "onnx-subdir"]);
    common::assert_ordinary_modes(&export);
}

#[test]
fn the_exported_tokenizer_encodes_as_effir_validated() {
    let work = tempfile::tempdir().unwrap();
    for (name, model) in [("bert", fixture("bert")), ("minilm", minilm_dir())] {
        let export = work.path().join(name);
        common::export(&model, &export, &[]);
        let summary = read_json(&export.join("effir_export.json"));
        let settings = &summary["tokenizer"];
        let tokenizer = read_json(&export.join("tokenizer.json"));
        let max_length = settings["max_length"].as_u64().unwrap();
        assert_eq!(tokenizer["truncation"]["max_length"], max_length, "{name}");
        assert_eq!(tokenizer["padding"]["strategy"], "BatchLongest", "{name}");
        assert_eq!(settings["padding"], "batch-longest", "{name}");
        if name == "minilm" {
            // sentence-transformers encodes all-MiniLM-L6-v2 at 256 tokens;
            // its own tokenizer.json says 128, padded to 128.
            assert_eq!(max_length, 256);
            let source = read_json(&model.join("tokenizer.json"));
            assert_eq!(source["truncation"]["max_length"], 128);
            assert_eq!(tokenizer["padding"]["pad_token"], "[PAD]");
        }
    }
}

/// Pruned, fine-tuned, exported and rewritten directories name the
/// directories they came from relative to themselves, never by a path of
/// this machine, and `validate` still finds the source model from them.
#[test]
fn outputs_record_no_absolute_machine_paths() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_fixture(
        "bert",
        work.path(),
        &["some calibration text", "and a little more of it"],
        &["--mlp-keep", "0.5"],
    );
    let export = work.path().join("exports/bert");
    common::export(&pruned, &export, &[]);
    let needles: Vec<String> = [
        std::fs::canonicalize(work.path()).unwrap(),
        work.path().to_path_buf(),
        std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap(),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect();
    let summary = read_json(&export.join("effir_export.json"));
    assert_eq!(summary["source_model"], "../../bert-pruned");
    assert_eq!(summary["graph"], "model.onnx");
    // validate resolves the recorded source: the pruned model, not the
    // reference, is what the graph is compared with.
    let gates = work.path().join("gates.yaml");
    std::fs::write(&gates, "parity:\n  min_cosine: 0.99999\n").unwrap();
    let report = work.path().join("report");
    let run = common::validate_on_tiny(&fixture("bert"), &export, &gates, Some(&report));
    assert!(run.status.success(), "{}", stderr(&run));
    let json = read_json(&report.join("validation.json"));
    let candle = json["parity"]["candle_model"].as_str().unwrap();
    assert!(candle.ends_with("bert-pruned"), "{candle}");
    // validate wrote its figures into the export's card, with no machine
    // path either.
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    assert!(card.contains("## Validation"), "{card}");
    for dir in [&pruned, &export] {
        let found = common::files_containing(dir, &needles);
        assert!(found.is_empty(), "absolute paths:\n{}", found.join("\n"));
    }
}

/// A pruned directory, and its export, carry a model card of their own: the
/// source's card is kept as SOURCE_README.md, its licence carried over.
#[test]
fn pruned_and_exported_directories_carry_their_own_model_card() {
    let work = tempfile::tempdir().unwrap();
    let source = common::copy_model(&fixture("bert"));
    let original =
        "---\nlicense: mit\nlanguage: en\n---\n# A tiny BERT\n\nScores 0.99 on everything.\n";
    std::fs::write(source.path().join("README.md"), original).unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, "some calibration text\nand a little more of it\n").unwrap();
    let pruned = work.path().join("pruned");
    prune_half(source.path(), &calib, &pruned);
    let export = work.path().join("export");
    common::export(&pruned, &export, &["--precision", "int8"]);
    for (dir, sections) in [
        (
            &pruned,
            &[
                "## Pruning",
                "## Parameters and FLOPs",
                "## Recovery",
                "## Made with",
            ][..],
        ),
        (
            &export,
            &[
                "## Pruning",
                "## Recovery",
                "## ONNX export",
                "precision: int8",
            ][..],
        ),
    ] {
        let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(card.starts_with("---\nlicense: mit\n"), "{card}");
        assert!(!card.contains("Scores 0.99"), "the source's claims: {card}");
        for s in sections {
            assert!(card.contains(s), "{}: no `{s}` in\n{card}", dir.display());
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("SOURCE_README.md")).unwrap(),
            original,
            "{}",
            dir.display()
        );
    }
    // The latest validation's figures go into the export's card; the
    // source's card is never edited.
    let gates = work.path().join("gates.yaml");
    std::fs::write(
        &gates,
        "parity:\n  min_cosine: 0.99\nquality:\n  min_ndcg_retention: 0.1\n",
    )
    .unwrap();
    let run = common::validate_on_tiny(source.path(), &export, &gates, None);
    assert!(run.status.success(), "{}", stderr(&run));
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    let validation = &card[card.find("## Validation").expect("a Validation section")..];
    for needle in [
        "Result: **PASS**",
        "lowest cosine",
        "| tiny | test |",
        "effir validate",
    ] {
        assert!(
            validation.contains(needle),
            "no `{needle}` in\n{validation}"
        );
    }
    let pruned_card = std::fs::read_to_string(pruned.join("README.md")).unwrap();
    assert!(
        pruned_card.contains("## Loading in transformers"),
        "{pruned_card}"
    );
    assert_eq!(
        std::fs::read_to_string(source.path().join("README.md")).unwrap(),
        original
    );
}

/// The Python of the venv holding fastembed (`make test` makes it):
/// `$EFFIR_FASTEMBED_PYTHON`, else `runs/venv-fastembed/bin/python`.
fn fastembed_python() -> std::path::PathBuf {
    let python = std::env::var_os("EFFIR_FASTEMBED_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("runs/venv-fastembed/bin/python")
        });
    assert!(
        python.is_file(),
        "{}: no fastembed venv; `make test` makes it (or set EFFIR_FASTEMBED_PYTHON)",
        python.display()
    );
    python
}

/// fastembed, a client that reads tokenizer.json and tokenizer_config.json
/// itself, loads the full and a pruned MiniLM export as custom models and
/// gets effir's embeddings, a text longer than the model's 256 tokens
/// included (the source's files say 128 and 512).
#[test]
fn fastembed_loads_exports_and_embeds_as_effir_does() {
    use effir_pipeline::{Embedder, LoadOptions, TextEmbedder};
    let work = tempfile::tempdir().unwrap();
    let long = "Dense retrieval compresses a language model into one vector per text. ".repeat(40);
    let texts = vec![
        "What is dense retrieval?".to_string(),
        "MLP sub-layers are far more prunable than attention in LLM retrievers.".to_string(),
        long,
        "hello".to_string(),
    ];
    let texts_file = work.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let pruned = work.path().join("minilm-pruned");
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, texts.join("\n")).unwrap();
    prune_half(&minilm_dir(), &calib, &pruned);
    for (name, model) in [("full", minilm_dir()), ("pruned", pruned)] {
        let export = work.path().join(format!("{name}-onnx"));
        common::export(&model, &export, &[]);
        let out = std::process::Command::new(fastembed_python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fastembed_client.py"))
            .args(["--export", export.to_str().unwrap()])
            .args(["--texts", texts_file.to_str().unwrap()])
            .args(["--dim", "384"])
            .output()
            .expect("fastembed client");
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let got: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let want = Embedder::load(&model, &LoadOptions::default())
            .unwrap()
            .embed_texts(&refs, "", 4, &mut |_| {})
            .unwrap();
        for (i, (g, w)) in got.iter().zip(want.rows()).enumerate() {
            let cos = common::cosine(g, &w.to_vec());
            assert!(cos >= 0.99999, "{name}: text {i}: cosine {cos}");
        }
        assert_eq!(got.len(), texts.len());
    }
}
