//! BERT as an ONNX graph, computing what `effir_pipeline::models::bert`
//! computes. A layer whose MLP was dropped ends after its attention block's
//! LayerNorm (the output LayerNorm goes with the MLP); narrowed MLPs get
//! narrowed matrices.

use effir_pipeline::models::bert::Config;
use effir_pipeline::models::layers::Activation;
use effir_pipeline::ModelShape;

use super::layers::{
    activation, attention, attention_bias, layer_norm, linear, merge_heads, split_heads, values,
    SequenceInfo, Weights,
};
use super::BackboneInputs;
use crate::error::{Error, Result};
use crate::graph::GraphBuilder;
use effir_pipeline::models::layers::AttentionPattern;

/// Emits the encoder; returns the last hidden state `(B, T, H)`.
pub fn emit(
    g: &mut GraphBuilder,
    w: &Weights,
    cfg: &Config,
    shape: &ModelShape,
    inputs: &BackboneInputs,
) -> Result<String> {
    let h = cfg.hidden_size;
    let act = Activation::from_hf(&cfg.hidden_act)
        .ok_or_else(|| Error::Export(format!("hidden_act `{}`", cfg.hidden_act)))?;
    let token_type_ids = inputs
        .token_type_ids
        .as_deref()
        .ok_or_else(|| Error::Export("BERT needs a token_type_ids input".into()))?;
    let seq = SequenceInfo::new(g, &inputs.input_ids, &inputs.attention_mask);

    // Embeddings: word + token type + position, then LayerNorm.
    let word = w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
    let word = g.weight(
        "embeddings.word_embeddings.weight",
        &[cfg.vocab_size, h],
        &values(&word)?,
    );
    let types = w.get(
        "embeddings.token_type_embeddings.weight",
        &[cfg.type_vocab_size, h],
    )?;
    let types = g.weight(
        "embeddings.token_type_embeddings.weight",
        &[cfg.type_vocab_size, h],
        &values(&types)?,
    );
    let positions = w.get(
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, h],
    )?;
    let positions = g.weight(
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, h],
        &values(&positions)?,
    );
    let x_words = g.gather(&word, &inputs.input_ids, 0);
    let x_types = g.gather(&types, token_type_ids, 0);
    let x_pos = g.gather(&positions, &seq.positions, 0); // (T, H)
    let x = g.add(&x_words, &x_types);
    let x = g.add(&x, &x_pos);
    let mut x = layer_norm(g, w, &x, "embeddings.LayerNorm", h, cfg.layer_norm_eps)?;

    let bias = attention_bias(g, &seq, AttentionPattern::Bidirectional);
    for (i, layer) in shape.layers.iter().enumerate() {
        let p = format!("encoder.layer.{i}");
        let inner = layer.num_heads * layer.head_dim;
        // Attention block: LN(x + Attn(x)).
        let a = format!("{p}.attention");
        let q = linear(g, w, &x, &format!("{a}.self.query"), h, inner, true)?;
        let k = linear(g, w, &x, &format!("{a}.self.key"), h, inner, true)?;
        let v = linear(g, w, &x, &format!("{a}.self.value"), h, inner, true)?;
        let q = split_heads(g, &q, layer.num_heads, layer.head_dim);
        let k = split_heads(g, &k, layer.num_heads, layer.head_dim);
        let v = split_heads(g, &v, layer.num_heads, layer.head_dim);
        let scale = 1.0 / (layer.head_dim as f64).sqrt();
        let context = attention(
            g,
            &q,
            &k,
            &v,
            &bias,
            layer.num_heads,
            layer.num_heads,
            layer.head_dim,
            scale,
        );
        let merged = merge_heads(g, &context, layer.num_heads, layer.head_dim);
        let out = linear(g, w, &merged, &format!("{a}.output.dense"), inner, h, true)?;
        let residual = g.add(&out, &x);
        x = layer_norm(
            g,
            w,
            &residual,
            &format!("{a}.output.LayerNorm"),
            h,
            cfg.layer_norm_eps,
        )?;
        // MLP block: LN(h + W2 act(W1 h)), absent when dropped.
        if let Some(mlp) = layer.mlp {
            let width = mlp.intermediate_size;
            let up = linear(g, w, &x, &format!("{p}.intermediate.dense"), h, width, true)?;
            let act = activation(g, &up, act);
            let down = linear(g, w, &act, &format!("{p}.output.dense"), width, h, true)?;
            let residual = g.add(&down, &x);
            x = layer_norm(
                g,
                w,
                &residual,
                &format!("{p}.output.LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?;
        }
    }
    Ok(x)
}
