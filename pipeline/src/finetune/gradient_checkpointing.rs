//! Gradient checkpointing: a training forward pass that keeps only the
//! residual stream entering each layer, and a backward pass that recomputes
//! one layer at a time.
//!
//! candle's backward pass walks a graph that holds every intermediate
//! tensor of the forward pass. For a decoder that is, per layer, the
//! attention scores and their softmax chain (several `(B, H, T, T)`
//! tensors) and the MLP's `(B, T, I)` activations: 30 layers of SmolLM2-135M
//! at 48 texts × 256 tokens hold about 20 GB. With checkpointing the
//! forward pass drops each layer's graph as soon as the layer is done and
//! keeps its `(B, T, H)` input; [`Checkpointed::backpropagate_layers`] then runs
//! each layer again, last first, with the gradient that reached its output,
//! so only one layer's graph is alive at a time. The cost is one more
//! forward pass of the layers.
//!
//! The gradients are those of the ordinary backward pass, operation for
//! operation: each layer's graph is rebuilt from the same input by the same
//! code, and the gradient entering it is the same tensor
//! (`tests/test_gradient_checkpointing.rs` checks whole runs bit for bit).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::model::arch::{LayerContext, ModelInput};
use crate::model::embedder::Embedder;

/// What one checkpointed forward pass keeps for its backward pass.
pub struct Checkpointed {
    context: LayerContext,
    /// The residual stream entering layer 0 as the embeddings computed it
    /// (tracked when the embeddings train).
    stem: Tensor,
    /// The residual stream entering each layer, detached.
    layer_inputs: Vec<Tensor>,
    /// The stream leaving the last layer: the leaf the loss's backward pass
    /// stops at.
    last: Var,
}

/// Embeddings `(B, D)` of one batch whose backward pass goes through
/// [`Checkpointed::backpropagate_layers`]. Each layer's graph is dropped as soon as
/// its output is known.
pub fn embed_checkpointed(
    embedder: &Embedder,
    input: &ModelInput,
) -> Result<(Tensor, Checkpointed)> {
    let (stem, context) = embedder.stem(input)?;
    let mut x = stem.detach();
    let mut layer_inputs = Vec::with_capacity(embedder.layer_count());
    for i in 0..embedder.layer_count() {
        layer_inputs.push(x.clone());
        x = embedder.layer(i, x, &context)?.detach();
    }
    let last = Var::from_tensor(&x)?;
    let embeddings = embedder.embed_last_layer(last.as_tensor().clone(), input)?;
    Ok((
        embeddings,
        Checkpointed {
            context,
            stem,
            layer_inputs,
            last,
        },
    ))
}

impl Checkpointed {
    /// Carries the gradient that `grads` (the loss's backward pass) holds
    /// for the last layer's output back through every layer, adding the
    /// gradients of `parameters` into `grads`. Returns what remains: the
    /// embedding step and the gradient reaching its output, for
    /// [`backpropagate_stems`]; `None` when the loss does not depend on
    /// these embeddings or the embedding step trains nothing. Gradients of
    /// anything else the recomputed graphs touch (masks, rotary tables) are
    /// dropped.
    pub fn backpropagate_layers(
        self,
        embedder: &Embedder,
        parameters: &[&Tensor],
        grads: &mut GradStore,
    ) -> Result<Option<(Tensor, Tensor)>> {
        // Gradients are detached as they pass from one recomputed graph to
        // the next: candle keeps the graph of a leaf's summed gradient, and
        // a layer's backward pass must not walk into the one after it.
        let Some(mut upstream) = grads.remove(self.last.as_tensor()).map(|g| g.detach()) else {
            return Ok(None);
        };
        for (i, x) in self.layer_inputs.into_iter().enumerate().rev() {
            let x = Var::from_tensor(&x)?;
            let output = embedder.layer(i, x.as_tensor().clone(), &self.context)?;
            let layer_grads = surrogate(&output, &upstream)?.backward()?;
            upstream = add_parameter_gradients(layer_grads, parameters, grads, Some(&x))?
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "gradient checkpointing: layer {i}'s output does not depend on its input"
                    ))
                })?
                .detach();
        }
        Ok(self.stem.track_op().then_some((self.stem, upstream)))
    }
}

/// The embedding steps' share of the gradients, for every pass of a
/// micro-batch at once (`(stem, gradient reaching it)` from
/// [`Checkpointed::backpropagate_layers`]), added into `grads`. One backward
/// pass over all of them adds each pass's rows of a shared table into one
/// sum, as the ordinary backward pass does.
pub fn backpropagate_stems(
    stems: &[(Tensor, Tensor)],
    parameters: &[&Tensor],
    grads: &mut GradStore,
) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (stem, upstream) in stems {
        let term = surrogate(stem, upstream)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    if let Some(total) = total {
        add_parameter_gradients(total.backward()?, parameters, grads, None)?;
    }
    Ok(())
}

/// `sum(output ⊙ upstream)`: its gradient with respect to `output` is
/// `upstream` exactly, so its backward pass carries `upstream` through the
/// graph that made `output`.
fn surrogate(output: &Tensor, upstream: &Tensor) -> Result<Tensor> {
    Ok((output * upstream)?.sum_all()?)
}

/// Adds `from`'s gradients of `parameters` into `into`; returns `from`'s
/// gradient of `input`, if asked for.
fn add_parameter_gradients(
    mut from: GradStore,
    parameters: &[&Tensor],
    into: &mut GradStore,
    input: Option<&Var>,
) -> Result<Option<Tensor>> {
    for p in parameters {
        if let Some(g) = from.remove(p).map(|g| g.detach()) {
            let sum = match into.remove(p) {
                Some(existing) => (existing + g)?,
                None => g,
            };
            into.insert(p, sum);
        }
    }
    Ok(input.and_then(|x| from.remove(x.as_tensor())))
}
