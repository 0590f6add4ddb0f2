//! BERT as an ONNX graph, computing what `effir_pipeline::model::arch::bert`
//! computes. A layer whose MLP was dropped ends after its attention block's
//! LayerNorm (the output LayerNorm goes with the MLP); narrowed MLPs get
//! narrowed matrices.

use effir_pipeline::model::arch::bert::Config;
use effir_pipeline::model::arch::checkpoint_map::{CheckpointMap, SublayerNorms};
use effir_pipeline::model::arch::layers::Activation;
use effir_pipeline::ModelShape;

use super::layers::{
    activation, attention, attention_bias, layer_norm, linear, merge_heads, split_heads,
    AttentionMask, BackboneInputs, FoldedKeyBias, ScoreBias, SequenceInfo, Weights,
};
use crate::error::{Error, Result};
use crate::graph::GraphBuilder;
use effir_pipeline::model::arch::layers::AttentionPattern;

/// Emits the encoder; returns the last hidden state `(B, T, H)`.
pub fn emit(
    g: &mut GraphBuilder,
    w: &Weights,
    cfg: &Config,
    map: &CheckpointMap,
    shape: &ModelShape,
    inputs: &BackboneInputs,
    mask: AttentionMask,
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
    let keys = &map.embeddings;
    let mut rows_of = |module: Option<&str>, rows: usize, indices: &str| -> Result<String> {
        let module = module
            .ok_or_else(|| Error::Export("BERT has position and token-type embeddings".into()))?;
        let name = format!("{module}.weight");
        let mut table = g.begin_weight(&name, &[rows, h]);
        w.for_each_row_block(&name, &[rows, h], &mut |block| table.extend(block))?;
        g.embedding_rows(table, indices)
    };
    let x_words = rows_of(Some(keys.tokens), cfg.vocab_size, &inputs.input_ids)?;
    let x_types = rows_of(keys.token_types, cfg.type_vocab_size, token_type_ids)?;
    let x_pos = rows_of(keys.positions, cfg.max_position_embeddings, &seq.positions)?; // (T, H)
    let x = g.add(&x_words, &x_types);
    let x = g.add(&x, &x_pos);
    let embedding_norm = keys.norm.unwrap_or_default();
    let mut x = layer_norm(g, w, &x, embedding_norm, h, cfg.layer_norm_eps)?;
    let (attn_keys, mlp_keys) = (&map.attention, &map.mlp);
    let residual_norm = |keys: &SublayerNorms| {
        keys.residual
            .ok_or_else(|| Error::Export("BERT sub-layers end in a LayerNorm".into()))
    };

    let bias = attention_bias(g, &seq, AttentionPattern::Bidirectional);
    let mut folded = (mask == AttentionMask::Folded).then(|| FoldedKeyBias::new(g, &bias));
    for (i, layer) in shape.layers.iter().enumerate() {
        let module = |path: &str| map.layer_module(i, path);
        let inner = layer.num_heads * layer.head_dim;
        // Attention block: LN(x + Attn(x)).
        let q = linear(g, w, &x, &module(attn_keys.query), h, inner, true)?;
        let k = linear(g, w, &x, &module(attn_keys.key), h, inner, true)?;
        let v = linear(g, w, &x, &module(attn_keys.value), h, inner, true)?;
        let q = split_heads(g, &q, layer.num_heads, layer.head_dim);
        let k = split_heads(g, &k, layer.num_heads, layer.head_dim);
        let v = split_heads(g, &v, layer.num_heads, layer.head_dim);
        let scale = 1.0 / (layer.head_dim as f64).sqrt();
        let score_bias = match folded.as_mut() {
            Some(folded) => folded.columns(g, layer.num_heads),
            None => ScoreBias::Added(&bias),
        };
        let context = attention(
            g,
            &q,
            &k,
            &v,
            score_bias,
            layer.num_heads,
            layer.num_heads,
            layer.head_dim,
            scale,
        );
        let merged = merge_heads(g, &context, layer.num_heads, layer.head_dim);
        let out = linear(g, w, &merged, &module(attn_keys.output), inner, h, true)?;
        let residual = g.add(&out, &x);
        x = layer_norm(
            g,
            w,
            &residual,
            &module(residual_norm(&attn_keys.norms)?),
            h,
            cfg.layer_norm_eps,
        )?;
        // MLP block: LN(h + W2 act(W1 h)), absent when dropped.
        if let Some(mlp) = layer.mlp {
            let width = mlp.intermediate_size;
            let up = linear(g, w, &x, &module(mlp_keys.up), h, width, true)?;
            let act = activation(g, &up, act);
            let down = linear(g, w, &act, &module(mlp_keys.down), width, h, true)?;
            let residual = g.add(&down, &x);
            x = layer_norm(
                g,
                w,
                &residual,
                &module(residual_norm(&mlp_keys.norms)?),
                h,
                cfg.layer_norm_eps,
            )?;
        }
    }
    Ok(x)
}
