//! EffiR coarse-to-fine MLP compression (Lei et al. 2025, §4).
//!
//! * Coarse: drop whole MLP sub-layers, least important first (importance =
//!   `1 - cos` of the residual stream, [`crate::compress::analysis`]), in one shot or
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
//! DeciLM can express the model, its `block_configs`, [`crate::compress::decilm`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::compress::analysis::{measure_importance, ImportanceReport};
pub use crate::compress::pruned_weights::SourceWeights;
use crate::compress::pruned_weights::{slice_weights, write_sliced_weights};
use crate::compress::reconstruct::{reconstruct_mlps, LayerFit, ReconstructPlan, Reconstruction};
use crate::error::{Error, Result};
use crate::io::atomic_file::StagedDir;
use crate::io::model_files::{copy_model_files, is_backbone_weights};
use crate::io::weights::WEIGHTS_FILE;
use crate::model::arch::{CheckpointMap, ForwardHooks, ModelConfig, ModelInput, SkippedSublayers};
use crate::model::embedder::Embedder;
use crate::model::shape::{MlpShape, ModelShape, SHAPE_FILE};

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
    /// Re-fit each narrowed MLP's output projection to the full MLP's
    /// output on the calibration text ([`crate::compress::reconstruct`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruct: Option<ReconstructPlan>,
}

impl PrunePlan {
    /// Checks the plan against the model before any work is done.
    pub fn validate(&self, shape: &ModelShape) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidPlan(m));
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
        if let Some(r) = &self.reconstruct {
            if self.fine.is_none() {
                return bad("reconstruct re-fits narrowed MLPs: it needs a fine step".into());
            }
            r.validate()?;
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

/// What pruning decided for one layer's MLP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpDecision {
    /// The source model had no MLP here already.
    Absent,
    /// Dropped by the coarse step, as its `order`-th drop (from 0).
    Dropped { order: usize },
    /// Kept with these neurons (ascending indices into the source MLP);
    /// every neuron when the MLP was not narrowed.
    Kept { neurons: Vec<u32> },
}

impl MlpDecision {
    /// The neurons kept, `None` when the layer has no MLP.
    pub fn neurons(&self) -> Option<&[u32]> {
        match self {
            Self::Kept { neurons } => Some(neurons),
            _ => None,
        }
    }
}

/// What pruning decided, layer by layer: the one record every output
/// (weights, shape, report) is derived from.
#[derive(Debug, Clone, Serialize)]
pub struct PruneResult {
    /// The model before pruning.
    pub source_shape: ModelShape,
    /// One decision per layer.
    pub mlps: Vec<MlpDecision>,
    pub importance: ImportanceReport,
    /// The re-fitted output projections, when the plan asks for them.
    #[serde(skip)]
    pub reconstruction: Option<Reconstruction>,
}

impl PruneResult {
    /// The MLPs the coarse step dropped, in the order it dropped them.
    pub fn dropped_mlps(&self) -> Vec<usize> {
        let mut dropped: Vec<(usize, usize)> = self
            .mlps
            .iter()
            .enumerate()
            .filter_map(|(l, d)| match d {
                MlpDecision::Dropped { order } => Some((*order, l)),
                _ => None,
            })
            .collect();
        dropped.sort_unstable();
        dropped.into_iter().map(|(_, l)| l).collect()
    }

    /// The pruned model's per-layer widths.
    pub fn shape(&self) -> ModelShape {
        shape_after(&self.source_shape, &self.mlps)
    }

    /// Kept fraction of the source's MLP neurons (= parameters for uniform MLPs).
    pub fn mlp_keep_achieved(&self) -> f64 {
        let kept: usize = self
            .mlps
            .iter()
            .filter_map(|d| d.neurons())
            .map(<[u32]>::len)
            .sum();
        kept as f64 / mlp_neurons(&self.source_shape).max(1) as f64
    }
}

