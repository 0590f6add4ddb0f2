//! Embed a few documents and a query with effir's library API and rank the
//! documents by cosine similarity.
//!
//! ```sh
//! make models
//! cargo run --release --example semantic_search -- models/all-MiniLM-L6-v2 "how do plants make energy?"
//! ```

use anyhow::Context;
use effir_pipeline::{Embedder, LoadOptions, Prompt};

const DOCUMENTS: [&str; 4] = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "Dense retrievers encode queries and documents into vectors.",
    "Water boils at 100 degrees Celsius at sea level.",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into());
    let query = args
        .next()
        .unwrap_or_else(|| "how do plants make energy?".into());

    let embedder = Embedder::load(model.as_ref(), &LoadOptions::default())
        .with_context(|| format!("loading {model}"))?;
    // Models with prompts (EmbeddingGemma) get their query and document prompts.
    let prompt = |name: &str| match embedder.sentence_config().prompts.contains_key(name) {
        true => Prompt::Named(name.into()),
        false => Prompt::None,
    };
    let docs = embedder.embed(
        &DOCUMENTS,
        &embedder.prefix(&prompt("document"))?,
        8,
        &mut |_| {},
    )?;
    let q = embedder.embed(
        &[query.as_str()],
        &embedder.prefix(&prompt("query"))?,
        1,
        &mut |_| {},
    )?;

    let q = q.row(0);
    let mut ranked: Vec<(f32, &str)> = docs
        .rows()
        .into_iter()
        .zip(DOCUMENTS)
        .map(|(d, text)| (d.dot(&q) / (d.dot(&d).sqrt() * q.dot(&q).sqrt()), text))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("query: {query}");
    for (score, text) in ranked {
        println!("  {score:.4}  {text}");
    }
    Ok(())
}
