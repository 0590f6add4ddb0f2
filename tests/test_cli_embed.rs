//! `effir embed` and `effir inspect` as a user runs them: outputs on success,
//! and on bad input a clear error naming the file, a non-zero exit and no
//! output file.

mod common;

use std::path::Path;
use std::process::Output;

use common::{copy_model, edit_weights, effir, fixture, stderr};

/// Runs `effir embed` on `model` and `input`; returns the process output and
/// whether the output file exists afterwards.
fn embed(model: &Path, input: &Path, output: &Path) -> (Output, bool) {
    let out = effir(&[
        "embed",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    (out, output.exists())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Asserts the run failed, said every `needles`, and wrote nothing.
fn assert_fails(result: (Output, bool), needles: &[&str]) {
    let (out, written) = result;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!written, "an output file was written despite the error");
}

#[test]
fn embeds_jsonl_into_npy_and_lines_into_jsonl() {
    let work = tempfile::tempdir().unwrap();
    let jsonl = write(
        work.path(),
        "in.jsonl",
        b"{\"text\": \"hello world\"}\n\n{\"text\": \"\"}\n{\"text\": \"a b c\"}\n",
    );
    let npy = work.path().join("out.npy");
    let (out, written) = embed(&fixture("bert"), &jsonl, &npy);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(written);
    let bytes = std::fs::read(&npy).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'shape': (3, 64)"), "{header}");
    assert_eq!(bytes.len(), 10 + header_len + 3 * 64 * 4);

    let lines = write(work.path(), "in.txt", "hello world\n\na b c\n".as_bytes());
    let jsonl_out = work.path().join("out.jsonl");
    let (out, _) = embed(&fixture("bert"), &lines, &jsonl_out);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&jsonl_out).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["index"], 2);
    assert_eq!(rows[2]["embedding"].as_array().unwrap().len(), 64);
}

