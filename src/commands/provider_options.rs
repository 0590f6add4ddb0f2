//! Flags choosing ONNX Runtime execution providers, shared by every command
//! that runs a graph.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use effir_onnx::providers::{parse_order, GraphOptimization, ProviderSettings};

#[derive(Debug, Clone, Args)]
pub struct ProviderArgs {
    /// Execution providers in order of preference, e.g. tensorrt,cuda,cpu [default: cpu].
    #[arg(long)]
    pub providers: Option<String>,
    /// Fail when a requested provider cannot be registered instead of falling back.
    #[arg(long)]
    pub strict_providers: bool,
    /// Provider settings (YAML: order, strict, threads, tensorrt: {...}, cuda: {...}); flags override.
    #[arg(long)]
    pub provider_config: Option<PathBuf>,
    /// ONNX Runtime intra-op threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// `none` runs the graph as stored: a graph with half-precision weights
    /// (`export --fp16`/`--bf16`) then holds them at that size instead of
    /// ONNX Runtime's float32 copies, for less speed [default: all].
    #[arg(long)]
    pub graph_optimization: Option<GraphOptimization>,
}

impl ProviderArgs {
    pub fn settings(&self) -> anyhow::Result<ProviderSettings> {
        let mut settings: ProviderSettings = match &self.provider_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read provider config", path.display()))?;
                serde_yaml::from_str(&text)
                    .with_context(|| format!("{}: invalid provider config", path.display()))?
            }
            None => ProviderSettings::default(),
        };
        if let Some(list) = &self.providers {
            settings.order = parse_order(list)?;
        }
        if self.strict_providers {
            settings.strict = true;
        }
        if let Some(threads) = self.threads {
            settings.threads = threads;
        }
        if let Some(level) = self.graph_optimization {
            settings.graph_optimization = level;
        }
        if settings.order.is_empty() {
            anyhow::bail!("the provider list is empty; expected some of tensorrt, cuda, cpu");
        }
        Ok(settings)
    }
}
