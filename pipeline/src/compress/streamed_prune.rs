//! EffiR pruning of a model larger than memory (`effir prune --stream`):
//! the same decisions as [`crate::compress::prune::plan_pruning`], measured
//! one layer at a time ([`LayerStream`]), and the pruned weights written
//! one tensor at a time into safetensors shards.
//!
//! (The weights are written by [`crate::compress::pruned_weights`].)
//!
//! The streamed run takes the plans that need one pass per measurement:
//! an explicit list or a one-shot ranking of MLPs to drop, and narrowing by
//! activation magnitude. Iterative dropping (one pass per dropped MLP),
//! Taylor scores (gradients through the whole model) and reconstruction
//! (fits that need the repaired model's inputs) are refused with a clear
//! error rather than run slowly.

use crate::compress::analysis::importance_of_batches;
use crate::compress::prune::{
    drops_without_remeasuring, initial_decisions, narrow, neuron_scores, ActivationMeter,
    NeuronScore, PruneInputs, PrunePlan, PruneResult,
};
use crate::error::{Error, Result};
use crate::model::arch::{SkippedSublayers, WithSkipped};
use crate::model::layer_stream::LayerStream;
use crate::model::shape::ModelShape;

/// Refuses what a streamed run cannot do, naming the plan setting (before
/// any work: callers check this with the plan).
pub fn check_streamable(plan: &PrunePlan, shape: &ModelShape) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::InvalidPlan(format!(
            "{what} is not available with --stream (streaming measures each statistic in one \
             layer-at-a-time pass)"
        )))
    };
    if plan
        .fine
        .as_ref()
        .is_some_and(|f| f.score == NeuronScore::Taylor)
    {
        return refuse("fine.score: taylor");
    }
    if plan.reconstruct.is_some() {
        return refuse("reconstruct");
    }
    if plan.coarse.layers.is_none()
        && plan.coarse.mode == crate::compress::prune::CoarseMode::Iterative
        && plan.drop_count(shape) > 0
    {
        return refuse("coarse.mode: iterative");
    }
    Ok(())
}

/// Measures and decides what to prune, one layer at a time: importance
/// (one pass), the MLPs to drop, then (with a fine step) each remaining
/// neuron's activation magnitude (a second pass without the dropped MLPs)
/// and the widths. `progress` gets a line per pass.
pub fn plan_pruning_streamed(
    stream: &LayerStream,
    plan: &PrunePlan,
    inputs: PruneInputs,
    progress: &mut dyn FnMut(&str),
) -> Result<PruneResult> {
    let _span = tracing::info_span!("prune (streamed)").entered();
    let source_shape = stream.shape().clone();
    plan.validate(&source_shape)?;
    check_streamable(plan, &source_shape)?;
    let layers = source_shape.layers.len();
    progress("measuring sub-layer importance, layer by layer");
    // One tokenization and batching for both passes.
    let batches = stream.batches(inputs.calibration, "", inputs.batch_size)?;
    let importance = importance_of_batches(stream, &batches, &mut |done| {
        tracing::debug!(done, layers, "importance")
    })?;
    let dropped = drops_without_remeasuring(plan, &source_shape, &importance)
        .expect("check_streamable refused iterative plans");
    let mut mlps = initial_decisions(&source_shape, &dropped);
    if let Some(fine) = &plan.fine {
        progress("measuring neuron activations, layer by layer");
        let skipped = SkippedSublayers {
            mlp: dropped.iter().copied().collect(),
            ..Default::default()
        };
        let mut meter = ActivationMeter::new(layers);
        stream.hidden_states(
            &batches,
            &mut WithSkipped {
                skipped: &skipped,
                hooks: &mut meter,
            },
            &mut |done| tracing::debug!(done, layers, "activations"),
        )?;
        let store = stream.store();
        let map = stream.setup().config.checkpoint();
        let scores = neuron_scores(
            map,
            map.prefix(store.names().iter()),
            &|name| store.load_stored(name),
            &mlps,
            fine,
            &meter.sum_sq,
        )?;
        narrow(&mut mlps, &scores, fine, &source_shape)?;
    }
    Ok(PruneResult {
        source_shape,
        mlps,
        importance,
        reconstruction: None,
    })
}
