//! `effir prune`: the pruned directory computes exactly what the full model
//! computes with the same sub-layers skipped and neurons masked, plans are
//! checked before any work, and the outputs are complete.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{copy_model, edit_weights, fixture};
use effir_pipeline::compress::analysis::measure_importance;
use effir_pipeline::compress::prune::{
    plan_pruning, stage_pruned_model, CoarseMode, CoarsePlan, FinePlan, NeuronScore, PruneInputs,
    PrunePlan, PruneRecord, PruneResult, SourceWeights,
};
use effir_pipeline::compress::reconstruct::ReconstructPlan;
use effir_pipeline::io::weights::load_all_tensors;
use effir_pipeline::model::arch::{ForwardHooks, ModelConfig, SkippedSublayers};
use effir_pipeline::{Embedder, LoadOptions};

const SAME: f32 = 1e-5;

const CALIBRATION: [&str; 6] = common::SAMPLE_TEXTS;

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
        PruneInputs {
            calibration: &calibration(),
            pairs: &pairs(),
            batch_size: 4,
        },
        &mut |_| {},
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("pruned");
    stage_pruned_model(
        &source,
        &out,
        SourceWeights::Loaded(tensors),
        &embedder.setup().config,
        plan,
        &result,
    )
    .unwrap()
    .publish(&out)
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
        assert_eq!(result.mlp_keep_achieved(), 1.0, "{arch}");
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
        assert_eq!(result.dropped_mlps(), vec![1]);
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
        for (l, kept) in result.mlps.iter().map(|d| d.neurons()).enumerate() {
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
        let kept: usize = result
            .mlps
            .iter()
            .filter_map(|d| d.neurons())
            .map(<[u32]>::len)
            .sum();
        assert!(
            kept.abs_diff(144) <= 16,
            "{arch}: kept {kept} neurons for a target of 144"
        );

        let mut reference = NeuronMask(masks);
        let mut skipped = load(&fixture(arch));
        skipped
            .set_skipped(SkippedSublayers {
                mlp: result.dropped_mlps().iter().copied().collect(),
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
fn one_shot_drops_the_least_important_mlps_of_the_full_model() {
    let one_shot = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_w, out, result) = prune("llama", &one_shot);
    // Measured here, on the full model, independently of the pruning run.
    let full = load(&fixture("llama"));
    let ranking: Vec<usize> = measure_importance(&full, &calibration(), 4, &mut |_| {})
        .unwrap()
        .mlps_by_importance()
        .iter()
        .map(|(l, _)| *l)
        .collect();
    assert_eq!(ranking.len(), 3);
    assert_eq!(result.dropped_mlps(), ranking[..2]);
    assert_eq!(load(&out).shape().mlp_count(), 1);
}

/// Iterative: each step drops the least important MLP of the model with the
/// earlier picks already skipped, measured anew. (On these fixtures the
/// re-measured order happens to match the one-shot order; this test pins down
/// what each step measures, the next one a model where the orders differ.)
#[test]
fn iterative_drops_re_measure_after_each_drop() {
    let plan = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(2),
            mode: CoarseMode::Iterative,
            ..Default::default()
        },
        ..Default::default()
    };
    for arch in ["bert", "llama", "gemma3"] {
        let (_w, out, result) = prune(arch, &plan);
        let mut embedder = load(&fixture(arch));
        let mut expected = Vec::new();
        let mut skipped = SkippedSublayers::default();
        for _ in 0..2 {
            embedder.set_skipped(skipped.clone()).unwrap();
            let report = measure_importance(&embedder, &calibration(), 4, &mut |_| {}).unwrap();
            let least = report.mlps_by_importance()[0].0;
            expected.push(least);
            skipped.mlp.insert(least);
        }
        assert_eq!(result.dropped_mlps(), expected, "{arch}");
        assert_eq!(load(&out).shape().mlp_count(), 1, "{arch}");
    }
}

