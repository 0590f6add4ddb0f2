//! The pre-norm decoder stack (Llama, Mistral, Qwen2, Qwen3, Gemma3) as an
//! ONNX graph, computing what `effir_pipeline::models::decoder` computes
//! from the same [`DecoderSpec`]. Dropped MLPs emit nothing (their norms go
//! with them); narrowed MLPs get narrowed matrices.

use effir_pipeline::models::decoder::DecoderSpec;
use effir_pipeline::models::layers::{AttentionPattern, Rotary};
use effir_pipeline::ModelShape;

use super::layers::{
    activation, apply_rotary, attention, attention_bias, linear, merge_heads, rms_norm,
    split_heads, values, SequenceInfo, Weights,
};
use super::BackboneInputs;
use crate::error::Result;
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
    let seq = SequenceInfo::new(g, &inputs.input_ids, &inputs.attention_mask);

    let table = w.get("embed_tokens.weight", &[spec.vocab_size, h])?;
    let table = g.weight(
        "embed_tokens.weight",
        &[spec.vocab_size, h],
        &values(&table)?,
    );
    let mut x = g.gather(&table, &inputs.input_ids, 0);
    if let Some(scale) = spec.embed_scale {
        let s = g.float_scalar(scale as f32);
        x = g.mul(&x, &s);
    }

    // Masks and rotary tables are shared by the layers that use them.
    let mut masks: Vec<(AttentionPattern, String)> = Vec::new();
    let mut rotaries: Vec<(Vec<u32>, (String, String))> = Vec::new();

    for (i, (layer, attn_spec)) in shape.layers.iter().zip(&spec.layers).enumerate() {
        let p = format!("layers.{i}");
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
        let key: Vec<u32> = rotary.inv_freq().iter().map(|f| f.to_bits()).collect();
        let (cos, sin) = match rotaries.iter().find(|(k, _)| *k == key) {
            Some((_, tables)) => tables.clone(),
            None => {
                let tables = super::layers::rotary_tables(g, &seq, rotary.inv_freq());
                rotaries.push((key, tables.clone()));
                tables
            }
        };

        // Attention: x + post_norm(o(attn(rope(q), rope(k), v))).
        let a = format!("{p}.self_attn");
        let normed = rms_norm(g, w, &x, &format!("{p}.input_layernorm"), h, eps, offset)?;
        let q = linear(
            g,
            w,
            &normed,
            &format!("{a}.q_proj"),
            h,
            heads * d,
            spec.qkv_bias,
        )?;
        let k = linear(
            g,
            w,
            &normed,
            &format!("{a}.k_proj"),
            h,
            kv_heads * d,
            spec.qkv_bias,
        )?;
        let v = linear(
            g,
            w,
            &normed,
            &format!("{a}.v_proj"),
            h,
            kv_heads * d,
            spec.qkv_bias,
        )?;
        let mut q = split_heads(g, &q, heads, d);
        let mut k = split_heads(g, &k, kv_heads, d);
        let v = split_heads(g, &v, kv_heads, d);
        if spec.qk_norm {
            q = rms_norm(g, w, &q, &format!("{a}.q_norm"), d, eps, offset)?;
            k = rms_norm(g, w, &k, &format!("{a}.k_norm"), d, eps, offset)?;
        }
        let q = apply_rotary(g, &q, &cos, &sin, d);
        let k = apply_rotary(g, &k, &cos, &sin, d);
        let context = attention(
            g,
            &q,
            &k,
            &v,
            &bias,
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
            &format!("{a}.o_proj"),
            heads * d,
            h,
            spec.o_bias,
        )?;
        if spec.sandwich_norms {
            y = rms_norm(
                g,
                w,
                &y,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                offset,
            )?;
        }
        x = g.add(&x, &y);

        // MLP: x + post_norm(down(act(gate(h)) * up(h))), absent when dropped.
        if let Some(mlp) = layer.mlp {
            let width = mlp.intermediate_size;
            let pre = if spec.sandwich_norms {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            let normed = rms_norm(g, w, &x, &format!("{p}.{pre}"), h, eps, offset)?;
            let m = format!("{p}.mlp");
            let gate = linear(
                g,
                w,
                &normed,
                &format!("{m}.gate_proj"),
                h,
                width,
                spec.mlp_bias,
            )?;
            let gate = activation(g, &gate, spec.hidden_act);
            let up = linear(
                g,
                w,
                &normed,
                &format!("{m}.up_proj"),
                h,
                width,
                spec.mlp_bias,
            )?;
            let product = g.mul(&gate, &up);
            let mut y = linear(
                g,
                w,
                &product,
                &format!("{m}.down_proj"),
                width,
                h,
                spec.mlp_bias,
            )?;
            if spec.sandwich_norms {
                y = rms_norm(
                    g,
                    w,
                    &y,
                    &format!("{p}.post_feedforward_layernorm"),
                    h,
                    eps,
                    offset,
                )?;
            }
            x = g.add(&x, &y);
        }
    }
    rms_norm(g, w, &x, "norm", h, eps, offset)
}
