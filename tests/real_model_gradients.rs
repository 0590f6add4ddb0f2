//! The label-free distillation loss's gradient on a real model, checked
//! against finite differences (the fixtures' check in `test_distill.rs`
//! covers tiny random models). Not in `make test`: it needs a pruned
//! EmbeddingGemma and its teacher on disk, and a few minutes.
//!
//! ```sh
//! EFFIR_GRAD_STUDENT=runs/embeddinggemma-prune-25-refit EFFIR_GRAD_TEACHER=models/embeddinggemma-300m \
//!   cargo test --release --test real_model_gradients -- --ignored --nocapture
//! ```
//!
//! For each weight it prints the loss, the gradient's norm and the
//! derivative along the gradient measured with steps of 0.1 % and 1 % of
//! the weight's norm: how far the loss stays linear, which is what a
//! learning rate has to respect.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use effir_pipeline::data::beir::load_corpus;
use effir_pipeline::finetune::trainer::distillation_loss_of_texts;
use effir_pipeline::finetune::{EmbeddingDistillationSettings, FinetuneConfig, Objective};
use effir_pipeline::{Embedder, LoadOptions};

const WEIGHTS: &[&str] = &[
    "layers.10.mlp.up_proj.weight",
    "layers.20.mlp.down_proj.weight",
    "layers.10.self_attn.q_proj.weight",
    "layers.3.self_attn.v_proj.weight",
    "layers.22.self_attn.o_proj.weight",
    "layers.5.pre_feedforward_layernorm.weight",
];

fn path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

#[test]
#[ignore]
fn distillation_gradients_on_a_real_model_match_finite_differences() {
    let student = path("EFFIR_GRAD_STUDENT", "runs/embeddinggemma-prune-25-refit");
    let teacher_dir = path("EFFIR_GRAD_TEACHER", "models/embeddinggemma-300m");
    // Six SciFact abstracts in EmbeddingGemma's document format.
    let texts: Vec<String> = load_corpus(&path("EFFIR_GRAD_DATA", "data/scifact"))
        .unwrap()
        .into_iter()
        .take(6)
        .map(|d| format!("title: {} | text: {}", d.title, d.text))
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let options = LoadOptions {
        max_length: Some(256),
        ..Default::default()
    };
    let teacher = Embedder::load(&teacher_dir, &options).unwrap();
    let rows = teacher.embed(&texts, "", 8, &mut |_| {}).unwrap();
    let (n, d) = rows.dim();
    let teacher = Tensor::from_vec(rows.into_raw_vec_and_offset().0, (n, d), &Device::Cpu).unwrap();
    let base: HashMap<String, Tensor> =
        effir_pipeline::io::weights::load_all_tensors(&student).unwrap();
    let config = FinetuneConfig {
        objective: Objective::Distill,
        max_length: Some(256),
        embedding_distillation: Some(EmbeddingDistillationSettings {
            teacher: teacher_dir.clone(),
            loss: serde_yaml::from_str("cosine").unwrap(),
            weight: 1.0,
            similarity_weight: 1.0,
            similarity_temperature: 0.05,
            contrastive_weight: 1.0,
            token_weight: 0.0,
            text_batch_size: 0,
        }),
        ..Default::default()
    };
    for suffix in WEIGHTS {
        let name = base
            .keys()
            .find(|k| k.ends_with(suffix))
            .unwrap_or_else(|| panic!("{}: no {suffix}", student.display()))
            .clone();
        let start = base[&name].clone();
        let loss_with = |w: Tensor| -> Tensor {
            let mut t = base.clone();
            t.insert(name.clone(), w);
            distillation_loss_of_texts(&student, t, &texts, &teacher, None, &config).unwrap()
        };
        let var = Var::from_tensor(&start).unwrap();
        let loss = loss_with(var.as_tensor().clone());
        let grad = common::gradient(&loss, &var);
        let norm = common::norm(&grad);
        let weight_norm = common::norm(&start.flatten_all().unwrap().to_vec1().unwrap());
        let direction: Vec<f64> = grad.iter().map(|g| *g as f64 / norm).collect();
        let at = |step: f64| -> f64 {
            loss_with(common::moved_along(&start, &direction, step))
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let loss = loss.to_scalar::<f32>().unwrap();
        for share in [1e-3, 1e-2] {
            let eps = share * weight_norm;
            let (minus, plus) = (at(-eps), at(eps));
            let ratio = (plus - minus) / (2.0 * eps) / norm;
            eprintln!(
                "{suffix}: loss {loss:.4}, |grad| {norm:.3e}; step {:.1} % of |w|: loss {minus:.4} / {plus:.4}, \
                 numeric / analytic derivative {ratio:.3}",
                share * 100.0
            );
            if share == 1e-3 {
                assert!((ratio - 1.0).abs() < 0.1, "{suffix}: ratio {ratio}");
            }
        }
    }
}