/// A Llama whose MLPs interact, so that one-shot and iterative dropping
/// disagree. Attention adds nothing (zero output projections); every token
/// embeds with channel `K` at -1 and the rest at rms 1.5.
/// - MLP 0 adds a fixed vector off channel `K`: moderately important.
/// - MLP 1 reads channel `K` and flips it to about +1: a small change of the
///   stream, the least important.
/// - MLP 2 is gated on channel `K` being positive and then adds a large
///   vector: the most important, but inert once MLP 1 is gone.
///
/// One-shot dropping of two MLPs removes 1 and 0; iterative dropping removes
/// 1, re-measures, finds 2 inert and removes it.
fn interacting_mlps() -> tempfile::TempDir {
    const K: usize = 0;
    let model = copy_model(&fixture("llama"));
    let config = ModelConfig::from_file(&model.path().join("config.json")).unwrap();
    let map = config.checkpoint();
    edit_weights(model.path(), |w| {
        let prefix = map.prefix(w.keys()).to_string();
        let key = |layer: usize, module: &str| {
            format!("{prefix}{}.weight", map.layer_module(layer, module))
        };
        let set =
            |w: &mut std::collections::HashMap<String, Tensor>, name: String, values: Vec<f32>| {
                let dims = w[&name].dims().to_vec();
                w.insert(name, Tensor::from_vec(values, dims, &Device::Cpu).unwrap());
            };
        // Token embeddings: rows at rms 1.5, channel K at -1.
        let table_name = format!("{prefix}{}.weight", map.embeddings.tokens);
        let (rows, h) = w[&table_name].dims2().unwrap();
        let table: Vec<Vec<f32>> = w[&table_name].to_vec2().unwrap();
        let mut values = Vec::with_capacity(rows * h);
        for row in table {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / h as f32).sqrt();
            values.extend(
                row.iter()
                    .enumerate()
                    .map(|(i, v)| if i == K { -1.0 } else { v * 1.5 / rms }),
            );
        }
        set(w, table_name, values);
        // A fixed direction off channel K, of norm `norm`.
        let direction = |norm: f32, phase: f32| -> Vec<f32> {
            let raw: Vec<f32> = (0..h)
                .map(|i| {
                    if i == K {
                        0.0
                    } else {
                        (i as f32 * 1.7 + phase).sin()
                    }
                })
                .collect();
            let n = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
            raw.iter().map(|v| v * norm / n).collect()
        };
        let inter = w[&key(0, map.mlp.up)].dims()[0];
        for layer in 0..3 {
            set(w, key(layer, map.attention.output), vec![0.0; h * h]);
            set(w, key(layer, map.mlp.norms.input.unwrap()), vec![1.0; h]);
            // One neuron: gate_0 = g z, up_0 = u z for z = the normed channel K;
            // its down-projection column is `down`.
            let (g, u, down): (f32, f32, Vec<f32>) = match layer {
                0 => (-10.0, -1.0, direction(1.2, 0.3)),
                1 => (
                    -4.0,
                    -4.0,
                    (0..h).map(|i| if i == K { 0.3 } else { 0.0 }).collect(),
                ),
                _ => (10.0, 1.0, direction(5.0, 1.1)),
            };
            let neuron_row = |weight: f32| {
                let mut m = vec![0.0f32; inter * h];
                m[K] = weight;
                m
            };
            set(w, key(layer, map.mlp.gate.unwrap()), neuron_row(g));
            set(w, key(layer, map.mlp.up), neuron_row(u));
            let mut d = vec![0.0f32; h * inter];
            for (i, v) in down.iter().enumerate() {
                d[i * inter] = *v;
            }
            set(w, key(layer, map.mlp.down), d);
        }
    });
    model
}

#[test]
fn iterative_dropping_re_measures_where_one_shot_does_not() {
    let model = interacting_mlps();
    let plan = |mode| PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(2),
            mode,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut picks = Vec::new();
    for mode in [CoarseMode::OneShot, CoarseMode::Iterative] {
        let mut embedder = load(model.path());
        let tensors = load_all_tensors(model.path()).unwrap();
        let result = plan_pruning(
            &mut embedder,
            &tensors,
            &plan(mode),
            PruneInputs {
                calibration: &calibration(),
                pairs: &[],
                batch_size: 4,
            },
            &mut |_| {},
        )
        .unwrap();
        picks.push(result.dropped_mlps());
    }
    assert_eq!(
        picks[0],
        [1, 0],
        "one-shot: the two least important of the full model"
    );
    assert_eq!(
        picks[1],
        [1, 2],
        "iterative: MLP 2 is inert once MLP 1 is gone"
    );
}

