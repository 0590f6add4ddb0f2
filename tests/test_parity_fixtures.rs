//! Parity of effir's model code with Hugging Face transformers and
//! sentence-transformers, on tiny random-weight models of every architecture.
//!
//! `tests/fixtures/make_reference.py` saved each model with `save_pretrained`
//! and the reference: the padded batch it ran, the last hidden state and the
//! pooled, normalised embedding. For each architecture effir must
//! 1. tokenize the texts (with the fixture's prompt) into the same ids, padded
//!    on the same side;
//! 2. produce the same last hidden state on every non-padding token;
//! 3. produce the same embeddings;
//! 4. give each text the same embedding alone as in the padded batch.

mod common;

use common::{assert_rows_match, fixture, load_tensors, read_json};
use effir_pipeline::{Embedder, LoadOptions, Prompt};

fn check_parity(name: &str) {
    let dir = fixture(name);
    let reference = load_tensors(&dir.join("reference.safetensors"));
    let meta = read_json(&dir.join("reference.json"));
    let texts: Vec<String> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let prompt = match meta["prompt"].as_str() {
        Some(name) => Prompt::Named(name.to_string()),
        None => Prompt::None,
    };

    let embedder = Embedder::load(&dir, &LoadOptions::default()).unwrap();
    let prefix = embedder.prefix(&prompt).unwrap();
    let encoded = embedder.encode_texts(&texts, &prefix).unwrap();
    let batch: Vec<_> = encoded.iter().collect();
    let input = embedder.batch(&batch).unwrap();

    // 1. Same token ids, same padding.
    let want_ids: Vec<Vec<i64>> = reference["input_ids"].to_vec2().unwrap();
    let want_mask: Vec<Vec<i64>> = reference["attention_mask"].to_vec2().unwrap();
    let got_ids: Vec<Vec<u32>> = input.input_ids.to_vec2().unwrap();
    let got_mask: Vec<Vec<u32>> = input.attention_mask.to_vec2().unwrap();
    for row in 0..texts.len() {
        let as_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
        assert_eq!(
            want_mask[row],
            as_i64(&got_mask[row]),
            "{name}: attention mask of text {row}"
        );
        let real = |ids: &[i64], mask: &[i64]| -> Vec<i64> {
            ids.iter()
                .zip(mask)
                .filter(|(_, m)| **m == 1)
                .map(|(i, _)| *i)
                .collect()
        };
        assert_eq!(
            real(&want_ids[row], &want_mask[row]),
            real(&as_i64(&got_ids[row]), &want_mask[row]),
            "{name}: token ids of text {row}"
        );
    }

    // 2. Same last hidden state on real tokens.
    let hidden = embedder.hidden_states(&input).unwrap();
    let want_hidden = &reference["last_hidden_state"];
    assert_eq!(
        hidden.dims(),
        want_hidden.dims(),
        "{name}: hidden state shape"
    );
    let mut got_tokens = Vec::new();
    let mut want_tokens = Vec::new();
    for (row, mask) in want_mask.iter().enumerate() {
        for (pos, _) in mask.iter().enumerate().filter(|(_, m)| **m == 1) {
            let token = |t: &candle_core::Tensor| {
                t.get(row)
                    .unwrap()
                    .get(pos)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            got_tokens.push(token(&hidden));
            want_tokens.push(token(want_hidden));
        }
    }
    assert_rows_match(&format!("{name} hidden states"), &got_tokens, &want_tokens);

    // 3. Same embeddings.
    let got: Vec<Vec<f32>> = embedder.embed_batch(&input).unwrap().to_vec2().unwrap();
    let want: Vec<Vec<f32>> = reference["embedding"].to_vec2().unwrap();
    assert_rows_match(&format!("{name} embeddings"), &got, &want);

    // 4. Batched == single, through the public `embed`.
    let batched = embedder
        .embed(&texts, &prefix, texts.len(), &mut |_| {})
        .unwrap();
    let single = embedder.embed(&texts, &prefix, 1, &mut |_| {}).unwrap();
    let rows =
        |a: &ndarray::Array2<f32>| a.rows().into_iter().map(|r| r.to_vec()).collect::<Vec<_>>();
    assert_rows_match(
        &format!("{name} batched vs reference"),
        &rows(&batched),
        &want,
    );
    assert_rows_match(
        &format!("{name} single vs batched"),
        &rows(&single),
        &rows(&batched),
    );
}

#[test]
fn bert_matches_transformers() {
    check_parity("bert");
}

#[test]
fn gemma3_bidirectional_sliding_window_matches_transformers() {
    check_parity("gemma3");
}

#[test]
fn llama_tied_embeddings_matches_transformers() {
    check_parity("llama");
}

#[test]
fn qwen2_biases_left_padding_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check_parity("qwen3");
}

#[test]
fn mistral_causal_sliding_window_matches_transformers() {
    check_parity("mistral");
}
