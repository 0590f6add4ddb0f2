//! A model stored as safetensors shards with `model.safetensors.index.json`
//! loads and embeds exactly like the single-file model.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{copy_model, fixture, load_tensors};
use effir_pipeline::{Embedder, LoadOptions, Prompt};

fn embed(dir: &std::path::Path) -> Vec<Vec<f32>> {
    let embedder = Embedder::load(dir, &LoadOptions::default()).unwrap();
    let texts = ["sharded weights", "hello world"];
    let out = embedder
        .embed(
            &texts,
            &embedder.prefix(&Prompt::None).unwrap(),
            2,
            &mut |_| {},
        )
        .unwrap();
    out.rows().into_iter().map(|r| r.to_vec()).collect()
}

#[test]
fn sharded_weights_equal_a_single_file() {
    let sharded = copy_model(&fixture("qwen3"));
    let single = sharded.path().join("model.safetensors");
    let tensors = load_tensors(&single);
    std::fs::remove_file(&single).unwrap();

    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, candle_core::Tensor>; 2] = Default::default();
    let mut weight_map = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert((*name).clone(), tensors[*name].clone());
        weight_map.insert(
            (*name).clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1),
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = sharded
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    assert_eq!(embed(sharded.path()), embed(&fixture("qwen3")));

    // A truncated shard is named in the error.
    let shard2 = sharded.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard2).unwrap();
    std::fs::write(&shard2, &bytes[..bytes.len() - 100]).unwrap();
    let err = Embedder::load(sharded.path(), &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}