#[test]
fn a_drop_fraction_drops_that_share_of_the_mlps_rounded_down() {
    let plan = |fraction: f64| PrunePlan {
        coarse: CoarsePlan {
            drop_fraction: Some(fraction),
            ..Default::default()
        },
        ..Default::default()
    };
    // 3 MLPs: 0.5 drops 1, 0.7 drops 2 (floor), 0.2 drops none.
    for (fraction, dropped) in [(0.5, 1), (0.7, 2), (0.2, 0)] {
        let (_w, out, result) = prune("llama", &plan(fraction));
        assert_eq!(result.dropped_mlps().len(), dropped, "fraction {fraction}");
        assert_eq!(load(&out).shape().mlp_count(), 3 - dropped);
    }
}

/// Activation-aware magnitude: `‖W_down[:, j]‖ · sqrt(E[a_j²])`. A neuron
/// whose down-projection column is zero contributes nothing and goes first;
/// one whose column is scaled up a thousandfold is kept.
#[test]
fn activation_magnitude_removes_silent_neurons_and_keeps_loud_ones() {
    let model = copy_model(&fixture("llama"));
    let (silent, loud) = (5usize, 17usize);
    for layer in 0..3 {
        let name = format!("model.layers.{layer}.mlp.down_proj.weight");
        edit_weights(model.path(), |t| {
            let w = &t[&name];
            let mut scale = vec![1f32; w.dim(1).unwrap()];
            scale[silent] = 0.0;
            scale[loud] = 1000.0;
            let scale = Tensor::new(scale.as_slice(), w.device()).unwrap();
            let scaled = w.broadcast_mul(&scale).unwrap();
            t.insert(name.clone(), scaled);
        });
    }
    let plan = PrunePlan {
        fine: Some(FinePlan {
            mlp_keep: 0.5,
            score: NeuronScore::ActivationMagnitude,
            min_width_fraction: 0.1,
            alignment: 8,
        }),
        ..Default::default()
    };
    let mut embedder = load(model.path());
    let tensors = load_all_tensors(model.path()).unwrap();
    let result = plan_pruning(
        &mut embedder,
        &tensors,
        &plan,
        PruneInputs {
            calibration: &calibration(),
            pairs: &[],
            batch_size: 4,
        },
        &mut |_| {},
    )
    .unwrap();
    for (layer, kept) in result.mlps.iter().map(|d| d.neurons()).enumerate() {
        let kept = kept.as_ref().unwrap();
        assert!(kept.len() < 96, "layer {layer} was not narrowed");
        assert!(
            !kept.contains(&(silent as u32)),
            "layer {layer} kept the silent neuron"
        );
        assert!(
            kept.contains(&(loud as u32)),
            "layer {layer} lost the loud neuron"
        );
    }
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
    check(
        coarse(CoarsePlan {
            drop_fraction: Some(1.0),
            ..Default::default()
        }),
        "outside [0, 1)",
    );
    check(
        coarse(CoarsePlan {
            drop_mlp: Some(1),
            layers: Some(vec![0]),
            ..Default::default()
        }),
        "give one of",
    );
    // Floors of half of each 96-wide MLP (48 neurons) cannot fit in 20 % of 288.
    let mut below_floors = fine(0.2);
    below_floors.fine.as_mut().unwrap().min_width_fraction = 0.5;
    check(below_floors, "below the per-layer floors");
    // Reconstruction re-fits narrowed MLPs: without a fine step there are none.
    check(
        PrunePlan {
            coarse: CoarsePlan {
                drop_mlp: Some(1),
                ..Default::default()
            },
            reconstruct: Some(ReconstructPlan::default()),
            ..Default::default()
        },
        "needs a fine step",
    );
    for ridge in [0.0, -1e-3, f64::NAN] {
        let mut bad_ridge = fine(0.5);
        bad_ridge.reconstruct = Some(ReconstructPlan { ridge });
        check(bad_ridge, "reconstruct.ridge");
    }
}

