//! The common failures are typed, so callers and tests can act on them:
//! each test provokes one and matches its variant, not its message.

mod common;

use std::error::Error as _;

use common::{copy_model, edit_weights, fixture};
use effir_onnx::emit::{emit_model, EmitOptions};
use effir_onnx::providers::ProviderSettings;
use effir_pipeline::compress::prune::{CoarsePlan, PrunePlan};
use effir_pipeline::model::arch::ModelConfig;
use effir_pipeline::{Embedder, Error, LoadOptions};

/// The down projection of layer 1's MLP, as the fixture's checkpoint names it.
fn down_projection(dir: &std::path::Path) -> String {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let names: Vec<String> = common::load_tensors(&dir.join("model.safetensors"))
        .into_keys()
        .collect();
    let map = config.checkpoint();
    map.mlp_tensors(map.prefix(names.iter()), 1).down
}

#[test]
fn a_missing_tensor_is_named() {
    for arch in ["bert", "llama"] {
        let model = copy_model(&fixture(arch));
        let down = down_projection(model.path());
        edit_weights(model.path(), |w| {
            w.remove(&down).unwrap();
        });
        match emit_model(model.path(), &EmitOptions::default()) {
            Err(effir_onnx::Error::Pipeline(Error::MissingTensor { tensor, .. })) => {
                assert_eq!(tensor, down, "{arch}")
            }
            other => panic!("{arch}: expected MissingTensor, got {other:?}"),
        }
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_a_shape_mismatch() {
    let model = copy_model(&fixture("qwen2"));
    let down = down_projection(model.path());
    edit_weights(model.path(), |w| {
        let t = w[&down].narrow(1, 0, 8).unwrap();
        w.insert(down.clone(), t);
    });
    match emit_model(model.path(), &EmitOptions::default()) {
        Err(effir_onnx::Error::Pipeline(Error::ShapeMismatch {
            tensor,
            expected,
            got,
            ..
        })) => {
            assert_eq!(tensor, down);
            assert_eq!(got[1], 8);
            assert_ne!(expected, got);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn an_unknown_model_type_is_an_unsupported_architecture() {
    let model = copy_model(&fixture("llama"));
    let path = model.path().join("config.json");
    let mut config = common::read_json(&path);
    config["model_type"] = "gpt2".into();
    std::fs::write(&path, config.to_string()).unwrap();
    match ModelConfig::from_file(&path) {
        Err(Error::UnsupportedArchitecture {
            model_type,
            supported,
            ..
        }) => {
            assert_eq!(model_type, "gpt2");
            assert!(supported.contains("llama") && supported.contains("bert"));
        }
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn a_plan_the_model_cannot_carry_is_an_invalid_plan() {
    let embedder = Embedder::load(&fixture("llama"), &LoadOptions::default()).unwrap();
    let plan = PrunePlan {
        coarse: CoarsePlan {
            layers: Some(vec![7]),
            ..Default::default()
        },
        ..Default::default()
    };
    match plan.validate(embedder.shape()) {
        Err(Error::InvalidPlan(message)) => assert!(message.contains("layer 7"), "{message}"),
        other => panic!("expected InvalidPlan, got {other:?}"),
    }
}

#[test]
fn an_onnx_runtime_failure_keeps_its_source() {
    let work = tempfile::tempdir().unwrap();
    let graph = work.path().join("model.onnx");
    std::fs::write(&graph, b"not a protobuf").unwrap();
    match effir_onnx::session::open_session(&graph, &ProviderSettings::default(), &[]) {
        Err(error @ effir_onnx::Error::Runtime { .. }) => {
            assert!(error.source().is_some(), "{error}");
            assert!(error.to_string().contains("model.onnx"), "{error}");
        }
        Err(other) => panic!("expected Runtime, got {other:?}"),
        Ok(_) => panic!("a corrupt graph opened"),
    }
}
