//! Sub-layer importance (EffiR, Lei et al. 2025, §3): for every layer, how
//! much its attention sub-layer, its MLP sub-layer and the whole layer change
//! the residual stream, as `1 - cos(x_in, x_out)` averaged over the
//! non-padding tokens of calibration text. A sub-layer that barely turns the
//! stream is redundant: the paper finds MLPs far more so than attention.
//! [`measure_importance_at`] can average over the positions the model's
//! pooling reads instead (a last-token retriever's embedding is the last
//! token's stream alone).

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::arch::{ForwardHooks, ModelInput, Sublayer};
use crate::model::embedder::Embedder;
use crate::model::layer_stream::{LayerStream, StreamBatch};
use crate::model::pooling::Pooling;

/// Importance of one layer's parts; `None` for a sub-layer that is absent or
/// skipped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct LayerImportance {
    pub layer: usize,
    pub attention: Option<f64>,
    pub mlp: Option<f64>,
    pub block: f64,
}

/// The importance of every layer, over `tokens` calibration tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportanceReport {
    pub layers: Vec<LayerImportance>,
    pub texts: usize,
    pub tokens: usize,
    /// `None`: every real token was measured; `Some(p)`: only the
    /// positions pooling `p` reads ([`Pooling::read_positions`]).
    pub pooled_positions: Option<Pooling>,
}

/// Which positions of the calibration text an importance averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasuredPositions {
    /// Every real (non-padding) token, as the paper measures.
    AllTokens,
    /// Only the positions this pooling reads: the last real token for a
    /// last-token retriever, the first for CLS, every real token for mean.
    ReadBy(Pooling),
}

impl MeasuredPositions {
    fn weights(self, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::AllTokens => attention_mask.to_dtype(DType::F32),
            Self::ReadBy(pooling) => pooling.read_positions(attention_mask),
        }
    }

    fn pooling(self) -> Option<Pooling> {
        match self {
            Self::AllTokens => None,
            Self::ReadBy(pooling) => Some(pooling),
        }
    }
}

/// How `importance.json` (written by `effir analyze` and `effir drop-study`)
/// stores a report.
#[derive(Debug, serde::Deserialize)]
struct ImportanceFile {
    layers: Vec<LayerImportance>,
    calibration: CalibrationSummary,
}

#[derive(Debug, serde::Deserialize)]
struct CalibrationSummary {
    texts: usize,
    tokens: usize,
    #[serde(default)]
    pooled_positions: Option<Pooling>,
}

