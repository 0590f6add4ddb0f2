//! `effir bench`: latency and throughput of graphs under ONNX Runtime at
//! fixed batch sizes and sequence lengths. Inputs are synthetic token ids
//! (no padding), so every graph does the same work; the graphs take turns
//! run by run, and figures are medians of the repeated runs after warm-up.

use std::time::Instant;

use ndarray::Array2;
use ort::session::Session;
use ort::value::Tensor as OrtTensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph_file::GraphFile;
use crate::interface::{ATTENTION_MASK, INPUT_IDS, TOKEN_INPUTS};
use crate::providers::ProviderSettings;
use crate::session::open_session;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub graph: String,
    pub batch: usize,
    pub length: usize,
    pub runs: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// Texts per second at the median latency.
    pub texts_per_second: f64,
}

/// A graph opened for benchmarking.
pub struct BenchSession {
    name: String,
    session: Session,
    inputs: Vec<String>,
    vocab: usize,
}

impl BenchSession {
    pub fn open(path: &std::path::Path, settings: &ProviderSettings) -> Result<Self> {
        let file = GraphFile::read(path)?;
        let inputs: Vec<String> = file.inputs().into_iter().map(|i| i.name).collect();
        for name in &inputs {
            if !TOKEN_INPUTS.contains(&name.as_str()) {
                return Err(Error::Interface {
                    path: path.to_path_buf(),
                    message: format!("input `{name}` is not a token input"),
                });
            }
        }
        // Token ids stay below 1000 and inside the embedding table.
        let vocab = file
            .embedding_rows(INPUT_IDS)
            .unwrap_or(1000)
            .clamp(2, 1000);
        let (session, _) = open_session(path, settings, &inputs)?;
        Ok(Self {
            name: path.display().to_string(),
            session,
            inputs,
            vocab,
        })
    }

    fn run_once(&mut self, batch: usize, length: usize) -> Result<f64> {
        let mut feeds = Vec::new();
        for name in &self.inputs {
            let array = match name.as_str() {
                INPUT_IDS => Array2::from_shape_fn((batch, length), |(b, t)| {
                    (1 + (b * 131 + t * 17) % (self.vocab - 1)) as i64
                }),
                ATTENTION_MASK => Array2::ones((batch, length)),
                _ => Array2::zeros((batch, length)),
            };
            feeds.push((
                name.clone(),
                OrtTensor::from_array(array).map_err(|e| Error::runtime("input tensor", e))?,
            ));
        }
        let start = Instant::now();
        let outputs = self
            .session
            .run(feeds)
            .map_err(|e| Error::runtime(format!("running {}", self.name), e))?;
        let elapsed = start.elapsed().as_secs_f64();
        drop(outputs);
        Ok(elapsed)
    }
}

/// Measures every session at one batch size and length: `warmup`
/// unmeasured runs each, then `runs` rounds in which every session runs once
/// in turn, so that a noisy machine slows them all alike. One result per
/// session, in order.
pub fn measure_interleaved(
    sessions: &mut [BenchSession],
    batch: usize,
    length: usize,
    warmup: usize,
    runs: usize,
) -> Result<Vec<BenchResult>> {
    if batch == 0 || length == 0 || runs == 0 {
        return Err(Error::InvalidArgument(
            "batch, length and runs must be at least 1".into(),
        ));
    }
    for session in sessions.iter_mut() {
        for _ in 0..warmup {
            session.run_once(batch, length)?;
        }
    }
    let mut times = vec![Vec::with_capacity(runs); sessions.len()];
    for _ in 0..runs {
        for (session, times) in sessions.iter_mut().zip(&mut times) {
            times.push(session.run_once(batch, length)?);
        }
    }
    Ok(sessions
        .iter()
        .zip(times)
        .map(|(session, mut times)| {
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let p90 = times[((times.len() * 9) / 10).min(times.len() - 1)];
            BenchResult {
                graph: session.name.clone(),
                batch,
                length,
                runs,
                median_ms: median * 1e3,
                p90_ms: p90 * 1e3,
                texts_per_second: batch as f64 / median,
            }
        })
        .collect())
}
