//! `effir import-gguf`: a llama.cpp GGUF file becomes a Hugging Face
//! directory whose weights, tokenizer and forward pass match what code
//! effir does not control makes of the same file.
//!
//! The fixtures (`tests/fixtures/make_gguf.py`) were written with llama.cpp's
//! `gguf` Python package; their references come from that package's
//! dequantization and from transformers' own GGUF loader.

mod common;

use std::path::{Path, PathBuf};

use common::{effir, fixture, load_tensors, read_json, stderr};
use effir_pipeline::import::gguf_file::{GgufFile, TensorType};
use effir_pipeline::{Embedder, LoadOptions};

fn gguf(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

fn import(file: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "import-gguf",
        "--gguf",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = effir(&args);
    assert!(
        run.status.success(),
        "import-gguf {}: {}",
        file.display(),
        stderr(&run)
    );
}

/// Each tensor of fixture `name`.gguf, dequantized by effir and by the
/// `gguf` package (`name`-reference.safetensors).
fn dequantized_with_reference(
    name: &str,
) -> Vec<(
    effir_pipeline::import::gguf_file::TensorInfo,
    Vec<f32>,
    Vec<f32>,
)> {
    let file = GgufFile::open(&gguf(&format!("{name}.gguf"))).unwrap();
    let reference = load_tensors(&gguf(&format!("{name}-reference.safetensors")));
    file.tensors
        .iter()
        .map(|info| {
            let want = reference[&info.name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (info.clone(), file.dequantize(info).unwrap(), want)
        })
        .collect()
}

#[test]
fn every_supported_type_dequantizes_as_the_gguf_package_does() {
    let mut seen: Vec<TensorType> = Vec::new();
    for (info, got, want) in dequantized_with_reference("types") {
        assert_eq!(got.len(), want.len(), "{}", info.name);
        // Both compute scale × quant in f32 from the same bytes: equal up to
        // the last bit of the f32 product order (numpy may fuse differently).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tolerance = 1e-6 * w.abs().max(1.0);
            assert!(
                (g - w).abs() <= tolerance,
                "{} ({}): element {i}: {g} against {w}",
                info.name,
                info.ty
            );
        }
        seen.push(info.ty);
    }
    seen.sort();
    assert_eq!(
        seen,
        TensorType::ALL.to_vec(),
        "the fixture holds every supported type once"
    );
}

/// Imports `arch`'s fixture and compares effir's tokenizer and forward pass
/// with transformers' on the same GGUF file.
fn check_against_transformers(arch: &str, expect_unpermuted: usize) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join(arch);
    import(&gguf(&format!("{arch}.gguf")), &out, &[]);
    let record = read_json(&out.join("effir_import.json"));
    assert_eq!(
        record["unpermuted"], expect_unpermuted,
        "{arch}: query/key projections unpermuted"
    );

    let meta = read_json(&gguf(&format!("{arch}-reference.json")));
    let reference = load_tensors(&gguf(&format!("{arch}-reference.safetensors")));
    let eos = meta["eos_token_id"].as_u64().unwrap() as u32;
    let embedder = Embedder::load(&out, &LoadOptions::default()).unwrap();
    let texts: Vec<String> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().into())
        .collect();
    let mut lowest = f64::INFINITY;
    for (i, text) in texts.iter().enumerate() {
        // 1. Same token ids (effir appends EOS for last-token pooling).
        let mut want_ids: Vec<u32> = meta["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        want_ids.push(eos);
        let encoded = embedder
            .encode_texts(std::slice::from_ref(text), "")
            .unwrap();
        let input = embedder.batch(&[&encoded[0]]).unwrap();
        let got_ids: Vec<u32> = input.input_ids.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(got_ids, want_ids, "{arch}: token ids of {text:?}");

        // 2. Same last hidden state on every token.
        let hidden: Vec<Vec<f32>> = embedder
            .hidden_states(&input)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want: Vec<Vec<f32>> = reference[&format!("hidden.{i}")].to_vec2().unwrap();
        assert_eq!(hidden.len(), want.len(), "{arch}: tokens of {text:?}");
        for (t, (g, w)) in hidden.iter().zip(&want).enumerate() {
            let cos = common::cosine(g, w);
            lowest = lowest.min(cos);
            assert!(
                cos >= common::MIN_COSINE,
                "{arch}: {text:?} token {t}: cosine {cos:.7}"
            );
        }

        // 3. The embedding is the last token's state (normalised or not).
        let embedding: Vec<Vec<f32>> = embedder.embed_batch(&input).unwrap().to_vec2().unwrap();
        let cos = common::cosine(&embedding[0], want.last().unwrap());
        assert!(
            cos >= common::MIN_COSINE,
            "{arch}: embedding of {text:?}: cosine {cos:.7}"
        );
    }
    eprintln!("{arch}: lowest per-token cosine against transformers {lowest:.9}");
}