/// Sum of squared differences between two sets of hidden-state rows.
fn squared_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum()
}

/// Reconstruction keeps the same neurons and re-fits each narrowed MLP's
/// output projection: every layer's output error on the calibration text
/// falls, and the written model's last hidden state moves closer to the
/// full model's than the plainly sliced model's, for every architecture
/// family (post-norm BERT with output biases, gated decoders without).
#[test]
fn reconstruction_brings_the_pruned_model_closer_to_the_full_one() {
    let sliced_plan = PrunePlan {
        coarse: CoarsePlan {
            drop_mlp: Some(1),
            ..Default::default()
        },
        fine: Some(FinePlan {
            mlp_keep: 0.4,
            score: Default::default(),
            min_width_fraction: 0.1,
            alignment: 8,
        }),
        ..Default::default()
    };
    let refit_plan = PrunePlan {
        reconstruct: Some(ReconstructPlan { ridge: 1e-4 }),
        ..sliced_plan.clone()
    };
    for arch in ["bert", "llama", "gemma3"] {
        let (_w1, sliced_dir, sliced) = prune(arch, &sliced_plan);
        let (_w2, refit_dir, refit) = prune(arch, &refit_plan);
        assert_eq!(sliced.mlps, refit.mlps, "{arch}: the same neurons are kept");
        assert!(sliced.reconstruction.is_none());
        let reconstruction = refit
            .reconstruction
            .as_ref()
            .expect("the plan reconstructs");
        let narrowed: Vec<usize> = refit
            .mlps
            .iter()
            .enumerate()
            .filter(|(_, d)| d.neurons().is_some_and(|n| n.len() < 96))
            .map(|(l, _)| l)
            .collect();
        let fitted: Vec<usize> = reconstruction.fits.iter().map(|f| f.layer).collect();
        assert_eq!(fitted, narrowed, "{arch}: every narrowed layer, in order");
        for fit in &reconstruction.fits {
            assert!(fit.tokens > 0);
            assert!(
                fit.relative_error_refit < fit.relative_error_sliced,
                "{arch} layer {}: re-fit error {} not below sliced {}",
                fit.layer,
                fit.relative_error_refit,
                fit.relative_error_sliced
            );
        }
        let full = hidden(&load(&fixture(arch)), &mut NoHooks);
        let d_sliced = squared_distance(&full, &hidden(&load(&sliced_dir), &mut NoHooks));
        let d_refit = squared_distance(&full, &hidden(&load(&refit_dir), &mut NoHooks));
        assert!(
            d_refit < d_sliced,
            "{arch}: reconstructed model {d_refit} not closer than sliced {d_sliced}"
        );
        // The record carries the fits; the shapes are the sliced model's.
        let record = PruneRecord::read(&refit_dir).unwrap().unwrap();
        let recorded = record
            .reconstruction
            .as_ref()
            .expect("the fits are recorded");
        assert_eq!(recorded.len(), reconstruction.fits.len());
        for (r, f) in recorded.iter().zip(&reconstruction.fits) {
            assert_eq!(
                (r.layer, r.kept, r.width, r.tokens),
                (f.layer, f.kept, f.width, f.tokens)
            );
            assert!((r.relative_error_refit - f.relative_error_refit).abs() < 1e-12);
        }
        assert_eq!(record.plan, refit_plan);
        assert_eq!(
            PruneRecord::read(&sliced_dir)
                .unwrap()
                .unwrap()
                .reconstruction,
            None
        );
        assert_eq!(load(&refit_dir).shape(), load(&sliced_dir).shape());
    }
}

