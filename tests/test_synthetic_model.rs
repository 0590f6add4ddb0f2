//! The synthetic models of `examples/synthetic_model.rs`: a named shape
//! becomes a sharded bf16 checkpoint every stage reads, the same bytes for
//! the same seed.

mod common;

use effir_pipeline::model::synthetic::{write_synthetic_model, SyntheticShape};
use effir_pipeline::{Embedder, LoadOptions};

#[test]
fn a_synthetic_model_is_sharded_bf16_that_effir_loads_and_repeats_exactly() {
    let work = tempfile::tempdir().unwrap();
    let shape = SyntheticShape::named("tiny").unwrap();
    let out = work.path().join("tiny");
    // Shards of at most 512 kB: the tiny model needs several.
    let bytes = write_synthetic_model(&shape, &out, 512 << 10, 7).unwrap();
    assert_eq!(bytes, 2 * shape.parameters() as u64);
    let index = common::read_json(&out.join("model.safetensors.index.json"));
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "one shard: {shards:?}");
    for shard in &shards {
        let tensors = common::load_tensors(&out.join(shard));
        assert!(tensors
            .values()
            .all(|t| t.dtype() == candle_core::DType::BF16));
    }

    let embedder = Embedder::load(&out, &LoadOptions::default()).unwrap();
    assert_eq!(embedder.dimension(), 128);
    let e = embedder
        .embed(&["a text", "another text"], "", 2, &mut |_| {})
        .unwrap();
    assert!(e.iter().all(|v| v.is_finite()));

    // The same seed gives the same bytes; another seed other weights.
    let again = work.path().join("again");
    write_synthetic_model(&shape, &again, 512 << 10, 7).unwrap();
    let other = work.path().join("other");
    write_synthetic_model(&shape, &other, 512 << 10, 8).unwrap();
    for shard in &shards {
        let a = std::fs::read(out.join(shard)).unwrap();
        assert_eq!(a, std::fs::read(again.join(shard)).unwrap(), "{shard}");
        assert_ne!(a, std::fs::read(other.join(shard)).unwrap(), "{shard}");
    }
    // The paper-scale shapes are the issue's.
    let mistral = SyntheticShape::named("mistral-7b").unwrap();
    assert_eq!(
        (
            mistral.hidden,
            mistral.layers,
            mistral.intermediate,
            mistral.heads,
            mistral.kv_heads,
            mistral.vocab
        ),
        (4096, 32, 14336, 32, 8, 32000)
    );
    assert!(
        (7.2e9..7.3e9).contains(&(mistral.parameters() as f64)),
        "{}",
        mistral.parameters()
    );
    let llama = SyntheticShape::named("llama-3b").unwrap();
    assert_eq!(
        (
            llama.hidden,
            llama.layers,
            llama.intermediate,
            llama.heads,
            llama.kv_heads,
            llama.vocab
        ),
        (3072, 28, 8192, 24, 8, 128256)
    );
}
