//! `effir prune`: the pruned directory computes exactly what the full model
//! computes with the same sub-layers skipped and neurons masked, plans are
//! checked before any work, and the outputs are complete.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::fixture;
use effir_pipeline::models::{ForwardHooks, SkippedSublayers};
use effir_pipeline::prune::{
    plan_pruning, write_pruned_model, CoarseMode, CoarsePlan, FinePlan, PrunePlan, PruneResult,
};
use effir_pipeline::weights::load_all_tensors;
use effir_pipeline::{Embedder, LoadOptions};

const SAME: f32 = 1e-5;

const CALIBRATION: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello world",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "Numbers 12 345 and symbols % & $ appear here.",
    "abcdefghijklmnopqrstuvwxyz",
    "pruning mlp sub layers keeps attention layers intact",
];

fn calibration() -> Vec<String> {
    CALIBRATION.iter().map(|s| s.to_string()).collect()
}

/// Query–document pairs for Taylor scores: each text against a related one.
fn pairs() -> Vec<(String, String)> {
    let c = calibration();
    c.iter()
        .zip(c.iter().rev())
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect()
}

fn load(dir: &Path) -> Embedder {
    Embedder::load(dir, &LoadOptions::default()).unwrap()
}

/// Prunes `fixture(name)` with `plan` into a fresh directory.
fn prune(name: &str, plan: &PrunePlan) -> (tempfile::TempDir, PathBuf, PruneResult) {
    let source = fixture(name);
    let mut embedder = load(&source);
    let tensors = load_all_tensors(&source).unwrap();
    let result = plan_pruning(
        &mut embedder,
        &tensors,
        plan,
        &calibration(),
        &pairs(),
        4,
        &mut |_| {},
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("pruned");
    write_pruned_model(
        &source,
        &out,
        tensors,
        embedder.architecture(),
        plan,
        &result,
    )
    .unwrap();
    (work, out, result)
}

fn hidden(embedder: &Embedder, hooks: &mut dyn ForwardHooks) -> Vec<Vec<f32>> {
    let encoded = embedder.encode_texts(&CALIBRATION, "").unwrap();
    let input = embedder.batch(&encoded.iter().collect::<Vec<_>>()).unwrap();
    let mask: Vec<Vec<u32>> = input.attention_mask.to_vec2().unwrap();
    let h = embedder.hidden_states_hooked(&input, hooks).unwrap();
    let mut rows = Vec::new();
    for (b, m) in mask.iter().enumerate() {
        for (t, _) in m.iter().enumerate().filter(|(_, v)| **v == 1) {
            rows.push(h.get(b).unwrap().get(t).unwrap().to_vec1::<f32>().unwrap());
        }
    }
    rows
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct NoHooks;
impl ForwardHooks for NoHooks {}

/// Multiplies each MLP's activation by a 0/1 mask of kept neurons.
struct NeuronMask(Vec<Option<Tensor>>);
impl ForwardHooks for NeuronMask {
    fn mlp_activation(&mut self, layer: usize, a: Tensor) -> candle_core::Result<Tensor> {
        match &self.0[layer] {
            Some(mask) => a.broadcast_mul(mask),
            None => Ok(a),
        }
    }
}

#[test]
fn pruning_nothing_changes_nothing() {
    let plan = PrunePlan {
        fine: Some(FinePlan {
            mlp_keep: 1.0,
            score: Default::default(),
            min_width_fraction: 0.1,
            alignment: 8,
        }),
        ..Default::default()
    };
    for arch in ["bert", "llama", "gemma3"] {
        let (_work, out, result) = prune(arch, &plan);
        assert_eq!(result.mlp_keep_achieved, 1.0, "{arch}");
        let (full, pruned) = (load(&fixture(arch)), load(&out));
        assert_eq!(
            hidden(&full, &mut NoHooks),
            hidden(&pruned, &mut NoHooks),
            "{arch}"
        );
    }
}

#[test]
fn dropped_mlps_equal_skipping_them_at_run_time() {
    let plan = PrunePlan {
        coarse: CoarsePlan {
            layers: Some(vec![1]),
            ..Default::default()
        },
        ..Default::default()
    };
    for arch in ["bert", "llama", "gemma3", "qwen2"] {
        let (_work, out, result) = prune(arch, &plan);
        assert_eq!(result.dropped_mlps, vec![1]);
        let pruned = load(&out);
        assert!(pruned.shape().layers[1].mlp.is_none());
        assert_eq!(
            pruned.parameters().layers[1].mlp,
            0,
            "{arch}: the MLP's tensors are gone"
        );
        let mut skipped = SkippedSublayers::default();
        skipped.mlp.insert(1);
        let d = max_diff(
            &hidden(&load(&fixture(arch)), &mut skipped),
            &hidden(&pruned, &mut NoHooks),
        );
        assert!(d <= SAME, "{arch}: pruned vs skipped differ by {d}");
    }
}

#[test]
fn narrowed_mlps_equal_masking_their_removed_neurons() {
    let plan = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(1),
            ..Default::default()
        },
        fine: Some(FinePlan {
            mlp_keep: 0.5,
            score: Default::default(),
            min_width_fraction: 0.25,
            alignment: 8,
        }),
        ..Default::default()
    };
    for arch in ["bert", "llama", "gemma3"] {
        let (_work, out, result) = prune(arch, &plan);
        let full_width = 96;
        let mut masks = Vec::new();
        for (l, kept) in result.kept_neurons.iter().enumerate() {
            match kept {
                None => masks.push(None),
                Some(keep) => {
                    assert_eq!(
                        keep.len() % 8,
                        0,
                        "{arch} layer {l}: width {} not a multiple of 8",
                        keep.len()
                    );
                    assert!(keep.len() >= 24, "{arch} layer {l}: below the 25% floor");
                    assert!(
                        keep.windows(2).all(|w| w[0] < w[1]),
                        "kept neurons sorted and unique"
                    );
                    let m: Vec<f32> = (0..full_width as u32)
                        .map(|j| keep.contains(&j) as u8 as f32)
                        .collect();
                    masks.push(Some(
                        Tensor::new(m.as_slice(), &candle_core::Device::Cpu).unwrap(),
                    ));
                }
            }
        }
        // 3 layers of 96 neurons, target 144: rounding to multiples of 8 moves it by at most 8 per layer.
        let kept: usize = result.kept_neurons.iter().flatten().map(Vec::len).sum();
        assert!(
            kept.abs_diff(144) <= 16,
            "{arch}: kept {kept} neurons for a target of 144"
        );

        let mut reference = NeuronMask(masks);
        let mut skipped = load(&fixture(arch));
        skipped
            .set_skipped(SkippedSublayers {
                mlp: result.dropped_mlps.iter().copied().collect(),
                ..Default::default()
            })
            .unwrap();
        let d = max_diff(
            &hidden(&skipped, &mut reference),
            &hidden(&load(&out), &mut NoHooks),
        );
        assert!(d <= SAME, "{arch}: narrowed vs masked differ by {d}");
    }
}