#[test]
fn the_cli_writes_a_loadable_model_and_its_records() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, CALIBRATION.join("\n")).unwrap();
    let out = work.path().join("pruned");
    let model = fixture("llama");
    let run_on = |calib: &Path, extra: &[&str]| {
        let mut args = vec![
            "prune",
            "--model",
            model.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        common::effir(&args)
    };
    let run = |extra: &[&str]| run_on(&calib, extra);
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
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("effir_prune.json")).unwrap())
            .unwrap();
    let dropped = record["drop_mlp_list"].as_array().unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(record["drop_attn_list"].as_array().unwrap().len(), 0);
    // LLM-Drop reads its lists from config.json.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(&config["drop_mlp_list"], &record["drop_mlp_list"]);
    assert_eq!(config["drop_attn_list"], serde_json::json!([]));
    assert_eq!(config["intermediate_size"], 96, "the original width stays");
    // DeciLM derives widths from ffn_mult in steps of 256: 8-aligned widths of
    // a 96-wide MLP cannot be expressed, and the record says why.
    assert!(record["decilm_block_configs"].is_null());
    let why = record["decilm_block_configs_unexpressible"]
        .as_str()
        .unwrap();
    assert!(why.contains("not a multiple of 256"), "{why}");

    // The report counts parameters and FLOPs per token by component: each of
    // the fixture's MLP sub-layers is a gated MLP of 3 · 64 · width weights
    // and its 64-wide RMSNorm, which goes with it when it is dropped.
    let widths: Vec<u64> = record["mlp_widths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap_or(0))
        .collect();
    assert_eq!(widths.iter().filter(|w| **w == 0).count(), 1);
    assert!(widths.iter().all(|w| w % 8 == 0));
    let sublayer = |width: u64| 3 * 64 * width + 64;
    let before = 3 * sublayer(96);
    let after: u64 = widths
        .iter()
        .filter(|w| **w > 0)
        .map(|w| sublayer(*w))
        .sum();
    let report = String::from_utf8_lossy(&ok.stdout);
    let row = |name: &str| -> (u64, u64) {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{report}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        (cells[2].parse().unwrap(), cells[3].parse().unwrap())
    };
    assert_eq!(row("MLP parameters"), (before, after));
    assert_eq!(row("MLP FLOPs/token"), (2 * before, 2 * after));
    assert!(
        after * 2 <= before + 3 * 64 * 8 + 64,
        "about half the MLP parameters kept"
    );
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

    // --reconstruct-ridge re-fits the narrowed MLPs; the report and the
    // record show each layer's output error before and after.
    let refit = work.path().join("refit");
    let ok = run(&[
        "--out",
        refit.to_str().unwrap(),
        "--drop-mlp",
        "1",
        "--mlp-keep",
        "0.5",
        "--reconstruct-ridge",
        "1e-4",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report = String::from_utf8_lossy(&ok.stdout);
    assert!(report.contains("error, re-fitted"), "{report}");
    let record = PruneRecord::read(&refit).unwrap().unwrap();
    assert_eq!(
        record.plan.reconstruct,
        Some(ReconstructPlan { ridge: 1e-4 })
    );
    assert_eq!(record.reconstruction.map(|r| r.len()), Some(2));

    // Bad plans, from flags or YAML, and Taylor scores without batches of
    // two or more pairs: refused before any work, nothing written.
    let plan_for_bert = work.path().join("bert-plan.yaml");
    std::fs::write(
        &plan_for_bert,
        "model_type: bert\nnum_layers: 3\ncoarse: {drop_mlp: 1}\n",
    )
    .unwrap();
    let refused = work.path().join("refused");
    let refused_dir = refused.to_str().unwrap();
    for (args, needle) in [
        (vec!["--drop-mlp", "3"], "leaves none"),
        (vec!["--drop-layers", "7"], "layer 7 is out of range"),
        (vec!["--mlp-keep", "1.5"], "outside (0, 1]"),
        (vec!["--drop-fraction", "1.0"], "outside [0, 1)"),
        (
            vec!["--plan", plan_for_bert.to_str().unwrap()],
            "model_type `bert`",
        ),
        (
            vec![
                "--mlp-keep",
                "0.5",
                "--score",
                "taylor",
                "--batch-size",
                "1",
            ],
            "at least 2 query-document pairs",
        ),
        (
            vec!["--mlp-keep", "0.5", "--reconstruct-ridge", "0"],
            "reconstruct.ridge 0 must be a positive number",
        ),
        (
            vec!["--drop-mlp", "1", "--reconstruct-ridge", "1e-4"],
            "needs a fine step",
        ),
    ] {
        let bad = run(&[&["--out", refused_dir][..], &args].concat());
        assert!(!bad.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
        assert!(!refused.exists(), "{args:?} wrote output");
    }

    // Calibration text with nothing in it.
    let empty = work.path().join("blank.txt");
    std::fs::write(&empty, "   \n\n").unwrap();
    let blank = run_on(&empty, &["--out", refused_dir, "--drop-mlp", "1"]);
    assert!(!blank.status.success());
    assert!(!refused.exists());
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
    use effir_pipeline::compress::prune::{info_nce, taylor_scores, TAYLOR_TEMPERATURE};
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
            score: effir_pipeline::compress::prune::NeuronScore::Taylor,
            min_width_fraction: 0.25,
            alignment: 8,
        }),
        ..Default::default()
    };
    let (_work, out, result) = prune("qwen3", &plan);
    for keep in result.mlps.iter().filter_map(|d| d.neurons()) {
        assert_eq!(keep.len() % 8, 0);
        assert!(keep.len() >= 24);
    }
    assert!((result.mlp_keep_achieved() - 0.5).abs() <= 24.0 / 288.0);
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
    let smollm2 = ModelShape::uniform(
        "llama",
        30,
        LayerShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
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
        } else if name.contains("smollm2") {
            &smollm2
        } else {
            &minilm
        };
        plan.validate(shape)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
    }
    assert!(seen >= 6, "found {seen} plans");
}

