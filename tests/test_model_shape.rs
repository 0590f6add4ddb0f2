//! Per-layer model shapes (`effir_shape.json`): a layer's MLP may be absent
//! and each MLP may have its own width, and the loaded model must compute
//! exactly what the full model computes with the same parts switched off.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use common::{copy_model, edit_weights, fixture};
use effir_pipeline::model::arch::{MlpTensors, ModelConfig};
use effir_pipeline::{Embedder, LoadOptions, MlpShape, ModelShape, Prompt};

/// Stricter than parity with PyTorch: same arithmetic, different weights layout.
const SAME: f32 = 1e-5;

const TEXTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello world",
    "Numbers 12 345 and symbols % & $ appear here.",
];

fn embed(dir: &Path) -> Vec<Vec<f32>> {
    let embedder = Embedder::load(dir, &LoadOptions::default()).unwrap();
    let prefix = embedder.prefix(&Prompt::None).unwrap();
    let out = embedder.embed(&TEXTS, &prefix, 2, &mut |_| {}).unwrap();
    out.rows().into_iter().map(|r| r.to_vec()).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn uniform_shape(dir: &Path) -> ModelShape {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    config.uniform_shape()
}

/// Layer `i`'s MLP tensors as the architecture's checkpoint map names them
/// (the ones the fixture holds: biases and norms vary by architecture).
fn mlp_keys(arch: &str, i: usize) -> MlpTensors {
    let dir = fixture(arch);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let names: Vec<String> = common::load_tensors(&dir.join("model.safetensors"))
        .into_keys()
        .collect();
    let map = config.checkpoint();
    let mut keys = map.mlp_tensors(map.prefix(names.iter()), i);
    keys.rows.retain(|n| names.contains(n));
    keys.others.retain(|n| names.contains(n));
    assert!(
        !keys.rows.is_empty() && !keys.others.is_empty() && names.contains(&keys.down),
        "{arch}: the checkpoint map names tensors the fixture lacks: {keys:?}"
    );
    keys
}

#[test]
fn a_uniform_shape_file_changes_nothing() {
    for arch in ["bert", "llama", "gemma3"] {
        let original = fixture(arch);
        let copy = copy_model(&original);
        uniform_shape(&original).save(copy.path()).unwrap();
        assert_eq!(embed(&original), embed(copy.path()), "{arch}");
    }
}

/// Dropping MLP 1 of a pre-norm decoder equals zeroing its output projection:
/// the sub-layer then adds nothing to the residual stream.
#[test]
fn a_dropped_mlp_equals_a_zeroed_mlp_branch() {
    for arch in ["llama", "gemma3"] {
        let keys = mlp_keys(arch, 1);
        let zeroed = copy_model(&fixture(arch));
        edit_weights(zeroed.path(), |w| {
            let down = w[&keys.down].zeros_like().unwrap();
            w.insert(keys.down.clone(), down);
        });
        let dropped = copy_model(&fixture(arch));
        let mut shape = uniform_shape(&fixture(arch));
        shape.layers[1].mlp = None;
        shape.save(dropped.path()).unwrap();
        // The dropped model's file no longer holds the MLP's tensors at all.
        edit_weights(dropped.path(), |w| {
            for key in keys.rows.iter().chain([&keys.down]).chain(&keys.others) {
                assert!(w.remove(key).is_some(), "{arch}: no tensor {key}");
            }
        });
        let (a, b) = (embed(zeroed.path()), embed(dropped.path()));
        let full = embed(&fixture(arch));
        assert!(
            max_diff(&a, &b) <= SAME,
            "{arch}: dropped vs zeroed differ by {}",
            max_diff(&a, &b)
        );
        assert!(
            max_diff(&full, &b) > 1e-3,
            "{arch}: dropping an MLP changed nothing"
        );
    }
}

/// BERT is post-LayerNorm: a dropped MLP takes its output LayerNorm with it,
/// so the layer ends at the attention block. The model loads without the
/// MLP's tensors and computes something different from the full model.
#[test]
fn bert_loads_and_runs_without_an_mlp() {
    let keys = mlp_keys("bert", 2);
    let dropped = copy_model(&fixture("bert"));
    let mut shape = uniform_shape(&fixture("bert"));
    shape.layers[2].mlp = None;
    shape.save(dropped.path()).unwrap();
    edit_weights(dropped.path(), |w| {
        for key in keys.rows.iter().chain([&keys.down]).chain(&keys.others) {
            assert!(w.remove(key).is_some(), "no tensor {key}");
        }
    });
    let embedder = Embedder::load(dropped.path(), &LoadOptions::default()).unwrap();
    let params = embedder.parameters();
    assert_eq!(params.layers[2].mlp, 0);
    assert!(params.layers[1].mlp > 0);
    assert!(max_diff(&embed(&fixture("bert")), &embed(dropped.path())) > 1e-3);
}

/// Narrowing an MLP to a subset of its neurons equals masking the other
/// neurons (zeroing their columns of the output projection).
#[test]
fn a_narrowed_mlp_equals_masked_neurons() {
    for arch in ["bert", "llama", "gemma3"] {
        let keys = mlp_keys(arch, 0);
        let full_width = uniform_shape(&fixture(arch)).layers[0]
            .mlp
            .unwrap()
            .intermediate_size;
        // Keep every third neuron and the last one: not a prefix, not contiguous.
        let kept: Vec<u32> = (0..full_width as u32)
            .filter(|n| n % 3 == 0 || *n == full_width as u32 - 1)
            .collect();
        let keep_mask: Vec<f32> = (0..full_width as u32)
            .map(|n| kept.contains(&n) as u8 as f32)
            .collect();

        let masked = copy_model(&fixture(arch));
        edit_weights(masked.path(), |w| {
            let mask = Tensor::new(keep_mask.as_slice(), &candle_core::Device::Cpu).unwrap();
            let down = w[&keys.down]
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_mul(&mask.unsqueeze(0).unwrap())
                .unwrap();
            w.insert(keys.down.clone(), down);
        });

        let narrowed = copy_model(&fixture(arch));
        let mut shape = uniform_shape(&fixture(arch));
        shape.layers[0].mlp = Some(MlpShape {
            intermediate_size: kept.len(),
        });
        shape.save(narrowed.path()).unwrap();
        edit_weights(narrowed.path(), |w| {
            let index = Tensor::new(kept.as_slice(), &candle_core::Device::Cpu).unwrap();
            for key in &keys.rows {
                let sliced = w[key].index_select(&index, 0).unwrap();
                w.insert(key.clone(), sliced);
            }
            let sliced = w[&keys.down].index_select(&index, 1).unwrap();
            w.insert(keys.down.clone(), sliced);
        });

        let (a, b) = (embed(masked.path()), embed(narrowed.path()));
        assert!(
            max_diff(&a, &b) <= SAME,
            "{arch}: narrowed vs masked differ by {}",
            max_diff(&a, &b)
        );
        let embedder = Embedder::load(narrowed.path(), &LoadOptions::default()).unwrap();
        assert_eq!(
            embedder.parameters().layers[0].mlp_width,
            Some(kept.len()),
            "{arch}"
        );
    }
}

#[test]
fn a_shape_file_for_another_layer_count_is_rejected() {
    let copy = copy_model(&fixture("llama"));
    let mut shape = uniform_shape(&fixture("llama"));
    shape.layers.pop();
    shape.save(copy.path()).unwrap();
    let err = Embedder::load(copy.path(), &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("effir_shape.json") && err.contains("2 layers but config.json has 3"),
        "{err}"
    );
}