#[test]
fn one_shot_drops_the_least_important_mlp_and_iterative_re_measures() {
    let one_shot = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_w, _o, result) = prune("llama", &one_shot);
    assert_eq!(
        result.dropped_mlps,
        vec![result.importance.mlps_by_importance()[0].0]
    );

    let iterative = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(2),
            mode: CoarseMode::Iterative,
            ..Default::default()
        },
        ..Default::default()
    };
    let (_w, out, result) = prune("llama", &iterative);
    assert_eq!(result.dropped_mlps.len(), 2);
    assert_ne!(result.dropped_mlps[0], result.dropped_mlps[1]);
    assert_eq!(load(&out).shape().mlp_count(), 1);
}

#[test]
fn bad_plans_are_rejected_before_any_work() {
    let shape = load(&fixture("llama")).shape().clone();
    let check = |plan: PrunePlan, needle: &str| {
        let err = plan.validate(&shape).expect_err(needle).to_string();
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    };
    let coarse = |c: CoarsePlan| PrunePlan {
        coarse: c,
        ..Default::default()
    };
    let fine = |keep: f64| PrunePlan {
        fine: Some(FinePlan {
            mlp_keep: keep,
            score: Default::default(),
            min_width_fraction: 0.1,
            alignment: 8,
        }),
        ..Default::default()
    };
    check(
        coarse(CoarsePlan {
            drop_mlp: Some(3),
            ..Default::default()
        }),
        "leaves none",
    );
    check(
        coarse(CoarsePlan {
            layers: Some(vec![0, 1, 2]),
            ..Default::default()
        }),
        "leaves none",
    );
    check(
        coarse(CoarsePlan {
            layers: Some(vec![7]),
            ..Default::default()
        }),
        "layer 7 is out of range",
    );
    check(
        coarse(CoarsePlan {
            layers: Some(vec![1, 1]),
            ..Default::default()
        }),
        "repeats",
    );
    check(fine(0.0), "outside (0, 1]");
    check(fine(1.5), "outside (0, 1]");
    check(
        PrunePlan {
            model_type: Some("bert".into()),
            ..Default::default()
        },
        "model_type `bert`",
    );
    check(
        PrunePlan {
            num_layers: Some(24),
            ..Default::default()
        },
        "24 layers",
    );
    let mut keep_too_much = fine(0.9);
    keep_too_much.coarse.drop_mlp = Some(1);
    check(keep_too_much, "keeps more than");
}

