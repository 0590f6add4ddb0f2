//! EffiR coarse-to-fine MLP compression (Lei et al. 2025, §4).
//!
//! * Coarse: drop whole MLP sub-layers, least important first (importance =
//!   `1 - cos` of the residual stream, [`crate::analysis`]), in one shot or
//!   iteratively (re-measuring after each drop), or an explicit list.
//! * Fine: narrow the remaining MLPs by neuron importance — activation-aware
//!   magnitude, `‖W_out[:, j]‖₂ · sqrt(E[a_j²])` over calibration tokens —
//!   with per-layer widths chosen by a global ranking (scores normalised by
//!   each layer's mean), a per-layer floor, and widths rounded to a multiple
//!   of `alignment` so the narrowed matrices stay fast.
//!
//! The output is a real, smaller model directory: sliced safetensors (no
//! masks, no zeros), the tokenizer, `config.json` with LLM-Drop's
//! `drop_mlp_list`/`drop_attn_list` added, `effir_shape.json` with each
//! layer's width, and `effir_prune.json` (the plan, the decisions and, where
//! DeciLM can express the model, its `block_configs`, [`crate::decilm`]).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::{measure_importance, ImportanceReport};
use crate::embedder::Embedder;
use crate::error::{Error, Result};
use crate::model_files::{copy_model_files, is_backbone_weights};
use crate::models::{ForwardHooks, ModelConfig, SkippedSublayers};
use crate::shape::{MlpShape, ModelShape, SHAPE_FILE};
use crate::weights::WEIGHTS_FILE;

/// How coarse selection proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoarseMode {
    /// Rank MLPs once on the full model.
    #[default]
    OneShot,
    /// Drop one MLP, re-measure, drop the next.
    Iterative,
}

/// Neuron importance score of the fine step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeuronScore {
    /// `‖W_out[:, j]‖₂ · sqrt(E[a_j²])`.
    #[default]
    ActivationMagnitude,
    /// First-order Taylor estimate of the contrastive loss change when the
    /// neuron is removed: `|Σ_tokens a_j · ∂L/∂a_j|` per batch, summed over
    /// batches of query–document pairs (InfoNCE, in-batch negatives). This
    /// is the neuron-level grouping of `|w · ∂L/∂w|`: a 1-valued gate `m_j`
    /// on the activation has `∂L/∂m_j = Σ a_j ∂L/∂a_j`.
    Taylor,
}

/// Which MLPs to drop.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoarsePlan {
    /// Drop this many MLPs, least important first.
    #[serde(default)]
    pub drop_mlp: Option<usize>,
    /// Or drop this fraction of the MLPs (rounded down).
    #[serde(default)]
    pub drop_fraction: Option<f64>,
    /// Or exactly these layers' MLPs.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    #[serde(default)]
    pub mode: CoarseMode,
}

/// How far to narrow the remaining MLPs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinePlan {
    /// Fraction of the original MLP parameters kept after both steps, in (0, 1].
    pub mlp_keep: f64,
    #[serde(default)]
    pub score: NeuronScore,
    /// No remaining MLP narrower than this fraction of its original width.
    #[serde(default = "default_floor")]
    pub min_width_fraction: f64,
    /// Widths are multiples of this.
    #[serde(default = "default_alignment")]
    pub alignment: usize,
}

impl FinePlan {
    /// The narrowest an MLP of `width` neurons may become: the floor
    /// fraction rounded up to the alignment, at least one aligned block.
    pub fn floor(&self, width: usize) -> usize {
        align_up(
            (self.min_width_fraction * width as f64).ceil() as usize,
            self.alignment,
        )
        .clamp(self.alignment.min(width), width)
    }

    /// Neurons kept in all, `mlp_keep` of the MLP neurons `shape` has.
    pub fn target_neurons(&self, shape: &ModelShape) -> usize {
        (self.mlp_keep * mlp_neurons(shape) as f64).round() as usize
    }
}

fn mlp_neurons(shape: &ModelShape) -> usize {
    shape
        .layers
        .iter()
        .filter_map(|l| l.mlp)
        .map(|m| m.intermediate_size)
        .sum()
}

