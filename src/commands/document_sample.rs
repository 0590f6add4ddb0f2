//! `--doc-sample N --seed S`, shared by every command that scores or
//! encodes a dataset: a fixed subset of the corpus, every judged document
//! plus random others, N in all.

use anyhow::bail;
use clap::Args;
use effir_pipeline::data::beir::Dataset;

#[derive(Debug, Clone, Default, Args)]
pub struct DocumentSampleArgs {
    /// Use a fixed subset of the corpus: every judged document plus random ones, this many in all.
    #[arg(long)]
    pub doc_sample: Option<usize>,
    /// Seed of the document sample (and of the command's other random choices).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DocumentSampleArgs {
    /// Rejects an empty sample, before any work.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.doc_sample == Some(0) {
            bail!("--doc-sample must be at least 1");
        }
        Ok(())
    }

    /// `dataset` with its corpus sampled, or as it is without `--doc-sample`.
    pub fn apply(&self, dataset: Dataset) -> Dataset {
        match self.doc_sample {
            Some(n) => dataset.with_document_sample(n, self.seed),
            None => dataset,
        }
    }

    /// What a run scored on, for its reports: `sampled` of `full` documents.
    pub fn describe(&self, sampled: usize, full: usize) -> String {
        if sampled < full {
            format!(
                "{sampled} of {full} documents (every judged document plus a random sample, seed {})",
                self.seed
            )
        } else {
            format!("all {full} documents")
        }
    }
}