#[test]
fn the_shipped_config_is_valid() {
    let work = tempfile::tempdir().unwrap();
    let input = write(work.path(), "in.txt", b"hello\n");
    let output = work.path().join("out.npy");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/embed.yaml");
    let out = effir(&[
        "embed",
        "--quiet",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(output.exists());
}

#[test]
fn inspect_reports_layers_and_parameters() {
    let out = effir(&[
        "inspect",
        "--json",
        "--model",
        fixture("llama").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["architecture"], "llama");
    assert_eq!(report["layers"], 3);
    assert_eq!(report["embedding_dimension"], 64);
    // Llama layer: q,k,v,o (4 * 64*64) + input norm (64); MLP: 3 * 64*96 + pre-MLP norm (64).
    assert_eq!(
        report["parameters"]["layers"][0]["attention"],
        4 * 64 * 64 + 64
    );
    assert_eq!(report["parameters"]["layers"][0]["mlp"], 3 * 64 * 96 + 64);
}

#[test]
fn unknown_prompt_lists_the_available_ones() {
    let work = tempfile::tempdir().unwrap();
    let input = write(work.path(), "in.txt", b"hello\n");
    let output = work.path().join("out.npy");
    let out = effir(&[
        "embed",
        "--quiet",
        "--model",
        fixture("gemma3").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--prompt",
        "passage",
    ]);
    assert_fails((out, output.exists()), &["passage", "document, query"]);
}

#[test]
fn bad_input_files_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("out.npy");
    let model = fixture("bert");

    let empty = write(work.path(), "empty.txt", b"");
    assert_fails(embed(&model, &empty, &output), &["empty.txt", "no text"]);

    let blank_jsonl = write(work.path(), "blank.jsonl", b"\n\n");
    assert_fails(
        embed(&model, &blank_jsonl, &output),
        &["blank.jsonl", "no text"],
    );

    let latin1 = write(work.path(), "latin1.txt", b"fine\ncaf\xe9\n");
    assert_fails(embed(&model, &latin1, &output), &["latin1.txt:2", "UTF-8"]);

    let malformed = write(
        work.path(),
        "bad.jsonl",
        b"{\"text\": \"ok\"}\n{\"txt\": 1}\n",
    );
    assert_fails(embed(&model, &malformed, &output), &["bad.jsonl:2", "text"]);

    let missing = work.path().join("nope.txt");
    assert_fails(embed(&model, &missing, &output), &["nope.txt", "not found"]);
}

#[test]
fn bad_model_directories_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let input = write(work.path(), "in.txt", b"hello\n");
    let output = work.path().join("out.npy");

    let no_config = copy_model(&fixture("bert"));
    std::fs::remove_file(no_config.path().join("config.json")).unwrap();
    assert_fails(
        embed(no_config.path(), &input, &output),
        &["config.json", "not found"],
    );

    let malformed = copy_model(&fixture("bert"));
    write(
        malformed.path(),
        "config.json",
        b"{\"model_type\": \"bert\", \"hidden_size\": ",
    );
    assert_fails(
        embed(malformed.path(), &input, &output),
        &["config.json", "malformed JSON"],
    );

    let unknown = copy_model(&fixture("bert"));
    write(unknown.path(), "config.json", b"{\"model_type\": \"t5\"}");
    assert_fails(
        embed(unknown.path(), &input, &output),
        &[
            "config.json",
            "`t5`",
            "bert, gemma3_text, llama, mistral, qwen2, qwen3",
        ],
    );

    let truncated = copy_model(&fixture("bert"));
    let weights = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        embed(truncated.path(), &input, &output),
        &["model.safetensors", "invalid safetensors"],
    );

    let missing_tensor = copy_model(&fixture("bert"));
    edit_weights(missing_tensor.path(), |w| {
        w.remove("encoder.layer.1.attention.self.key.weight")
            .unwrap();
    });
    assert_fails(
        embed(missing_tensor.path(), &input, &output),
        &["encoder.layer.1.attention.self.key.weight"],
    );

    let wrong_shape = copy_model(&fixture("bert"));
    edit_weights(wrong_shape.path(), |w| {
        let t = w["encoder.layer.0.intermediate.dense.weight"]
            .narrow(0, 0, 10)
            .unwrap();
        w.insert("encoder.layer.0.intermediate.dense.weight".into(), t);
    });
    assert_fails(
        embed(wrong_shape.path(), &input, &output),
        &["encoder.layer.0.intermediate.dense.weight", "shape"],
    );

    let bad_tokenizer = copy_model(&fixture("bert"));
    write(
        bad_tokenizer.path(),
        "tokenizer.json",
        b"{\"version\": \"1.0\", \"model\": 42}",
    );
    assert_fails(
        embed(bad_tokenizer.path(), &input, &output),
        &["tokenizer.json"],
    );

    // A template naming a special token the file does not define: the
    // tokenizers library accepts it and panics on the first encoding. The
    // panic is caught and reported as an error about the file, and its
    // message and backtrace are not printed (`assert_fails` checks).
    let crashing_tokenizer = copy_model(&fixture("bert"));
    let path = crashing_tokenizer.path().join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tokenizer["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[UNDEFINED]", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {},
    });
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    assert_fails(
        embed(crashing_tokenizer.path(), &input, &output),
        &["tokenizer.json", "crashes on encoding"],
    );

    let bad_shape = copy_model(&fixture("bert"));
    write(bad_shape.path(), "effir_shape.json", b"{\"layers\": []}");
    assert_fails(
        embed(bad_shape.path(), &input, &output),
        &["effir_shape.json"],
    );
}

#[test]
fn a_failed_run_keeps_an_existing_output_intact() {
    let work = tempfile::tempdir().unwrap();
    let output = write(work.path(), "out.npy", b"previous result");
    let empty = write(work.path(), "empty.txt", b"");
    let (out, _) = embed(&fixture("bert"), &empty, &output);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&output).unwrap(), b"previous result");
}