fn default_floor() -> f64 {
    0.1
}
fn default_alignment() -> usize {
    8
}

/// A pruning plan (`configs/prune-*.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunePlan {
    /// `model_type` the plan was written for; checked when given.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Layer count the plan was written for; checked when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub coarse: CoarsePlan,
    #[serde(default)]
    pub fine: Option<FinePlan>,
}

impl PrunePlan {
    /// Checks the plan against the model before any work is done.
    pub fn validate(&self, shape: &ModelShape) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("pruning plan: {m}")));
        let layers = shape.layers.len();
        if let Some(t) = &self.model_type {
            if *t != shape.model_type {
                return bad(format!(
                    "written for model_type `{t}`, the model is `{}`",
                    shape.model_type
                ));
            }
        }
        if let Some(n) = self.num_layers {
            if n != layers {
                return bad(format!("written for {n} layers, the model has {layers}"));
            }
        }
        let c = &self.coarse;
        let given = [
            c.drop_mlp.is_some(),
            c.drop_fraction.is_some(),
            c.layers.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return bad("give one of coarse.drop_mlp, coarse.drop_fraction, coarse.layers".into());
        }
        let present = shape.mlp_count();
        if let Some(f) = c.drop_fraction {
            if !(0.0..1.0).contains(&f) {
                return bad(format!("coarse.drop_fraction {f} is outside [0, 1)"));
            }
        }
        if let Some(list) = &c.layers {
            let unique: BTreeSet<_> = list.iter().collect();
            if unique.len() != list.len() {
                return bad(format!("coarse.layers {list:?} repeats a layer"));
            }
            if let Some(i) = list.iter().find(|i| **i >= layers) {
                return bad(format!(
                    "layer {i} is out of range (the model has {layers} layers, 0..{})",
                    layers - 1
                ));
            }
            if let Some(i) = list.iter().find(|i| shape.layers[**i].mlp.is_none()) {
                return bad(format!("layer {i} has no MLP left to drop"));
            }
        }
        if self.drop_count(shape) >= present {
            return bad(format!(
                "dropping {} of {present} MLPs leaves none; keep at least one",
                self.drop_count(shape)
            ));
        }
        if let Some(f) = &self.fine {
            if !(f.mlp_keep > 0.0 && f.mlp_keep <= 1.0) {
                return bad(format!("fine.mlp_keep {} is outside (0, 1]", f.mlp_keep));
            }
            if !(0.0..=1.0).contains(&f.min_width_fraction) {
                return bad(format!(
                    "fine.min_width_fraction {} is outside [0, 1]",
                    f.min_width_fraction
                ));
            }
            if f.alignment == 0 {
                return bad("fine.alignment must be at least 1".into());
            }
            let remaining = (present - self.drop_count(shape)) as f64 / present as f64;
            if f.mlp_keep > remaining + 1e-9 {
                return bad(format!(
                    "fine.mlp_keep {} keeps more than the {:.3} the coarse step leaves",
                    f.mlp_keep, remaining
                ));
            }
            // The floors of the MLPs that stay must fit in the target. Unless
            // the layers are listed, which ones stay is only known after
            // measuring, so check the smallest floors that could stay.
            let mut floors: Vec<usize> = shape
                .layers
                .iter()
                .enumerate()
                .filter(|(i, _)| c.layers.as_ref().is_none_or(|list| !list.contains(i)))
                .filter_map(|(_, l)| l.mlp)
                .map(|m| f.floor(m.intermediate_size))
                .collect();
            floors.sort_unstable();
            let least: usize = floors.iter().take(present - self.drop_count(shape)).sum();
            let target = f.target_neurons(shape);
            if least > target {
                return bad(format!(
                    "fine.mlp_keep {} ({target} neurons) is below the per-layer floors \
                     ({least} neurons with fine.min_width_fraction {} and fine.alignment {})",
                    f.mlp_keep, f.min_width_fraction, f.alignment
                ));
            }
        }
        Ok(())
    }

    /// Number of MLPs the coarse step drops.
    pub fn drop_count(&self, shape: &ModelShape) -> usize {
        let c = &self.coarse;
        if let Some(list) = &c.layers {
            list.len()
        } else if let Some(n) = c.drop_mlp {
            n
        } else if let Some(f) = c.drop_fraction {
            (f * shape.mlp_count() as f64).floor() as usize
        } else {
            0
        }
    }
}