/// `source`'s per-layer widths after `mlps`: each MLP as wide as its kept
/// neurons, absent where none are kept.
fn shape_after(source: &ModelShape, mlps: &[MlpDecision]) -> ModelShape {
    let mut shape = source.clone();
    for (layer, decision) in shape.layers.iter_mut().zip(mlps) {
        layer.mlp = decision.neurons().map(|n| MlpShape {
            intermediate_size: n.len(),
        });
    }
    shape
}

/// The text a pruning run measures: calibration text for importance and
/// activations, query–document pairs for Taylor scores, and the batch size.
#[derive(Debug, Clone, Copy)]
pub struct PruneInputs<'a> {
    /// Prompted calibration texts.
    pub calibration: &'a [String],
    /// Query–document pairs, needed by [`NeuronScore::Taylor`] only.
    pub pairs: &'a [(String, String)],
    pub batch_size: usize,
}

/// The embedder with sub-layers skipped for as long as it lives; the full
/// model comes back when it is dropped, on error too.
struct Skipping<'a> {
    embedder: &'a mut Embedder,
}

impl<'a> Skipping<'a> {
    fn new(embedder: &'a mut Embedder, skipped: SkippedSublayers) -> Result<Self> {
        embedder.set_skipped(skipped)?;
        Ok(Self { embedder })
    }

    /// The embedder without the MLPs of `layers`.
    fn mlps(embedder: &'a mut Embedder, layers: &[usize]) -> Result<Self> {
        Self::new(
            embedder,
            SkippedSublayers {
                mlp: layers.iter().copied().collect(),
                ..Default::default()
            },
        )
    }
}

impl std::ops::Deref for Skipping<'_> {
    type Target = Embedder;
    fn deref(&self) -> &Embedder {
        self.embedder
    }
}

impl Drop for Skipping<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.embedder.set_skipped(SkippedSublayers::default()) {
            tracing::error!(%error, "could not restore the embedder's skipped sub-layers");
        }
    }
}

/// Sums `a_j²` over real tokens for every MLP neuron.
pub(crate) struct ActivationMeter {
    /// `(B, T, 1)`.
    mask: Option<Tensor>,
    pub(crate) sum_sq: Vec<Option<Vec<f64>>>,
}

impl ActivationMeter {
    pub(crate) fn new(layers: usize) -> Self {
        Self {
            mask: None,
            sum_sq: vec![None; layers],
        }
    }
}

