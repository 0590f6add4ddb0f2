//! `effir bench`: ONNX Runtime latency and throughput of one or more graphs
//! (an original and its compressed export, say) at each batch size and
//! sequence length, measured in one run so the ratios are comparable.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use effir_onnx::bench::{measure_interleaved, BenchResult, BenchSession};
use effir_onnx::GraphLocation;
use effir_pipeline::io::atomic_file::write_bytes_atomically;

use super::provider_options::ProviderArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Graphs (.onnx files or export directories); the first is the baseline of the ratios.
    #[arg(long = "graph", required = true)]
    pub graphs: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    pub length: Vec<usize>,
    /// Measured runs per configuration.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Write the results as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub providers: ProviderArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch.contains(&0) || args.length.contains(&0) || args.runs == 0 {
        bail!("--batch, --length and --runs take values of at least 1");
    }
    let settings = args.providers.settings()?;
    let (mut sessions, mut sizes) = (Vec::new(), Vec::new());
    for g in &args.graphs {
        // Only the graph is needed: no tokenizer or model files.
        let graph = GraphLocation::find_graph(g)?;
        let size = effir_onnx::graph_file::graph_bytes(&graph)?;
        sessions.push(
            BenchSession::open(&graph, &settings)
                .with_context(|| format!("opening {}", graph.display()))?,
        );
        sizes.push(size);
    }
    let mut results: Vec<BenchResult> = Vec::new();
    println!(
        "| graph | MB | batch | length | median ms | p90 ms | texts/s | speed-up vs first |\n|---|---|---|---|---|---|---|---|"
    );
    for &batch in &args.batch {
        for &length in &args.length {
            let measured =
                measure_interleaved(&mut sessions, batch, length, args.warmup, args.runs)?;
            let base = measured[0].median_ms;
            for (r, size) in measured.into_iter().zip(&sizes) {
                println!(
                    "| {} | {:.1} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2}x |",
                    r.graph,
                    *size as f64 / 1e6,
                    batch,
                    length,
                    r.median_ms,
                    r.p90_ms,
                    r.texts_per_second,
                    base / r.median_ms
                );
                results.push(r);
            }
        }
    }
    if let Some(out) = &args.out {
        write_bytes_atomically(
            out,
            (serde_json::to_string_pretty(&results)? + "\n").as_bytes(),
        )?;
    }
    Ok(())
}