/// What pruning decided, layer by layer.
#[derive(Debug, Clone, Serialize)]
pub struct PruneResult {
    pub dropped_mlps: Vec<usize>,
    /// Kept neuron indices (ascending) of each remaining MLP; `None` when dropped.
    pub kept_neurons: Vec<Option<Vec<u32>>>,
    pub shape: ModelShape,
    pub importance: ImportanceReport,
    /// Kept fraction of the original MLP neurons (= parameters for uniform MLPs).
    pub mlp_keep_achieved: f64,
}

/// Sums `a_j²` over real tokens for every MLP neuron.
struct ActivationMeter {
    /// `(B, T, 1)`.
    mask: Option<Tensor>,
    sum_sq: Vec<Option<Vec<f64>>>,
}

impl ForwardHooks for ActivationMeter {
    fn mlp_activation(&mut self, layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        let mask = self.mask.as_ref().expect("mask set before each batch");
        let s: Vec<f32> = activation
            .sqr()?
            .broadcast_mul(mask)?
            .sum((0, 1))?
            .to_vec1()?;
        let acc = self.sum_sq[layer].get_or_insert_with(|| vec![0.0; s.len()]);
        for (a, v) in acc.iter_mut().zip(s) {
            *a += v as f64;
        }
        Ok(activation)
    }
}

fn activation_sum_sq(
    embedder: &Embedder,
    texts: &[String],
    batch_size: usize,
) -> Result<Vec<Option<Vec<f64>>>> {
    let mut meter = ActivationMeter {
        mask: None,
        sum_sq: vec![None; embedder.shape().layers.len()],
    };
    embedder.for_each_batch(texts, "", batch_size.max(1), &mut |input, _| {
        meter.mask = Some(input.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?);
        embedder.hidden_states_hooked(input, &mut meter)?;
        Ok(())
    })?;
    Ok(meter.sum_sq)
}

/// Multiplies each MLP activation by a gate variable of ones, so the loss
/// gradient of each gate is the neuron's first-order Taylor term.
struct TaylorGates {
    gates: Vec<Option<candle_core::Var>>,
}

impl ForwardHooks for TaylorGates {
    fn mlp_activation(&mut self, layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        match &self.gates[layer] {
            Some(gate) => activation.broadcast_mul(gate.as_tensor()),
            None => Ok(activation),
        }
    }
}

/// The record of a pruning run, written into the pruned model directory.
pub const PLAN_FILE: &str = "effir_prune.json";

/// Temperature of the InfoNCE loss of Taylor scores.
pub const TAYLOR_TEMPERATURE: f64 = 0.05;

/// InfoNCE over in-batch negatives: query `i`'s positive is document `i`.
pub fn info_nce(
    queries: &Tensor,
    documents: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let norm = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.broadcast_div(
            &x.sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?,
        )
    };
    let logits = (norm(queries)?.matmul(&norm(documents)?.t()?)? / temperature)?;
    let n = logits.dim(0)?;
    let labels = Tensor::arange(0u32, n as u32, logits.device())?;
    candle_nn::loss::cross_entropy(&logits, &labels)
}

/// Taylor scores contrast each query with the other documents of its batch,
/// so they need batches of at least two query–document pairs.
pub fn check_taylor_inputs(pairs: usize, batch_size: usize) -> Result<()> {
    if pairs < 2 || batch_size < 2 {
        return Err(Error::InvalidArgument(format!(
            "Taylor scores need at least 2 query-document pairs per batch (in-batch \
             negatives); got {pairs} pairs in batches of {batch_size}"
        )));
    }
    Ok(())
}