#[test]
fn the_cli_writes_a_loadable_model_and_its_records() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, CALIBRATION.join("\n")).unwrap();
    let out = work.path().join("pruned");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_effir"))
            .args([
                "prune",
                "--model",
                fixture("llama").to_str().unwrap(),
                "--calib",
                calib.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--out",
        out.to_str().unwrap(),
        "--drop-mlp",
        "1",
        "--mlp-keep",
        "0.5",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report = String::from_utf8_lossy(&ok.stdout);
    assert!(
        report.contains("MLP parameters") && report.contains("transformer FLOPs/token"),
        "{report}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("effir_prune.json")).unwrap())
            .unwrap();
    let dropped = record["drop_mlp_list"].as_array().unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(record["drop_attn_list"].as_array().unwrap().len(), 0);
    let layer = dropped[0].as_u64().unwrap() as usize;
    assert_eq!(record["decilm_block_configs"][layer]["ffn"]["no_op"], true);
    for file in [
        "effir_shape.json",
        "prune_report.md",
        "tokenizer.json",
        "config.json",
        "modules.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    assert_eq!(load(&out).shape().mlp_count(), 2);

    // The same output directory again: refused, nothing overwritten.
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let again = run(&["--out", out.to_str().unwrap(), "--drop-mlp", "2"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );

    // A plan that drops every MLP fails before anything is written.
    let none_left = work.path().join("none-left");
    let bad = run(&["--out", none_left.to_str().unwrap(), "--drop-mlp", "3"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("leaves none"));
    assert!(!none_left.exists());

    // Calibration text with nothing in it.
    let empty = work.path().join("blank.txt");
    std::fs::write(&empty, "   \n\n").unwrap();
    let blank = std::process::Command::new(env!("CARGO_BIN_EXE_effir"))
        .args([
            "prune",
            "--model",
            fixture("llama").to_str().unwrap(),
            "--calib",
            empty.to_str().unwrap(),
        ])
        .args([
            "--out",
            work.path().join("x").to_str().unwrap(),
            "--drop-mlp",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!blank.status.success());
    assert!(
        String::from_utf8_lossy(&blank.stderr).contains("no usable calibration text"),
        "{}",
        String::from_utf8_lossy(&blank.stderr)
    );
}

/// Scales one neuron's activation by `factor`.
struct ScaleNeuron {
    layer: usize,
    neuron: usize,
    factor: f64,
}
impl ForwardHooks for ScaleNeuron {
    fn mlp_activation(&mut self, layer: usize, a: Tensor) -> candle_core::Result<Tensor> {
        if layer != self.layer {
            return Ok(a);
        }
        let width = a.dim(2)?;
        let scale: Vec<f32> = (0..width)
            .map(|j| {
                if j == self.neuron {
                    self.factor as f32
                } else {
                    1.0
                }
            })
            .collect();
        a.broadcast_mul(&Tensor::new(scale.as_slice(), a.device())?)
    }
}

/// The Taylor score of a neuron is |∂L/∂m| for a gate m on its activation:
/// candle's gradient must match central finite differences of the loss.
#[test]
fn taylor_scores_match_finite_differences() {
    use effir_pipeline::prune::{info_nce, taylor_scores, TAYLOR_TEMPERATURE};
    for arch in ["bert", "llama", "gemma3"] {
        let embedder = load(&fixture(arch));
        let pairs = pairs();
        let scores = taylor_scores(&embedder, &pairs, pairs.len()).unwrap();
        let loss = |hooks: &mut dyn ForwardHooks| -> f64 {
            let q: Vec<&str> = pairs.iter().map(|(q, _)| q.as_str()).collect();
            let d: Vec<&str> = pairs.iter().map(|(_, d)| d.as_str()).collect();
            let (qe, de) = (
                embedder.encode_texts(&q, "").unwrap(),
                embedder.encode_texts(&d, "").unwrap(),
            );
            let qv = embedder
                .embed_batch_hooked(
                    &embedder.batch(&qe.iter().collect::<Vec<_>>()).unwrap(),
                    hooks,
                )
                .unwrap();
            let dv = embedder
                .embed_batch_hooked(
                    &embedder.batch(&de.iter().collect::<Vec<_>>()).unwrap(),
                    hooks,
                )
                .unwrap();
            info_nce(&qv, &dv, TAYLOR_TEMPERATURE)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        for layer in [0, 2] {
            let layer_scores = scores[layer].as_ref().unwrap();
            // The three neurons with the largest gradients: well above f32 noise.
            let mut order: Vec<usize> = (0..layer_scores.len()).collect();
            order.sort_by(|a, b| layer_scores[*b].total_cmp(&layer_scores[*a]));
            for &neuron in &order[..3] {
                let eps = 1e-2;
                let up = loss(&mut ScaleNeuron {
                    layer,
                    neuron,
                    factor: 1.0 + eps,
                });
                let down = loss(&mut ScaleNeuron {
                    layer,
                    neuron,
                    factor: 1.0 - eps,
                });
                let fd = ((up - down) / (2.0 * eps)).abs();
                let got = layer_scores[neuron];
                assert!(
                    (got - fd).abs() <= 2e-2 * fd.max(got) + 1e-4,
                    "{arch} layer {layer} neuron {neuron}: autograd {got:.6}, finite difference {fd:.6}"
                );
            }
        }
    }
}

#[test]
fn taylor_scores_prune_to_the_same_constraints() {
    let plan = PrunePlan {
        fine: Some(FinePlan {
            mlp_keep: 0.5,
            score: effir_pipeline::prune::NeuronScore::Taylor,
            min_width_fraction: 0.25,
            alignment: 8,
        }),
        ..Default::default()
    };
    let (_work, out, result) = prune("qwen3", &plan);
    for keep in result.kept_neurons.iter().flatten() {
        assert_eq!(keep.len() % 8, 0);
        assert!(keep.len() >= 24);
    }
    assert!((result.mlp_keep_achieved - 0.5).abs() <= 24.0 / 288.0);
    assert_eq!(load(&out).shape().mlp_count(), 3);
}

/// The shipped plans parse and fit the models they name.
#[test]
fn the_shipped_plans_are_valid() {
    use effir_pipeline::{LayerShape, MlpShape, ModelShape};
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let gemma = ModelShape::uniform(
        "gemma3_text",
        24,
        LayerShape {
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 256,
            mlp: Some(MlpShape {
                intermediate_size: 1152,
            }),
        },
    );
    let minilm = ModelShape::uniform(
        "bert",
        6,
        LayerShape {
            num_heads: 12,
            num_kv_heads: 12,
            head_dim: 32,
            mlp: Some(MlpShape {
                intermediate_size: 1536,
            }),
        },
    );
    let mut seen = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("prune-") {
            continue;
        }
        let plan: PrunePlan = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape = if name.contains("embeddinggemma") {
            &gemma
        } else {
            &minilm
        };
        plan.validate(shape)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
    }
    assert!(seen >= 6, "found {seen} plans");
}
