//! NVIDIA DeciLM (Nemotron-NAS) `block_configs` for a pruned decoder.
//!
//! DeciLM is Llama with a per-layer block description: each layer's
//! attention and FFN may be a `no_op`, and each FFN's width is given by a
//! multiplier, `ffn_mult`, from which DeciLM derives the intermediate size as
//! `int(2 · ffn_mult · hidden_size / 3)` rounded up to a multiple of 256
//! (`_ffn_mult_to_intermediate_size` in its configuration code). A dropped
//! MLP is an FFN `no_op`; a narrowed MLP can only be expressed when its width
//! is such a multiple of 256. The model must otherwise be plain Llama: no
//! biases, no per-head q/k norms, no Gemma norms, SiLU, causal attention
//! without a window and one rotary setting for every layer.

use serde_json::{json, Value};

use crate::model::arch::decoder::DecoderSpec;
use crate::model::arch::layers::{Activation, AttentionPattern};
use crate::model::shape::ModelShape;

/// DeciLM rounds every FFN width up to a multiple of this.
pub const FFN_WIDTH_MULTIPLE: usize = 256;

/// The intermediate size DeciLM derives from `ffn_mult`.
pub fn intermediate_size(ffn_mult: f64, hidden_size: usize) -> usize {
    let n = (2.0 * ffn_mult * hidden_size as f64 / 3.0) as usize;
    n.div_ceil(FFN_WIDTH_MULTIPLE) * FFN_WIDTH_MULTIPLE
}

/// An `ffn_mult` (rounded to 4 decimals where that still gives the width)
/// for which DeciLM builds an FFN of exactly `width`; `None` when there is
/// none, i.e. when `width` is not a positive multiple of 256.
pub fn ffn_mult_for(width: usize, hidden_size: usize) -> Option<f64> {
    if width == 0 || !width.is_multiple_of(FFN_WIDTH_MULTIPLE) || hidden_size == 0 {
        return None;
    }
    let exact = 3.0 * width as f64 / (2.0 * hidden_size as f64);
    let rounded = (exact * 1e4).round() / 1e4;
    [rounded, exact]
        .into_iter()
        .find(|m| intermediate_size(*m, hidden_size) == width)
}

/// DeciLM `block_configs` (one `{attention, ffn}` entry per layer) for a
/// decoder of `spec` pruned to `shape`, or why DeciLM cannot express it.
pub fn block_configs(spec: &DecoderSpec, shape: &ModelShape) -> Result<Value, String> {
    if spec.qkv_bias || spec.o_bias || spec.mlp_bias {
        return Err("the model has attention or MLP biases; DeciLM's layers have none".into());
    }
    let attention = &spec.checkpoint.attention;
    if attention.query_norm.is_some() {
        return Err(
            "the model normalises each query and key head (q/k norms); DeciLM does not".into(),
        );
    }
    if attention.norms.output.is_some() || spec.norm_unit_offset || spec.embed_scale.is_some() {
        return Err("Gemma-style norms and embedding scaling are not part of DeciLM".into());
    }
    if !matches!(spec.hidden_act, Activation::Silu) {
        return Err(format!(
            "the MLP activation is {:?}; DeciLM's FFN uses SiLU",
            spec.hidden_act
        ));
    }
    if spec
        .layers
        .iter()
        .any(|l| l.pattern != AttentionPattern::Causal)
    {
        return Err(
            "some layers use sliding-window or bidirectional attention; DeciLM's is causal".into(),
        );
    }
    if spec.layers.windows(2).any(|w| w[0].rope != w[1].rope) {
        return Err("layers use different rotary settings; DeciLM has one for all".into());
    }
    let mut blocks = Vec::with_capacity(shape.layers.len());
    for (l, layer) in shape.layers.iter().enumerate() {
        if layer.num_heads * layer.head_dim != spec.hidden_size
            || layer.num_kv_heads == 0
            || layer.num_heads % layer.num_kv_heads != 0
        {
            return Err(format!(
                "layer {l}: {} heads × head_dim {} ({} key/value heads) do not fit DeciLM's \
                 attention over hidden size {}",
                layer.num_heads, layer.head_dim, layer.num_kv_heads, spec.hidden_size
            ));
        }
        let ffn = match layer.mlp {
            None => json!({ "no_op": true, "replace_with_linear": false, "ffn_mult": null }),
            Some(mlp) => {
                let width = mlp.intermediate_size;
                let ffn_mult = ffn_mult_for(width, spec.hidden_size).ok_or_else(|| {
                    format!(
                        "layer {l}'s MLP width {width} is not a multiple of \
                         {FFN_WIDTH_MULTIPLE}, so no ffn_mult gives it (prune with \
                         fine.alignment: {FFN_WIDTH_MULTIPLE} for DeciLM-expressible widths)"
                    )
                })?;
                json!({ "no_op": false, "replace_with_linear": false, "ffn_mult": ffn_mult })
            }
        };
        blocks.push(json!({
            "attention": {
                "no_op": false,
                "replace_with_linear": false,
                "n_heads_in_group": layer.num_heads / layer.num_kv_heads,
            },
            "ffn": ffn,
        }));
    }
    Ok(Value::Array(blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_mult_round_trips_through_decilms_width_formula() {
        // Llama-3-8B: hidden 4096, intermediate 14336 is DeciLM's ffn_mult 5.25.
        assert_eq!(ffn_mult_for(14336, 4096), Some(5.25));
        assert_eq!(intermediate_size(5.25, 4096), 14336);
        for width in [256, 1024, 2816, 11008, 14336] {
            for hidden in [576, 896, 2048, 4096] {
                let m = ffn_mult_for(width, hidden).unwrap();
                assert_eq!(intermediate_size(m, hidden), width, "{width} at {hidden}");
            }
        }
    }

    #[test]
    fn widths_off_the_256_grid_have_no_ffn_mult() {
        assert_eq!(ffn_mult_for(14000, 4096), None);
        assert_eq!(ffn_mult_for(96, 64), None);
        assert_eq!(ffn_mult_for(0, 4096), None);
    }
}
