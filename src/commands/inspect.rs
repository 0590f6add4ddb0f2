//! `effir inspect`: what a model directory holds.

use anyhow::Context;
use clap::Args;
use effir_pipeline::Embedder;

use super::model_options::ModelArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let embedder = Embedder::load(&args.model.model, &args.model.load_options())
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let params = embedder.parameters();
    let shape = embedder.shape();
    let sentence = embedder.sentence_config();
    if args.json {
        let report = serde_json::json!({
            "architecture": embedder.architecture().model_type(),
            "layers": shape.layers.len(),
            "mlp_layers": shape.mlp_count(),
            "embedding_dimension": embedder.dimension(),
            "pooling": embedder.pooling().to_string(),
            "max_length": embedder.text_encoder().max_length(),
            "prompts": sentence.prompts,
            "parameters": params,
            "shape": shape,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model          {}", embedder.dir().display());
    println!("architecture   {}", embedder.architecture());
    println!(
        "layers         {} ({} with an MLP)",
        shape.layers.len(),
        shape.mlp_count()
    );
    println!("embedding dim  {}", embedder.dimension());
    println!("pooling        {}", embedder.pooling());
    println!("max length     {}", embedder.text_encoder().max_length());
    if !sentence.prompts.is_empty() {
        println!(
            "prompts        {}",
            sentence
                .prompts
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!();
    println!(
        "{:>5}  {:>5}  {:>4}  {:>8}  {:>12}  {:>8}  {:>12}",
        "layer", "heads", "kv", "head_dim", "attn params", "mlp width", "mlp params"
    );
    for (i, (layer, p)) in shape.layers.iter().zip(&params.layers).enumerate() {
        let width = layer.mlp.map_or_else(
            || "dropped".to_string(),
            |m| m.intermediate_size.to_string(),
        );
        println!(
            "{i:>5}  {:>5}  {:>4}  {:>8}  {:>12}  {:>8}  {:>12}",
            layer.num_heads, layer.num_kv_heads, layer.head_dim, p.attention, width, p.mlp
        );
    }
    let attention: usize = params.layers.iter().map(|l| l.attention).sum();
    let mlp: usize = params.layers.iter().map(|l| l.mlp).sum();
    println!();
    println!("embeddings     {:>12}", params.embeddings);
    println!("attention      {attention:>12}");
    println!("mlp            {mlp:>12}");
    println!("head (dense)   {:>12}", params.head);
    println!("total          {:>12}", params.total);
    Ok(())
}
