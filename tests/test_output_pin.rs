//! What effir writes is pinned: `effir prune` then `effir export` on every
//! tiny fixture gives the bytes recorded in
//! `tests/fixtures/output-hashes.json`. Refactors (the checkpoint map, the
//! module layout) must keep them; a change that means to alter an output
//! regenerates the file with `EFFIR_UPDATE_PINS=1 cargo test --release
//! --test test_output_pin` and says why in its commit.
//!
//! Machine paths (the fixture's and the temporary directory's, absolute or
//! relative to the output that records them) are replaced
//! by placeholders before hashing, so the pins hold in any clone; ONNX files
//! are decoded, their strings normalised, and re-encoded for the same reason
//! (a path's length is part of the protobuf bytes). `effir_export.json`'s
//! `graph_bytes` is the size of the un-normalised graph, so it varies with
//! the clone's path length too, and `cpu_features` with the machine; both
//! are left out (the graph itself is pinned).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use effir_onnx::proto::ModelProto;
use effir_pipeline::io::recorded_path::relative_to;
use prost::Message;

const ARCHITECTURES: [&str; 6] = ["bert", "gemma3", "llama", "mistral", "qwen2", "qwen3"];
const PINS: &str = "output-hashes.json";

/// Replaces every machine path in `text` with a placeholder.
fn normalise(text: &str, paths: &[(String, &str)]) -> String {
    paths
        .iter()
        .fold(text.to_string(), |t, (path, placeholder)| {
            t.replace(path.as_str(), placeholder)
        })
}

fn file_hash(path: &Path, paths: &[(String, &str)]) -> String {
    let bytes = std::fs::read(path).unwrap();
    let normalised = if path.extension().is_some_and(|e| e == "onnx") {
        let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
        model.doc_string = normalise(&model.doc_string, paths);
        for entry in &mut model.metadata_props {
            entry.value = normalise(&entry.value, paths);
        }
        model.encode_to_vec()
    } else {
        match String::from_utf8(bytes) {
            Ok(text) if path.ends_with("effir_export.json") => {
                let mut summary: serde_json::Value = serde_json::from_str(&text).unwrap();
                for varying in ["graph_bytes", "cpu_features"] {
                    summary
                        .as_object_mut()
                        .unwrap()
                        .remove(varying)
                        .unwrap_or_else(|| panic!("effir_export.json records {varying}"));
                }
                normalise(&serde_json::to_string_pretty(&summary).unwrap(), paths).into_bytes()
            }
            Ok(text) => normalise(&text, paths).into_bytes(),
            Err(e) => e.into_bytes(),
        }
    };
    blake3::hash(&normalised).to_hex().to_string()
}

/// `relative path -> hash` of every file under `dir`.
fn tree_hashes(dir: &Path, paths: &[(String, &str)]) -> BTreeMap<String, String> {
    common::files_under(dir)
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            (rel, file_hash(&path, paths))
        })
        .collect()
}

fn path_forms(path: &Path, placeholder: &'static str) -> Vec<(String, &'static str)> {
    let canonical = std::fs::canonicalize(path).unwrap();
    vec![
        (canonical.display().to_string(), placeholder),
        (path.display().to_string(), placeholder),
    ]
}

#[test]
fn prune_and_export_write_the_pinned_bytes_on_every_fixture() {
    let work = tempfile::tempdir().unwrap();
    // Outputs record their source relative to themselves: from a temporary
    // directory to the fixtures, that path climbs through this clone's
    // location, so its relative forms are placeholders too (replaced before
    // the absolute forms they contain).
    let mut paths = Vec::new();
    for arch in ARCHITECTURES {
        let fixture = common::fixture(arch);
        for output in [format!("{arch}-pruned"), format!("{arch}-onnx")] {
            let relative = relative_to(&work.path().join(output), &fixture);
            paths.push((relative.display().to_string(), "<fixture>"));
        }
    }
    paths.extend(path_forms(work.path(), "<work>"));
    for arch in ARCHITECTURES {
        paths.extend(path_forms(&common::fixture(arch), "<fixture>"));
    }
    let mut got: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for arch in ARCHITECTURES {
        let pruned = common::prune_fixture(
            arch,
            work.path(),
            &[
                "Dense retrieval with pruned MLPs.",
                "The quick brown fox jumps over the lazy dog, twice.",
                "Numbers 1 2 3 and unicode café naïve.",
            ],
            &["--drop-mlp", "1", "--mlp-keep", "0.5"],
        );
        let export = work.path().join(format!("{arch}-onnx"));
        let o = common::effir(&[
            "export",
            "--model",
            pruned.to_str().unwrap(),
            "--profile",
            "sentence-transformers",
            "--out",
            export.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "export {arch}: {}", common::stderr(&o));
        got.insert(format!("{arch}/prune"), tree_hashes(&pruned, &paths));
        got.insert(format!("{arch}/export"), tree_hashes(&export, &paths));
    }
    let pins = common::fixture(PINS);
    if std::env::var_os("EFFIR_UPDATE_PINS").is_some() {
        let text = serde_json::to_string_pretty(&got).unwrap();
        std::fs::write(&pins, format!("{text}\n")).unwrap();
        return;
    }
    let want: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_str(&std::fs::read_to_string(&pins).unwrap()).unwrap();
    for (output, files) in &want {
        let got_files = got
            .get(output)
            .unwrap_or_else(|| panic!("{output}: not written"));
        for (file, hash) in files {
            let got_hash = got_files
                .get(file)
                .unwrap_or_else(|| panic!("{output}/{file}: missing"));
            assert_eq!(got_hash, hash, "{output}/{file}: bytes changed");
        }
        let extra: Vec<_> = got_files
            .keys()
            .filter(|f| !files.contains_key(*f))
            .collect();
        assert!(extra.is_empty(), "{output}: files not pinned: {extra:?}");
    }
    assert_eq!(got.len(), want.len(), "outputs written");
}
