//! The pre-norm decoder stack (Llama, Mistral, Qwen2, Qwen3, Gemma3) as an
//! ONNX graph, computing what `effir_pipeline::model::arch::decoder` computes
//! from the same [`DecoderSpec`]. Dropped MLPs emit nothing (their norms go
//! with them); narrowed MLPs get narrowed matrices.

use effir_pipeline::model::arch::decoder::DecoderSpec;
use effir_pipeline::model::arch::layers::{AttentionPattern, Rotary};
use effir_pipeline::ModelShape;

use super::layers::{
    activation, apply_rotary, attention, attention_bias, linear, merge_heads, rms_norm,
    split_heads, BackboneInputs, ScoreBias, SequenceInfo, Weights,
};
use crate::error::{Error, Result};
use crate::graph::GraphBuilder;

/// Emits the stack; returns the last hidden state (after the final norm).
pub fn emit(
    g: &mut GraphBuilder,
    w: &Weights,
    spec: &DecoderSpec,
    shape: &ModelShape,
    inputs: &BackboneInputs,
) -> Result<String> {
    let h = spec.hidden_size;
    let eps = spec.norm_eps;
    let offset = spec.norm_unit_offset;
    let map = spec.checkpoint;
    let (attn_keys, mlp_keys) = (&map.attention, &map.mlp);
    let seq = SequenceInfo::new(g, &inputs.input_ids, &inputs.attention_mask);

    let table_name = format!("{}.weight", map.embeddings.tokens);
    let dims = [spec.vocab_size, h];
    let mut table = g.begin_weight(&table_name, &dims);
    w.for_each_row_block(&table_name, &dims, &mut |rows| table.extend(rows))?;
    let mut x = g.embedding_rows(table, &inputs.input_ids)?;
    if let Some(scale) = spec.embed_scale {
        let s = g.float_scalar(scale as f32);
        x = g.mul(&x, &s);
    }

    // Masks and rotary tables are shared by the layers that use them.
    let mut masks: Vec<(AttentionPattern, String)> = Vec::new();
    let mut rotaries: Vec<(Vec<u32>, (String, String))> = Vec::new();

    for (i, (layer, attn_spec)) in shape.layers.iter().zip(&spec.layers).enumerate() {
        let module = |path: &str| map.layer_module(i, path);
        let (heads, kv_heads, d) = (layer.num_heads, layer.num_kv_heads, layer.head_dim);
        let bias = match masks.iter().find(|(pat, _)| *pat == attn_spec.pattern) {
            Some((_, name)) => name.clone(),
            None => {
                let name = attention_bias(g, &seq, attn_spec.pattern);
                masks.push((attn_spec.pattern, name.clone()));
                name
            }
        };
        let rotary = Rotary::new(d, attn_spec.rope.theta, attn_spec.rope.scaling);
        let rotary_key: Vec<u32> = rotary.inv_freq().iter().map(|f| f.to_bits()).collect();
        let (cos, sin) = match rotaries.iter().find(|(k, _)| *k == rotary_key) {
            Some((_, tables)) => tables.clone(),
            None => {
                let tables = super::layers::rotary_tables(g, &seq, rotary.inv_freq());
                rotaries.push((rotary_key, tables.clone()));
                tables
            }
        };

        // Attention: x + post_norm(o(attn(rope(q), rope(k), v))).
        let input_norm = attn_keys
            .norms
            .input
            .ok_or_else(|| Error::Export("a pre-norm decoder layer has an input norm".into()))?;
        let normed = rms_norm(g, w, &x, &module(input_norm), h, eps, offset)?;
        let q = linear(
            g,
            w,
            &normed,
            &module(attn_keys.query),
            h,
            heads * d,
            spec.qkv_bias,
        )?;
        let k = linear(
            g,
            w,
            &normed,
            &module(attn_keys.key),
            h,
            kv_heads * d,
            spec.qkv_bias,
        )?;
        let v = linear(
            g,
            w,
            &normed,
            &module(attn_keys.value),
            h,
            kv_heads * d,
            spec.qkv_bias,
        )?;
        let mut q = split_heads(g, &q, heads, d);
        let mut k = split_heads(g, &k, kv_heads, d);
        let v = split_heads(g, &v, kv_heads, d);
        if let (Some(query_norm), Some(key_norm)) = (attn_keys.query_norm, attn_keys.key_norm) {
            q = rms_norm(g, w, &q, &module(query_norm), d, eps, offset)?;
            k = rms_norm(g, w, &k, &module(key_norm), d, eps, offset)?;
        }
        let q = apply_rotary(g, &q, &cos, &sin, d);
        let k = apply_rotary(g, &k, &cos, &sin, d);
        let context = attention(
            g,
            &q,
            &k,
            &v,
            ScoreBias::Added(&bias),
            heads,
            kv_heads,
            d,
            spec.attention_scale,
        );
        let merged = merge_heads(g, &context, heads, d);
        let mut y = linear(
            g,
            w,
            &merged,
            &module(attn_keys.output),
            heads * d,
            h,
            spec.o_bias,
        )?;
        if let Some(output_norm) = attn_keys.norms.output {
            y = rms_norm(g, w, &y, &module(output_norm), h, eps, offset)?;
        }
        x = g.add(&x, &y);

        // MLP: x + post_norm(down(act(gate(h)) * up(h))), absent when dropped.
        if let Some(mlp) = layer.mlp {
            let width = mlp.intermediate_size;
            let input_norm = mlp_keys
                .norms
                .input
                .ok_or_else(|| Error::Export("a pre-norm decoder MLP has an input norm".into()))?;
            let gate_module = mlp_keys
                .gate
                .ok_or_else(|| Error::Export("the decoder MLP is gated".into()))?;
            let normed = rms_norm(g, w, &x, &module(input_norm), h, eps, offset)?;
            let gate = linear(g, w, &normed, &module(gate_module), h, width, spec.mlp_bias)?;
            let gate = activation(g, &gate, spec.hidden_act);
            let up = linear(g, w, &normed, &module(mlp_keys.up), h, width, spec.mlp_bias)?;
            let product = g.mul(&gate, &up);
            let mut y = linear(
                g,
                w,
                &product,
                &module(mlp_keys.down),
                width,
                h,
                spec.mlp_bias,
            )?;
            if let Some(output_norm) = mlp_keys.norms.output {
                y = rms_norm(g, w, &y, &module(output_norm), h, eps, offset)?;
            }
            x = g.add(&x, &y);
        }
    }
    let final_norm = map
        .final_norm
        .ok_or_else(|| Error::Export("a decoder has a final norm".into()))?;
    rms_norm(g, w, &x, final_norm, h, eps, offset)
}
