//! What a forward pass takes and what may watch or steer it: the padded
//! batch, the residual sub-layers, and the hooks analysis, drop studies and
//! pruning use to skip sub-layers and observe the residual stream.

use candle_core::Tensor;

/// One padded batch of token ids, as the backbones take it.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// `(B, T)`, `u32`.
    pub input_ids: Tensor,
    /// `(B, T)`, `u32`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(B, T)`, `u32`; BERT only.
    pub token_type_ids: Option<Tensor>,
}

/// A residual sub-layer of a transformer layer, or the whole layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sublayer {
    Attention,
    Mlp,
    /// The whole layer (attention and MLP).
    Block,
}

/// Run-time control and observation of a forward pass (analysis, drop
/// studies). `observe` gets the residual stream entering and leaving each
/// residual block: for pre-norm decoders `x` and `x + f(norm(x))`, for
/// post-norm BERT `x` and `LN(x + f(x))`.
pub trait ForwardHooks {
    /// Called with each batch before the layers run on it (a
    /// layer-at-a-time pass calls it once per layer and batch): meters
    /// take the batch's padding mask here.
    fn begin_batch(&mut self, _input: &ModelInput) -> candle_core::Result<()> {
        Ok(())
    }

    /// Whether to bypass a sub-layer (its residual block becomes the identity).
    fn skip(&self, _layer: usize, _sublayer: Sublayer) -> bool {
        false
    }

    fn observe(
        &mut self,
        _layer: usize,
        _sublayer: Sublayer,
        _input: &Tensor,
        _output: &Tensor,
    ) -> candle_core::Result<()> {
        Ok(())
    }

    /// The MLP's intermediate activation `(B, T, I)` (what its output
    /// projection reads: `act(W1 x)` or `act(gate x) * up x`); the returned
    /// tensor replaces it (neuron statistics, masks for Taylor scores).
    fn mlp_activation(&mut self, _layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        Ok(activation)
    }

    /// The MLP's output projection `(B, T, H)`, before the residual sum
    /// and any norm after it; the returned tensor replaces it (pruning's
    /// reconstruction runs already re-fitted projections through it).
    fn mlp_output(&mut self, _layer: usize, output: Tensor) -> candle_core::Result<Tensor> {
        Ok(output)
    }
}

/// Sub-layers bypassed at run time, by layer index (drop studies).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedSublayers {
    pub attention: std::collections::BTreeSet<usize>,
    pub mlp: std::collections::BTreeSet<usize>,
}

impl SkippedSublayers {
    pub fn is_empty(&self) -> bool {
        self.attention.is_empty() && self.mlp.is_empty()
    }
}

impl ForwardHooks for SkippedSublayers {
    fn skip(&self, layer: usize, sublayer: Sublayer) -> bool {
        match sublayer {
            Sublayer::Attention => self.attention.contains(&layer),
            Sublayer::Mlp => self.mlp.contains(&layer),
            Sublayer::Block => false,
        }
    }
}

/// `hooks`, with `skipped` sub-layers bypassed as well.
pub struct WithSkipped<'a> {
    pub skipped: &'a SkippedSublayers,
    pub hooks: &'a mut dyn ForwardHooks,
}

impl ForwardHooks for WithSkipped<'_> {
    fn begin_batch(&mut self, input: &ModelInput) -> candle_core::Result<()> {
        self.hooks.begin_batch(input)
    }
    fn skip(&self, layer: usize, sublayer: Sublayer) -> bool {
        self.skipped.skip(layer, sublayer) || self.hooks.skip(layer, sublayer)
    }
    fn observe(
        &mut self,
        layer: usize,
        sublayer: Sublayer,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        self.hooks.observe(layer, sublayer, input, output)
    }
    fn mlp_activation(&mut self, layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        self.hooks.mlp_activation(layer, activation)
    }
    fn mlp_output(&mut self, layer: usize, output: Tensor) -> candle_core::Result<Tensor> {
        self.hooks.mlp_output(layer, output)
    }
}

/// Hooks that neither skip nor observe.
pub struct NoHooks;

impl ForwardHooks for NoHooks {}

/// Parameter counts of one layer's sub-layers (norms included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParameters {
    pub attention: usize,
    pub mlp: usize,
}