/// DeciLM `block_configs`: a dropped MLP is an FFN `no_op`, a kept one an
/// `ffn_mult` from which DeciLM rebuilds exactly its width (in steps of 256);
/// architectures DeciLM cannot describe are refused with the reason.
#[test]
fn decilm_block_configs_describe_plain_llama_decoders() {
    use effir_pipeline::compress::decilm::{block_configs, intermediate_size};
    use effir_pipeline::model::arch::ModelConfig;
    use effir_pipeline::MlpShape;

    let work = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).unwrap(),
    )
    .unwrap();
    config["intermediate_size"] = 512.into();
    let path = work.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let config = ModelConfig::from_file(&path).unwrap();
    let spec = config.decoder_spec().unwrap();
    let mut shape = config.uniform_shape();
    shape.layers[1].mlp = None;
    shape.layers[2].mlp = Some(MlpShape {
        intermediate_size: 256,
    });

    let blocks = block_configs(spec, &shape).unwrap();
    assert_eq!(blocks[1]["ffn"]["no_op"], true);
    for (layer, width) in [(0, 512), (2, 256)] {
        assert_eq!(blocks[layer]["ffn"]["no_op"], false);
        let ffn_mult = blocks[layer]["ffn"]["ffn_mult"].as_f64().unwrap();
        assert_eq!(intermediate_size(ffn_mult, 64), width, "layer {layer}");
    }
    assert!(blocks
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["attention"]["no_op"] == false && b["attention"]["n_heads_in_group"] == 1));

    // A width off DeciLM's grid.
    shape.layers[2].mlp = Some(MlpShape {
        intermediate_size: 248,
    });
    let why = block_configs(spec, &shape).unwrap_err();
    assert!(why.contains("layer 2") && why.contains("248"), "{why}");

    // Biases, q/k norms (Qwen3, Gemma3) and sliding windows are not DeciLM.
    for (arch, reason) in [
        ("qwen2", "biases"),
        ("qwen3", "q/k norms"),
        ("gemma3", "q/k norms"),
        ("mistral", "sliding-window"),
    ] {
        let config = ModelConfig::from_file(&fixture(arch).join("config.json")).unwrap();
        let why =
            block_configs(config.decoder_spec().unwrap(), &config.uniform_shape()).unwrap_err();
        assert!(why.contains(reason), "{arch}: {why}");
    }
}