/// Taylor scores of every MLP neuron on `pairs`, `batch_size` pairs at a time.
pub fn taylor_scores(
    embedder: &Embedder,
    pairs: &[(String, String)],
    batch_size: usize,
) -> Result<Vec<Option<Vec<f64>>>> {
    check_taylor_inputs(pairs.len(), batch_size)?;
    let mut gates = TaylorGates {
        gates: embedder
            .shape()
            .layers
            .iter()
            .map(|l| {
                l.mlp
                    .map(|m| {
                        candle_core::Var::ones(m.intermediate_size, DType::F32, embedder.device())
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?,
    };
    let mut totals: Vec<Option<Vec<f64>>> = gates
        .gates
        .iter()
        .map(|g| g.as_ref().map(|g| vec![0.0; g.dim(0).unwrap_or(0)]))
        .collect();
    for chunk in pairs.chunks(batch_size).filter(|c| c.len() >= 2) {
        let queries: Vec<&str> = chunk.iter().map(|(q, _)| q.as_str()).collect();
        let docs: Vec<&str> = chunk.iter().map(|(_, d)| d.as_str()).collect();
        let q_enc = embedder.encode_texts(&queries, "")?;
        let d_enc = embedder.encode_texts(&docs, "")?;
        let q = embedder.embed_batch_hooked(
            &embedder.batch(&q_enc.iter().collect::<Vec<_>>())?,
            &mut gates,
        )?;
        let d = embedder.embed_batch_hooked(
            &embedder.batch(&d_enc.iter().collect::<Vec<_>>())?,
            &mut gates,
        )?;
        let loss = info_nce(&q, &d, TAYLOR_TEMPERATURE)?;
        let grads = loss.backward()?;
        for (gate, total) in gates.gates.iter().zip(totals.iter_mut()) {
            if let (Some(gate), Some(total)) = (gate, total) {
                if let Some(g) = grads.get(gate.as_tensor()) {
                    for (t, v) in total.iter_mut().zip(g.to_vec1::<f32>()?) {
                        *t += v.abs() as f64;
                    }
                }
            }
        }
    }
    Ok(totals)
}

/// Chooses what to prune. `embedder` must be the model in `dir`, with no
/// skipped sub-layers; `calibration` are prompted texts; `pairs` are
/// query–document pairs, needed by [`NeuronScore::Taylor`] only.
pub fn plan_pruning(
    embedder: &mut Embedder,
    tensors: &HashMap<String, Tensor>,
    plan: &PrunePlan,
    calibration: &[String],
    pairs: &[(String, String)],
    batch_size: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<PruneResult> {
    let _span = tracing::info_span!("prune").entered();
    let shape = embedder.shape().clone();
    plan.validate(&shape)?;
    if plan
        .fine
        .as_ref()
        .is_some_and(|f| f.score == NeuronScore::Taylor)
    {
        check_taylor_inputs(pairs.len(), batch_size)?;
    }
    let arch = embedder.architecture();
    progress("measuring sub-layer importance");
    let importance = measure_importance(embedder, calibration, batch_size, &mut |_| {})?;

    // Coarse.
    let n_drop = plan.drop_count(&shape);
    let dropped: Vec<usize> = match (&plan.coarse.layers, plan.coarse.mode) {
        (Some(list), _) => list.clone(),
        (None, CoarseMode::OneShot) => importance
            .mlps_by_importance()
            .iter()
            .take(n_drop)
            .map(|(l, _)| *l)
            .collect(),
        (None, CoarseMode::Iterative) => {
            let mut skipped = SkippedSublayers::default();
            let mut dropped = Vec::new();
            for step in 0..n_drop {
                progress(&format!(
                    "iterative drop {}/{n_drop}: re-measuring",
                    step + 1
                ));
                embedder.set_skipped(skipped.clone())?;
                let report = measure_importance(embedder, calibration, batch_size, &mut |_| {})?;
                let (layer, _) = report.mlps_by_importance()[0];
                dropped.push(layer);
                skipped.mlp.insert(layer);
            }
            embedder.set_skipped(SkippedSublayers::default())?;
            dropped
        }
    };
    let mut new_shape = shape.clone();
    for &l in &dropped {
        new_shape.layers[l].mlp = None;
    }

    // Fine.
    let mut kept: Vec<Option<Vec<u32>>> = new_shape
        .layers
        .iter()
        .map(|l| l.mlp.map(|m| (0..m.intermediate_size as u32).collect()))
        .collect();
    let original_neurons = mlp_neurons(&shape);
    if let Some(fine) = &plan.fine {
        embedder.set_skipped(SkippedSublayers {
            mlp: dropped.iter().copied().collect(),
            ..Default::default()
        })?;
        let measured = match fine.score {
            NeuronScore::ActivationMagnitude => {
                progress("measuring neuron activations");
                activation_sum_sq(embedder, calibration, batch_size)
            }
            NeuronScore::Taylor => {
                progress("computing Taylor scores");
                taylor_scores(embedder, pairs, batch_size)
            }
        };
        embedder.set_skipped(SkippedSublayers::default())?;
        let measured = measured?;
        let prefix = arch.checkpoint_prefix(tensors.keys());
        // Scores per remaining layer, normalised by the layer's mean.
        let mut scores: Vec<(usize, u32, f64)> = Vec::new();
        let mut floors: HashMap<usize, usize> = HashMap::new();
        for (l, layer) in new_shape.layers.iter().enumerate() {
            let Some(mlp) = layer.mlp else { continue };
            let names = arch.mlp_tensors(prefix, l);
            let down = tensors.get(&names.down).ok_or_else(|| {
                Error::InvalidArgument(format!("tensor {} not found in the checkpoint", names.down))
            })?;
            let stats = measured[l].as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("no statistics were recorded for layer {l}'s MLP"))
            })?;
            let raw: Vec<f64> = match fine.score {
                NeuronScore::ActivationMagnitude => {
                    let col_norms: Vec<f32> = down
                        .to_dtype(DType::F32)?
                        .sqr()?
                        .sum(0)?
                        .sqrt()?
                        .to_vec1()?;
                    col_norms
                        .iter()
                        .zip(stats)
                        .map(|(w, a)| *w as f64 * a.sqrt())
                        .collect()
                }
                NeuronScore::Taylor => stats.clone(),
            };
            let mean = raw.iter().sum::<f64>() / raw.len() as f64;
            for (j, s) in raw.iter().enumerate() {
                scores.push((l, j as u32, if mean > 0.0 { s / mean } else { 0.0 }));
            }
            floors.insert(l, fine.floor(mlp.intermediate_size));
        }
        let target = fine.target_neurons(&shape);
        let floor_total: usize = floors.values().sum();
        if floor_total > target {
            return Err(Error::InvalidArgument(format!(
                "fine.mlp_keep {} is below the per-layer floors ({} neurons of {} needed by min_width_fraction {})",
                fine.mlp_keep, floor_total, original_neurons, fine.min_width_fraction
            )));
        }
        let widths = allocate_widths(&scores, &floors, &new_shape, target, fine.alignment);
        for (l, width) in widths {
            let mut layer_scores: Vec<(u32, f64)> = scores
                .iter()
                .filter(|(sl, _, _)| *sl == l)
                .map(|(_, j, s)| (*j, *s))
                .collect();
            layer_scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut keep: Vec<u32> = layer_scores.iter().take(width).map(|(j, _)| *j).collect();
            keep.sort_unstable();
            new_shape.layers[l].mlp = Some(MlpShape {
                intermediate_size: keep.len(),
            });
            kept[l] = Some(keep);
        }
    }
    let kept_neurons: usize = kept.iter().flatten().map(Vec::len).sum();
    Ok(PruneResult {
        dropped_mlps: dropped,
        kept_neurons: kept,
        shape: new_shape,
        importance,
        mlp_keep_achieved: kept_neurons as f64 / original_neurons.max(1) as f64,
    })
}

fn align_up(n: usize, alignment: usize) -> usize {
    n.div_ceil(alignment) * alignment
}

/// Per-layer widths: each layer's floor, then the globally best remaining
/// neurons up to `target`, then rounded to a multiple of `alignment`.
fn allocate_widths(
    scores: &[(usize, u32, f64)],
    floors: &HashMap<usize, usize>,
    shape: &ModelShape,
    target: usize,
    alignment: usize,
) -> Vec<(usize, usize)> {
    let mut per_layer: HashMap<usize, Vec<f64>> = HashMap::new();
    for (l, _, s) in scores {
        per_layer.entry(*l).or_default().push(*s);
    }
    let mut width: HashMap<usize, usize> = floors.clone();
    // Candidates beyond each layer's floor, best first.
    let mut rest: Vec<(usize, f64)> = Vec::new();
    for (l, s) in per_layer.iter_mut() {
        s.sort_by(|a, b| b.total_cmp(a));
        rest.extend(s.iter().skip(floors[l]).map(|v| (*l, *v)));
    }
    rest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let floor_total: usize = width.values().sum();
    for (l, _) in rest.into_iter().take(target.saturating_sub(floor_total)) {
        *width.get_mut(&l).expect("layer has a floor") += 1;
    }
    let mut out: Vec<(usize, usize)> = width
        .into_iter()
        .map(|(l, w)| {
            let full = shape.layers[l].mlp.map_or(0, |m| m.intermediate_size);
            let rounded = ((w as f64 / alignment as f64).round() as usize * alignment)
                .clamp(floors[&l], full);
            (l, rounded)
        })
        .collect();
    out.sort_unstable();
    out
}

/// Writes the pruned model into `out` (which must not exist): sliced
/// weights, the other files of `source` (whose parsed `config.json` is
/// `config`) copied, `effir_shape.json`, and `effir_prune.json` (the plan,
/// the decisions, and the LLM-Drop and DeciLM translations). The directory
/// appears whole or not at all.
pub fn write_pruned_model(
    source: &Path,
    out: &Path,
    tensors: HashMap<String, Tensor>,
    config: &ModelConfig,
    plan: &PrunePlan,
    result: &PruneResult,
) -> Result<()> {
    let arch = config.architecture();
    let staging = crate::atomic_file::StagedDir::beside(out)?;
    copy_model_files(source, staging.path(), &|name| {
        is_backbone_weights(name) || [SHAPE_FILE, PLAN_FILE, "prune_report.md"].contains(&name)
    })?;

    let prefix = arch.checkpoint_prefix(tensors.keys());
    let mut tensors = tensors;
    for (l, kept) in result.kept_neurons.iter().enumerate() {
        let names = arch.mlp_tensors(prefix, l);
        match kept {
            None => {
                for name in names.rows.iter().chain([&names.down]).chain(&names.others) {
                    tensors.remove(name);
                }
            }
            Some(keep) => {
                let full = tensors
                    .get(&names.down)
                    .map(|t| t.dim(1))
                    .transpose()?
                    .unwrap_or(keep.len());
                if keep.len() == full {
                    continue;
                }
                let index = Tensor::new(keep.as_slice(), &Device::Cpu)?;
                for name in &names.rows {
                    if let Some(t) = tensors.get(name) {
                        let sliced = t.index_select(&index, 0)?;
                        tensors.insert(name.clone(), sliced);
                    }
                }
                let down = tensors[&names.down].index_select(&index, 1)?;
                tensors.insert(names.down.clone(), down);
            }
        }
    }
    let weights = staging.path().join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| Error::weights(&weights, e))?;
    result.shape.save(staging.path())?;
    // Every MLP the model lacks, including those a pruned source had already lost.
    let drop_mlp_list: Vec<usize> = result
        .shape
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mlp.is_none())
        .map(|(i, _)| i)
        .collect();
    add_llm_drop_keys(&staging.path().join("config.json"), &drop_mlp_list)?;
    let decilm = match config.decoder_spec()? {
        Some(spec) => crate::decilm::block_configs(&spec, &result.shape),
        None => Err("BERT is an encoder; DeciLM describes Llama-style decoders".to_string()),
    };
    let record = serde_json::json!({
        "effir_version": env!("CARGO_PKG_VERSION"),
        "source_model": std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf()),
        "plan": plan,
        "dropped_mlps": result.dropped_mlps,
        "mlp_widths": result.shape.layers.iter().map(|l| l.mlp.map(|m| m.intermediate_size)).collect::<Vec<_>>(),
        "mlp_keep_achieved": result.mlp_keep_achieved,
        "importance": result.importance.layers,
        // LLM-Drop (He et al., "What Matters in Transformers?") convention,
        // also added to config.json, where LLM-Drop's model code reads it.
        "drop_mlp_list": drop_mlp_list,
        "drop_attn_list": Vec::<usize>::new(),
        "decilm_block_configs": decilm.as_ref().ok(),
        "decilm_block_configs_unexpressible": decilm.as_ref().err(),
    });
    let record_path = staging.path().join(PLAN_FILE);
    std::fs::write(
        &record_path,
        format!(
            "{}\n",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        ),
    )
    .map_err(|e| Error::io(&record_path, e))?;
    staging.publish(out)
}

