//! A random-weight model of a named shape, for memory and time checks at
//! the EffiR paper's scale without its weights (issue 18):
//!
//!     cargo run --release --example synthetic_model -- mistral-7b runs/synthetic/mistral-7b
//!
//! Shapes: mistral-7b (hidden 4096, 32 layers, MLP 14336, 32/8 heads,
//! vocab 32000), llama-3b (3072, 28, 8192, 24/8, 128256), llama-200m,
//! tiny. Writes config.json, bf16 safetensors in shards of at most 2 GB
//! (with model.safetensors.index.json when there are several), and a
//! byte-level tokenizer, tensor by
//! tensor (nothing the size of the model is held in memory).

use effir_pipeline::model::synthetic::{write_synthetic_model, SyntheticShape, SHAPES};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
    let usage = || {
        format!(
            "usage: synthetic_model SHAPE OUT [SEED]; shapes: {}",
            names.join(", ")
        )
    };
    let (Some(name), Some(out)) = (args.first(), args.get(1)) else {
        anyhow::bail!(usage());
    };
    let shape = SyntheticShape::named(name)
        .ok_or_else(|| anyhow::anyhow!("unknown shape `{name}`; {}", usage()))?;
    let seed = match args.get(2) {
        Some(s) => s.parse()?,
        None => 0,
    };
    let started = std::time::Instant::now();
    let bytes = write_synthetic_model(&shape, std::path::Path::new(out), 2 << 30, seed)?;
    println!(
        "{out}: {} ({:.1} M parameters, {:.1} MB of bf16 weights) in {:.1}s",
        shape.name,
        shape.parameters() as f64 / 1e6,
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