impl ImportanceReport {
    /// Reads the report from an `importance.json` of `effir analyze` or
    /// `effir drop-study`.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let file: ImportanceFile = crate::io::json_file::read_json(path)?;
        let invalid = |message: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        if file.layers.is_empty() {
            return Err(invalid("no layers in the importance report".into()));
        }
        let mut indices: Vec<usize> = file.layers.iter().map(|l| l.layer).collect();
        indices.sort_unstable();
        if indices != (0..file.layers.len()).collect::<Vec<_>>() {
            return Err(invalid(format!(
                "layer indices {indices:?} are not each of 0..{} once",
                file.layers.len()
            )));
        }
        Ok(Self {
            layers: file.layers,
            texts: file.calibration.texts,
            tokens: file.calibration.tokens,
            pooled_positions: file.calibration.pooled_positions,
        })
    }

    /// Layers whose MLP is present, least important first.
    pub fn mlps_by_importance(&self) -> Vec<(usize, f64)> {
        let mut v: Vec<(usize, f64)> = self
            .layers
            .iter()
            .filter_map(|l| l.mlp.map(|m| (l.layer, m)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Layers whose attention is present, least important first.
    pub fn attention_by_importance(&self) -> Vec<(usize, f64)> {
        let mut v: Vec<(usize, f64)> = self
            .layers
            .iter()
            .filter_map(|l| l.attention.map(|m| (l.layer, m)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// Sums of `1 - cos` over the measured positions, per layer and sub-layer.
struct CosineDistanceMeter {
    positions: MeasuredPositions,
    /// `(B, T)` f32 weights of the current batch's measured positions.
    mask: Option<Tensor>,
    sums: Vec<[f64; 3]>,
    seen: Vec<[bool; 3]>,
}

fn slot(sublayer: Sublayer) -> usize {
    match sublayer {
        Sublayer::Attention => 0,
        Sublayer::Mlp => 1,
        Sublayer::Block => 2,
    }
}

impl CosineDistanceMeter {
    fn new(layers: usize, positions: MeasuredPositions) -> Self {
        Self {
            positions,
            mask: None,
            sums: vec![[0.0; 3]; layers],
            seen: vec![[false; 3]; layers],
        }
    }

    /// The mean distances over `tokens` real tokens of `texts` texts.
    fn report(&self, texts: usize, tokens: usize) -> Result<ImportanceReport> {
        if tokens == 0 {
            return Err(Error::InvalidArgument(
                "the calibration text has no tokens".into(),
            ));
        }
        let mean = |layer: usize, s: Sublayer| {
            self.seen[layer][slot(s)].then(|| self.sums[layer][slot(s)] / tokens as f64)
        };
        Ok(ImportanceReport {
            layers: (0..self.sums.len())
                .map(|l| LayerImportance {
                    layer: l,
                    attention: mean(l, Sublayer::Attention),
                    mlp: mean(l, Sublayer::Mlp),
                    block: mean(l, Sublayer::Block).unwrap_or(0.0),
                })
                .collect(),
            texts,
            tokens,
            pooled_positions: self.positions.pooling(),
        })
    }
}

/// Measured positions and texts with at least one of them, in a batch.
fn count_tokens(input: &ModelInput, positions: MeasuredPositions) -> Result<(usize, usize)> {
    let lengths: Vec<f32> = positions
        .weights(&input.attention_mask)?
        .sum(1)?
        .to_vec1()?;
    Ok((
        lengths.iter().sum::<f32>() as usize,
        lengths.iter().filter(|l| **l > 0.0).count(),
    ))
}

impl ForwardHooks for CosineDistanceMeter {
    fn begin_batch(&mut self, input: &ModelInput) -> candle_core::Result<()> {
        self.mask = Some(self.positions.weights(&input.attention_mask)?);
        Ok(())
    }

    fn observe(
        &mut self,
        layer: usize,
        sublayer: Sublayer,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        let mask = self.mask.as_ref().expect("mask set before each batch");
        // Per token: 1 - <x, y> / (|x| |y|), then summed over real tokens.
        let dot = (input * output)?.sum(D::Minus1)?;
        let norms =
            (input.sqr()?.sum(D::Minus1)?.sqrt()? * output.sqr()?.sum(D::Minus1)?.sqrt()?)?;
        let cos = (dot / norms.clamp(1e-12, f64::INFINITY)?)?;
        let distance = (cos.ones_like()? - cos)?;
        let total = (distance * mask)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        self.sums[layer][slot(sublayer)] += total;
        self.seen[layer][slot(sublayer)] = true;
        Ok(())
    }
}

/// Measures every sub-layer's importance on `texts` (already prompted or
/// plain), in batches of `batch_size`, over every real token. `progress`
/// gets texts done.
pub fn measure_importance<S: AsRef<str>>(
    embedder: &Embedder,
    texts: &[S],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    measure_importance_at(
        embedder,
        texts,
        batch_size,
        MeasuredPositions::AllTokens,
        progress,
    )
}

/// [`measure_importance`] averaged over `positions` only.
pub fn measure_importance_at<S: AsRef<str>>(
    embedder: &Embedder,
    texts: &[S],
    batch_size: usize,
    positions: MeasuredPositions,
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    let _span = tracing::info_span!("analyze", texts = texts.len()).entered();
    let mut meter = CosineDistanceMeter::new(embedder.shape().layers.len(), positions);
    let (mut done, mut tokens, mut used_texts) = (0, 0, 0);
    embedder.for_each_batch(texts, "", batch_size, &mut |input, indices| {
        let (batch_tokens, batch_texts) = count_tokens(input, positions)?;
        tokens += batch_tokens;
        used_texts += batch_texts;
        meter.begin_batch(input)?;
        embedder.hidden_states_hooked(input, &mut meter)?;
        done += indices.len();
        progress(done);
        Ok(())
    })?;
    meter.report(used_texts, tokens)
}

/// [`measure_importance`] one layer at a time (models larger than
/// memory): the same report, bit for bit. `progress` gets layers done.
pub fn measure_importance_streamed<S: AsRef<str>>(
    stream: &LayerStream,
    texts: &[S],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    measure_importance_streamed_at(
        stream,
        texts,
        batch_size,
        MeasuredPositions::AllTokens,
        progress,
    )
}

/// [`measure_importance_streamed`] averaged over `positions` only.
pub fn measure_importance_streamed_at<S: AsRef<str>>(
    stream: &LayerStream,
    texts: &[S],
    batch_size: usize,
    positions: MeasuredPositions,
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    let _span = tracing::info_span!("analyze (streamed)", texts = texts.len()).entered();
    let batches = stream.batches(texts, "", batch_size)?;
    importance_of_batches_at(stream, &batches, positions, progress)
}

/// [`measure_importance_streamed`] on texts already batched by
/// [`LayerStream::batches`] (a pruning run reuses them for its second pass).
pub fn importance_of_batches(
    stream: &LayerStream,
    batches: &[StreamBatch],
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    importance_of_batches_at(stream, batches, MeasuredPositions::AllTokens, progress)
}

fn importance_of_batches_at(
    stream: &LayerStream,
    batches: &[StreamBatch],
    positions: MeasuredPositions,
    progress: &mut dyn FnMut(usize),
) -> Result<ImportanceReport> {
    let (mut tokens, mut used_texts) = (0, 0);
    for batch in batches {
        let (batch_tokens, batch_texts) = count_tokens(&batch.input, positions)?;
        tokens += batch_tokens;
        used_texts += batch_texts;
    }
    let mut meter = CosineDistanceMeter::new(stream.shape().layers.len(), positions);
    stream.hidden_states(batches, &mut meter, progress)?;
    meter.report(used_texts, tokens)
}

impl ImportanceReport {
    /// A Markdown table: one row per layer.
    pub fn markdown(&self, title: &str) -> String {
        let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
        let over = match self.pooled_positions {
            None => format!("{} tokens of {} texts", self.tokens, self.texts),
            Some(pooling) => format!(
                "the {} positions {pooling} pooling reads in {} texts",
                self.tokens, self.texts
            ),
        };
        let mut md = format!(
            "# {title}\n\nImportance = 1 − cos(x_in, x_out) of the residual stream, mean over {over}.\n\n| layer | attention | MLP | block |\n|---:|---:|---:|---:|\n"
        );
        for l in &self.layers {
            md.push_str(&format!(
                "| {} | {} | {} | {:.4} |\n",
                l.layer,
                cell(l.attention),
                cell(l.mlp),
                l.block
            ));
        }
        let mlps = self.mlps_by_importance();
        if !mlps.is_empty() {
            let order: Vec<String> = mlps.iter().map(|(l, _)| l.to_string()).collect();
            md.push_str(&format!(
                "\nMLPs, least important first: {}\n",
                order.join(", ")
            ));
        }
        md
    }

    /// A grouped bar chart of attention and MLP importance per layer.
    pub fn svg(&self, title: &str) -> String {
        let labels: Vec<String> = self.layers.iter().map(|l| l.layer.to_string()).collect();
        crate::compress::chart::bar_chart(
            title,
            "layer",
            "1 - cos(x_in, x_out)",
            &labels,
            &[
                crate::compress::chart::Series {
                    name: "attention",
                    color: "#4e79a7",
                    values: self.layers.iter().map(|l| l.attention).collect(),
                },
                crate::compress::chart::Series {
                    name: "MLP",
                    color: "#f28e2b",
                    values: self.layers.iter().map(|l| l.mlp).collect(),
                },
            ],
        )
    }
}
