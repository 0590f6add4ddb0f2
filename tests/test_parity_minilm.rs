//! Parity of the real all-MiniLM-L6-v2 with sentence-transformers on 30
//! varied texts (empty, one word, unicode, numbers, mixed case, texts longer
//! than the 256-token limit).
//!
//! The model comes from `scripts/fetch-model.sh minilm` (`make models`); set
//! `EFFIR_MINILM_DIR` to use another copy. The reference embeddings were
//! written by `tests/fixtures/make_reference.py --minilm DIR`.

mod common;

use common::{assert_rows_match, fixture, load_tensors, minilm_dir, read_json};
use effir_pipeline::{Embedder, LoadOptions, Prompt};

#[test]
fn minilm_matches_sentence_transformers() {
    let reference = load_tensors(&fixture("minilm/reference.safetensors"));
    let meta = read_json(&fixture("minilm/reference.json"));
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let want: Vec<Vec<f32>> = reference["embedding"].to_vec2().unwrap();

    let embedder = Embedder::load(&minilm_dir(), &LoadOptions::default()).unwrap();
    assert_eq!(
        embedder.text_encoder().max_length(),
        meta["max_seq_length"].as_u64().unwrap() as usize
    );
    let prefix = embedder.prefix(&Prompt::Default).unwrap();
    let got = embedder.embed(&texts, &prefix, 8, &mut |_| {}).unwrap();
    let got: Vec<Vec<f32>> = got.rows().into_iter().map(|r| r.to_vec()).collect();
    assert_rows_match("all-MiniLM-L6-v2", &got, &want);
}