#[test]
fn a_llama_file_with_permuted_query_and_key_matches_transformers() {
    check_against_transformers("llama", 4);
}

#[test]
fn a_qwen2_file_with_biases_and_an_untied_output_matches_transformers() {
    check_against_transformers("qwen2", 0);
}

#[test]
fn a_qwen3_file_with_query_key_norms_and_a_wide_head_matches_transformers() {
    check_against_transformers("qwen3", 0);
}

#[test]
fn the_imported_directory_is_an_ordinary_hugging_face_model() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("llama-bf16");
    import(&gguf("llama.gguf"), &out, &["--dtype", "bf16"]);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["model_type"], "llama");
    assert_eq!(
        config["rms_norm_eps"], 1e-5,
        "f32 metadata written as its shortest decimal"
    );
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["torch_dtype"], "bfloat16");
    let weights = load_tensors(&out.join("model.safetensors"));
    assert!(weights
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    assert!(weights.contains_key("model.layers.1.self_attn.q_proj.weight"));
    assert!(
        !weights.contains_key("lm_head.weight"),
        "tied: no separate output projection"
    );
    let tokenizer_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
    assert!(tokenizer_config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let record = read_json(&out.join("effir_import.json"));
    assert_eq!(record["source"], "llama.gguf");
    assert_eq!(record["pre_tokenizer"], "smollm");
    // Every stage reads it: inspect here, the forward pass above.
    let inspect = effir(&["inspect", "--model", out.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));

    let qwen = work.path().join("qwen2");
    import(&gguf("qwen2.gguf"), &qwen, &[]);
    assert!(load_tensors(&qwen.join("model.safetensors")).contains_key("lm_head.weight"));
}

/// `import-gguf` on `file` fails naming `needles`, and writes nothing.
fn assert_refused(file: &Path, needles: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = effir(&[
        "import-gguf",
        "--gguf",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let message = stderr(&run);
    assert!(!run.status.success(), "{} was accepted", file.display());
    assert!(
        message.contains(&file.display().to_string()),
        "the error names the file: {message}"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "the error names {needle:?}: {message}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing written, found {left:?}");
}

#[test]
fn bad_files_are_refused_by_name_and_nothing_is_written() {
    let work = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("llama.gguf")).unwrap();

    let truncated = work.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5000]).unwrap();
    assert_refused(&truncated, &["runs past the end of the file", "truncated"]);
    let header_only = work.path().join("header-only.gguf");
    std::fs::write(&header_only, &bytes[..20]).unwrap();
    assert_refused(&header_only, &["truncated"]);

    assert_refused(
        &gguf("unsupported-type.gguf"),
        &["blk.0.ffn_up.weight", "IQ4_NL", "does not dequantize"],
    );
    assert_refused(
        &gguf("unknown-arch.gguf"),
        &["mamba", "llama, qwen2, qwen3"],
    );

    // The tensor count sits at bytes 8..16 of the header.
    let count = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    for wrong in [count - 1, count + 1] {
        let mut edited = bytes.clone();
        edited[8..16].copy_from_slice(&wrong.to_le_bytes());
        let path = work.path().join(format!("count-{wrong}.gguf"));
        std::fs::write(&path, edited).unwrap();
        assert_refused(&path, &["tensor"]);
        let message = stderr(&effir(&[
            "import-gguf",
            "--gguf",
            path.to_str().unwrap(),
            "--out",
            work.path().join("x").to_str().unwrap(),
        ]));
        assert!(
            message.contains(&format!("{wrong}")) || message.contains("tensor count"),
            "{message}"
        );
    }

    let not_gguf = work.path().join("not.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 a zip file").unwrap();
    assert_refused(&not_gguf, &["not a GGUF file"]);
}

/// `general.alignment` 1 puts tensors at any address (an f32 tensor 2
/// bytes past a multiple of 4 here): read without assuming alignment.
#[test]
fn tensors_at_unaligned_addresses_read_correctly() {
    for (info, got, want) in dequantized_with_reference("align1") {
        assert_eq!(got, want, "{}", info.name);
    }
}

/// A one-byte change that claims millions of layers is refused at once,
/// before any per-layer bookkeeping is allocated.
#[test]
fn a_layer_count_the_file_cannot_hold_is_refused() {
    let mut bytes = std::fs::read(gguf("llama.gguf")).unwrap();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // value type (u32 = 4), then the value.
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4);
    bytes[at + 4..at + 8].copy_from_slice(&8_388_610u32.to_le_bytes());
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("layers.gguf");
    std::fs::write(&path, bytes).unwrap();
    assert_refused(&path, &["8388610 layers", "too few"]);
}