impl ForwardHooks for ActivationMeter {
    fn begin_batch(&mut self, input: &ModelInput) -> candle_core::Result<()> {
        self.mask = Some(input.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?);
        Ok(())
    }

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
    let mut meter = ActivationMeter::new(embedder.shape().layers.len());
    embedder.for_each_batch(texts, "", batch_size.max(1), &mut |input, _| {
        meter.begin_batch(input)?;
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

/// Chooses what to prune: validates the plan and inputs, measures
/// sub-layer importance, drops MLPs (coarse), then narrows the rest
/// (fine). `embedder` must be the model `tensors` hold, with no skipped
/// sub-layers; it has none again when this returns, whatever happened.
pub fn plan_pruning(
    embedder: &mut Embedder,
    tensors: &HashMap<String, Tensor>,
    plan: &PrunePlan,
    inputs: PruneInputs,
    progress: &mut dyn FnMut(&str),
) -> Result<PruneResult> {
    let _span = tracing::info_span!("prune").entered();
    let source_shape = embedder.shape().clone();
    plan.validate(&source_shape)?;
    if plan
        .fine
        .as_ref()
        .is_some_and(|f| f.score == NeuronScore::Taylor)
    {
        check_taylor_inputs(inputs.pairs.len(), inputs.batch_size)?;
    }
    progress("measuring sub-layer importance");
    let importance =
        measure_importance(embedder, inputs.calibration, inputs.batch_size, &mut |_| {})?;
    let dropped = choose_dropped_mlps(embedder, plan, &importance, inputs, progress)?;
    let mut mlps = initial_decisions(&source_shape, &dropped);
    if let Some(fine) = &plan.fine {
        let skipping = Skipping::mlps(embedder, &dropped)?;
        let measured = measure_neurons(&skipping, fine, inputs, progress)?;
        drop(skipping);
        let setup = embedder.setup();
        let dir = &setup.dir;
        let scores = neuron_scores(
            setup.config.checkpoint(),
            setup.config.checkpoint().prefix(tensors.keys()),
            &|name| {
                tensors
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Error::MissingTensor {
                        path: dir.to_path_buf(),
                        tensor: name.to_string(),
                    })
            },
            &mlps,
            fine,
            &measured,
        )?;
        narrow(&mut mlps, &scores, fine, &source_shape)?;
    }
    let reconstruction = match &plan.reconstruct {
        None => None,
        Some(reconstruct) => {
            let skipping = Skipping::mlps(embedder, &dropped)?;
            let kept: Vec<Option<&[u32]>> = mlps.iter().map(MlpDecision::neurons).collect();
            Some(reconstruct_mlps(
                &skipping,
                tensors,
                &kept,
                reconstruct,
                inputs.calibration,
                inputs.batch_size,
                progress,
            )?)
        }
    };
    Ok(PruneResult {
        source_shape,
        mlps,
        importance,
        reconstruction,
    })
}

/// Coarse step: the MLPs to drop, in the order they are dropped.
fn choose_dropped_mlps(
    embedder: &mut Embedder,
    plan: &PrunePlan,
    importance: &ImportanceReport,
    inputs: PruneInputs,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<usize>> {
    if let Some(dropped) = drops_without_remeasuring(plan, embedder.shape(), importance) {
        return Ok(dropped);
    }
    // Iterative: re-measure after each drop.
    let n_drop = plan.drop_count(embedder.shape());
    let mut dropped: Vec<usize> = Vec::new();
    for step in 0..n_drop {
        progress(&format!(
            "iterative drop {}/{n_drop}: re-measuring",
            step + 1
        ));
        let skipping = Skipping::new(
            embedder,
            SkippedSublayers {
                mlp: dropped.iter().copied().collect(),
                ..Default::default()
            },
        )?;
        let report = measure_importance(
            &skipping,
            inputs.calibration,
            inputs.batch_size,
            &mut |_| {},
        )?;
        dropped.push(report.mlps_by_importance()[0].0);
    }
    Ok(dropped)
}

/// The MLPs to drop when the plan needs no re-measuring: its explicit
/// list, or the least important in one shot (also when nothing is
/// dropped); `None` for an iterative plan.
pub(crate) fn drops_without_remeasuring(
    plan: &PrunePlan,
    shape: &ModelShape,
    importance: &ImportanceReport,
) -> Option<Vec<usize>> {
    let n_drop = plan.drop_count(shape);
    match (&plan.coarse.layers, plan.coarse.mode) {
        (Some(list), _) => Some(list.clone()),
        (None, CoarseMode::OneShot) => Some(
            importance
                .mlps_by_importance()
                .iter()
                .take(n_drop)
                .map(|(l, _)| *l)
                .collect(),
        ),
        (None, CoarseMode::Iterative) if n_drop == 0 => Some(Vec::new()),
        (None, CoarseMode::Iterative) => None,
    }
}

/// The decisions before narrowing: every MLP kept whole, `dropped` dropped
/// in that order.
pub(crate) fn initial_decisions(shape: &ModelShape, dropped: &[usize]) -> Vec<MlpDecision> {
    let mut mlps: Vec<MlpDecision> = shape
        .layers
        .iter()
        .map(|l| match l.mlp {
            None => MlpDecision::Absent,
            Some(m) => MlpDecision::Kept {
                neurons: (0..m.intermediate_size as u32).collect(),
            },
        })
        .collect();
    for (order, &layer) in dropped.iter().enumerate() {
        mlps[layer] = MlpDecision::Dropped { order };
    }
    mlps
}

/// Per-neuron statistics of every remaining MLP: `Σ a_j²` over calibration
/// tokens, or Taylor scores over query–document pairs.
fn measure_neurons(
    embedder: &Embedder,
    fine: &FinePlan,
    inputs: PruneInputs,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Option<Vec<f64>>>> {
    match fine.score {
        NeuronScore::ActivationMagnitude => {
            progress("measuring neuron activations");
            activation_sum_sq(embedder, inputs.calibration, inputs.batch_size)
        }
        NeuronScore::Taylor => {
            progress("computing Taylor scores");
            taylor_scores(embedder, inputs.pairs, inputs.batch_size)
        }
    }
}

/// Each kept MLP's neuron scores, normalised by the layer's mean;
/// `tensor` gives a checkpoint tensor by name (the output projections).
pub(crate) fn neuron_scores(
    map: &CheckpointMap,
    prefix: &str,
    tensor: &dyn Fn(&str) -> Result<Tensor>,
    mlps: &[MlpDecision],
    fine: &FinePlan,
    measured: &[Option<Vec<f64>>],
) -> Result<BTreeMap<usize, Vec<f64>>> {
    let mut scores = BTreeMap::new();
    for (l, decision) in mlps.iter().enumerate() {
        if decision.neurons().is_none() {
            continue;
        }
        let down_name = map.mlp_tensors(prefix, l).down;
        let down = tensor(&down_name)?;
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
        let normalised = raw
            .iter()
            .map(|s| if mean > 0.0 { s / mean } else { 0.0 })
            .collect();
        scores.insert(l, normalised);
    }
    Ok(scores)
}

/// Fine step: each kept MLP keeps its best-scoring neurons, as many as a
/// global ranking above per-layer floors gives it.
pub(crate) fn narrow(
    mlps: &mut [MlpDecision],
    scores: &BTreeMap<usize, Vec<f64>>,
    fine: &FinePlan,
    source_shape: &ModelShape,
) -> Result<()> {
    let floors: HashMap<usize, usize> = scores
        .iter()
        .map(|(&l, s)| (l, fine.floor(s.len())))
        .collect();
    let target = fine.target_neurons(source_shape);
    let floor_total: usize = floors.values().sum();
    if floor_total > target {
        return Err(Error::InvalidArgument(format!(
            "fine.mlp_keep {} is below the per-layer floors ({} neurons of {} needed by min_width_fraction {})",
            fine.mlp_keep,
            floor_total,
            mlp_neurons(source_shape),
            fine.min_width_fraction
        )));
    }
    let flat: Vec<(usize, u32, f64)> = scores
        .iter()
        .flat_map(|(&l, s)| s.iter().enumerate().map(move |(j, v)| (l, j as u32, *v)))
        .collect();
    let remaining = shape_after(source_shape, mlps);
    for (l, width) in allocate_widths(&flat, &floors, &remaining, target, fine.alignment) {
        let mut ranked: Vec<(u32, f64)> = scores[&l]
            .iter()
            .enumerate()
            .map(|(j, s)| (j as u32, *s))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut neurons: Vec<u32> = ranked.iter().take(width).map(|(j, _)| *j).collect();
        neurons.sort_unstable();
        mlps[l] = MlpDecision::Kept { neurons };
    }
    Ok(())
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

/// The record of a pruning run (`effir_prune.json`), written into the
/// pruned model directory and read back by `rewrite` and `validate`.
/// Written with its keys sorted (fields are in that order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneRecord {
    /// NVIDIA DeciLM `block_configs`, where DeciLM can express the model.
    pub decilm_block_configs: Option<serde_json::Value>,
    /// Why DeciLM cannot express the model, where it cannot.
    pub decilm_block_configs_unexpressible: Option<String>,
    /// LLM-Drop's (He et al., "What Matters in Transformers?") lists, also
    /// added to `config.json`, where LLM-Drop's model code reads them.
    pub drop_attn_list: Vec<usize>,
    /// Every MLP the model lacks, including those a pruned source had already lost.
    pub drop_mlp_list: Vec<usize>,
    /// The MLPs this run dropped, in the order it dropped them.
    pub dropped_mlps: Vec<usize>,
    pub effir_version: String,
    pub importance: Vec<crate::compress::analysis::LayerImportance>,
    pub mlp_keep_achieved: f64,
    pub mlp_widths: Vec<Option<usize>>,
    pub plan: PrunePlan,
    /// Each re-fitted MLP's output error on the calibration text, sliced
    /// and re-fitted, when the plan reconstructs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruction: Option<Vec<LayerFit>>,
    /// Relative to the pruned directory in the file; [`PruneRecord::read`]
    /// resolves it.
    pub source_model: PathBuf,
}

impl PruneRecord {
    /// The record in `dir`, if `dir` is a pruned model, its source model
    /// resolved against `dir` (it is recorded relative to it).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let record: Option<Self> = crate::io::json_file::read_json_if_exists(&dir.join(PLAN_FILE))?;
        Ok(record.map(|mut r| {
            r.source_model = crate::io::recorded_path::resolve(dir, &r.source_model);
            r
        }))
    }

    /// The record as `effir_prune.json` holds it (sorted keys, pretty, newline).
    pub fn to_json(&self) -> String {
        crate::io::json_file::to_json_document(self)
    }

    /// What pruning did, for a model card.
    pub fn card_section(&self) -> String {
        let widths: Vec<String> = self
            .mlp_widths
            .iter()
            .map(|w| w.map_or("dropped".into(), |w| w.to_string()))
            .collect();
        format!(
            "- MLPs dropped: {:?}\n- MLP width per layer: {}\n- MLP neurons kept: {:.1} %\n- reconstruction: {}\n\nThe plan:\n\n```json\n{}\n```\n",
            self.drop_mlp_list,
            widths.join(", "),
            100.0 * self.mlp_keep_achieved,
            match &self.reconstruction {
                Some(fits) => format!(
                    "{} narrowed MLP output projections re-fitted by least squares on the calibration text",
                    fits.len()
                ),
                None => "none".into(),
            },
            serde_json::to_string_pretty(&self.plan).unwrap_or_default()
        )
    }
}

/// Stages the pruned model for `out` (which must not exist): sliced
/// weights, the other files of `source` (whose parsed `config.json` is
/// `config`) copied, `effir_shape.json`, `effir_prune.json` (the plan,
/// the decisions, and the LLM-Drop and DeciLM translations), and what
/// `transformers` needs to load it ([`crate::io::transformers_loading`]).
/// The directory is staged beside `out`: the caller adds its reports and
/// publishes it ([`StagedDir::publish`]), so it appears whole or not at all.
pub fn stage_pruned_model(
    source: &Path,
    out: &Path,
    weights: SourceWeights,
    config: &ModelConfig,
    plan: &PrunePlan,
    result: &PruneResult,
) -> Result<StagedDir> {
    let staging = StagedDir::beside(out)?;
    copy_model_files(source, staging.path(), &|name| {
        is_backbone_weights(name) || [SHAPE_FILE, PLAN_FILE, "prune_report.md"].contains(&name)
    })?;
    let kept: Vec<Option<&[u32]>> = result.mlps.iter().map(MlpDecision::neurons).collect();
    match weights {
        SourceWeights::Loaded(tensors) => {
            let mut tensors = slice_weights(tensors, config.checkpoint(), &kept)?;
            if let Some(reconstruction) = &result.reconstruction {
                apply_projections(source, &mut tensors, config.checkpoint(), reconstruction)?;
            }
            let weights = staging.path().join(WEIGHTS_FILE);
            crate::io::atomic_file::save_safetensors(&tensors, &weights)?;
        }
        SourceWeights::Streamed(store) => {
            if result.reconstruction.is_some() {
                return Err(Error::InvalidPlan(
                    "reconstruction is not available when streaming (drop --stream)".into(),
                ));
            }
            write_sliced_weights(store, config.checkpoint(), &kept, staging.path())?;
        }
    }
    let shape = result.shape();
    shape.save(staging.path())?;
    let drop_mlp_list: Vec<usize> = shape
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mlp.is_none())
        .map(|(i, _)| i)
        .collect();
    add_llm_drop_keys(&staging.path().join("config.json"), &drop_mlp_list)?;
    crate::io::transformers_loading::write_loading_files(
        staging.path(),
        config.architecture(),
        &shape,
    )?;
    let decilm = match config.decoder_spec() {
        Some(spec) => crate::compress::decilm::block_configs(spec, &shape),
        None => Err("BERT is an encoder; DeciLM describes Llama-style decoders".to_string()),
    };
    let record = PruneRecord {
        decilm_block_configs: decilm.as_ref().ok().cloned(),
        decilm_block_configs_unexpressible: decilm.err(),
        drop_attn_list: Vec::new(),
        drop_mlp_list,
        dropped_mlps: result.dropped_mlps(),
        effir_version: env!("CARGO_PKG_VERSION").to_string(),
        importance: result.importance.layers.clone(),
        mlp_keep_achieved: result.mlp_keep_achieved(),
        mlp_widths: shape
            .layers
            .iter()
            .map(|l| l.mlp.map(|m| m.intermediate_size))
            .collect(),
        plan: plan.clone(),
        reconstruction: result.reconstruction.as_ref().map(|r| r.fits.clone()),
        source_model: crate::io::recorded_path::relative_to(out, source),
    };
    let record_path = staging.path().join(PLAN_FILE);
    std::fs::write(&record_path, record.to_json()).map_err(|e| Error::io(&record_path, e))?;
    Ok(staging)
}

/// Replaces each reconstructed layer's (sliced) output projection and bias
/// by its re-fit, in the checkpoint's dtype.
fn apply_projections(
    source: &Path,
    tensors: &mut HashMap<String, Tensor>,
    map: &CheckpointMap,
    reconstruction: &Reconstruction,
) -> Result<()> {
    let prefix = map.prefix(tensors.keys());
    for (&l, projection) in &reconstruction.projections {
        let names = map.mlp_tensors(prefix, l);
        let replaced = [
            (names.down.clone(), Some(&projection.weight)),
            (names.down_bias.clone(), projection.bias.as_ref()),
        ];
        for (name, new) in replaced {
            let Some(new) = new else { continue };
            let old = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                path: source.to_path_buf(),
                tensor: name.clone(),
            })?;
            if old.dims() != new.dims() {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the re-fit is {:?}, the sliced tensor {:?}",
                    new.dims(),
                    old.dims()
                )));
            }
            let value = new.to_dtype(old.dtype())?;
            tensors.insert(name, value);
        }
    }
    Ok(())
}

/// Adds LLM-Drop's `drop_mlp_list` and `drop_attn_list` to the copied
/// `config.json` (Hugging Face loaders ignore keys they do not know).
fn add_llm_drop_keys(config_path: &Path, drop_mlp_list: &[usize]) -> Result<()> {
    let mut config: serde_json::Map<String, serde_json::Value> =
        crate::io::json_file::read_json(config_path)?;
    config.insert("drop_mlp_list".into(), serde_json::json!(drop_mlp_list));
    config.insert("drop_attn_list".into(), serde_json::json!([]));
    let text = crate::io::json_file::to_json_document(&config);
    std::fs::write(config_path, text).map_err(|e| Error::io(config_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shape::LayerShape;

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