/// Adds LLM-Drop's `drop_mlp_list` and `drop_attn_list` to the copied
/// `config.json` (Hugging Face loaders ignore keys they do not know).
fn add_llm_drop_keys(config_path: &Path, drop_mlp_list: &[usize]) -> Result<()> {
    let mut config: serde_json::Map<String, serde_json::Value> =
        crate::json_file::read_json(config_path)?;
    config.insert("drop_mlp_list".into(), serde_json::json!(drop_mlp_list));
    config.insert("drop_attn_list".into(), serde_json::json!([]));
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    std::fs::write(config_path, format!("{text}\n")).map_err(|e| Error::io(config_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::LayerShape;

    fn two_layers(width: usize) -> ModelShape {
        ModelShape::uniform(
            "llama",
            2,
            LayerShape {
                num_heads: 4,
                num_kv_heads: 4,
                head_dim: 16,
                mlp: Some(MlpShape {
                    intermediate_size: width,
                }),
            },
        )
    }

    /// Widths follow a global ranking of (mean-normalised) neuron scores: a
    /// layer whose few strong neurons stand out against many weak ones is
    /// narrowed to its floor, a layer of evenly useful neurons keeps more.
    #[test]
    fn widths_are_allocated_by_a_global_ranking_above_per_layer_floors() {
        let shape = two_layers(64);
        let mut scores = Vec::new();
        for j in 0..64u32 {
            scores.push((0, j, 1.0));
            scores.push((1, j, if j < 8 { 7.0 } else { 1.0 / 7.0 }));
        }
        let floors = HashMap::from([(0, 8), (1, 8)]);
        let widths = allocate_widths(&scores, &floors, &shape, 64, 8);
        assert_eq!(widths, vec![(0, 56), (1, 8)]);

        // Everything kept when the target is every neuron.
        let all = allocate_widths(&scores, &floors, &shape, 128, 8);
        assert_eq!(all, vec![(0, 64), (1, 64)]);
    }

    #[test]
    fn widths_are_rounded_to_the_alignment_and_never_below_the_floor() {
        let shape = two_layers(64);
        let scores: Vec<(usize, u32, f64)> = (0..64u32)
            .flat_map(|j| [(0, j, 2.0 - j as f64 / 64.0), (1, j, 1.0 - j as f64 / 64.0)])
            .collect();
        let floors = HashMap::from([(0, 16), (1, 16)]);
        for target in [32, 45, 70, 101] {
            let widths = allocate_widths(&scores, &floors, &shape, target, 8);
            let total: usize = widths.iter().map(|(_, w)| w).sum();
            for (l, w) in &widths {
                assert_eq!(w % 8, 0, "layer {l} width {w} at target {target}");
                assert!(*w >= 16 && *w <= 64, "layer {l} width {w}");
            }
            assert!(
                total.abs_diff(target) <= 8,
                "total {total} for target {target}"
            );
        }
    }

    #[test]
    fn the_floor_is_the_fraction_rounded_up_to_the_alignment() {
        let fine = FinePlan {
            mlp_keep: 0.5,
            score: NeuronScore::ActivationMagnitude,
            min_width_fraction: 0.1,
            alignment: 8,
        };
        assert_eq!(fine.floor(96), 16); // 9.6 -> 10 -> 16
        assert_eq!(fine.floor(1536), 160); // 153.6 -> 154 -> 160
        assert_eq!(fine.floor(4), 4); // never wider than the layer
    }
}
