//! The fine-tuning loop. Weights that train are `Var`s inside an ordinary
//! [`Embedder`], so the model code is the one inference uses; every step
//! samples a batch (seeded), computes its objective (InfoNCE, with
//! distillation of the teacher's scores; or label-free distillation of the
//! teacher's embeddings, and optionally of its last hidden states token by
//! token; or both, with unlabeled texts replayed beside the labeled ones
//! if the run has them), accumulates
//! gradients over micro-batches, clips them and takes an AdamW step.
//! Checkpoints hold everything the next step depends on, so a resumed run
//! continues bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::checkpoint::{self, LoopState};
use super::config::{FinetuneConfig, Objective, TrainedWeights};
use super::data::TrainingExample;
use super::gradient_checkpointing::{backpropagate_stems, embed_checkpointed, Checkpointed};
use super::objective::{
    candidate_scores, distillation_kl, embedding_distance, info_nce, similarity_kl, token_distance,
};
use super::optimizer::{clip_grad_norm, learning_rate, AdamW, AdamWSettings};
use super::teacher::{texts_in_teacher_format, TeacherEmbeddings, TeacherModel};
use super::texts::{TextRole, UnlabeledText};
use crate::data::sampling::{shuffled_indices, SplitMix64};
use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::model::arch::{ModelConfig, ModelInput};
use crate::model::embedder::Embedder;
use crate::model::encoder_setup::LoadOptions;
use crate::model::text_encoder::EncodedText;

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    /// `None` for label-free distillation.
    pub info_nce: Option<f64>,
    pub distillation: Option<f64>,
    /// `1 − cos` (or MSE) to the teacher's embeddings.
    pub embedding_distance: Option<f64>,
    /// KL of the in-batch similarity distributions.
    pub similarity_kl: Option<f64>,
    /// Mean `1 − cos` to the teacher's last hidden states, token by token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_distance: Option<f64>,
    /// The label-free terms (weighted sum) on the unlabeled texts a combined
    /// run adds to each batch (`text_batch_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlabeled_distillation: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub examples_per_second: f64,
    /// Development score when evaluated at this step.
    pub dev: Option<f64>,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrainingOutcome {
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub seconds: f64,
    pub examples_per_second: f64,
    pub final_loss: f64,
    pub best_dev: Option<(f64, usize)>,
    pub trainable_parameters: usize,
}

/// Everything a run needs besides the examples.
pub struct TrainingRun<'a> {
    pub model: &'a Path,
    pub config: &'a FinetuneConfig,
    pub checkpoints: &'a Path,
    pub resume: bool,
    /// A hash of the data and settings; a resumed run must match it.
    pub data_fingerprint: String,
    /// The teacher's embeddings are saved every this many texts while they
    /// are computed, so a run interrupted then resumes there
    /// ([`TeacherEmbeddings::load_or_compute`]).
    pub teacher_part_texts: usize,
}

/// What a run trains on: labeled query–document examples, or unlabeled
/// text for label-free distillation, or both (a combined run whose batches
/// take `text_batch_size` unlabeled texts beside the labeled examples).
#[derive(Debug, Clone, Copy)]
pub enum TrainingData<'a> {
    Pairs(&'a [TrainingExample]),
    Texts(&'a [UnlabeledText]),
    PairsWithTexts {
        pairs: &'a [TrainingExample],
        texts: &'a [UnlabeledText],
    },
}

impl TrainingData<'_> {
    /// Examples (or texts) in one epoch: the labeled examples where there
    /// are any, the unlabeled texts cycling beside them.
    pub fn len(&self) -> usize {
        match self {
            Self::Pairs(e) | Self::PairsWithTexts { pairs: e, .. } => e.len(),
            Self::Texts(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One micro-batch: labeled examples (with the unlabeled texts a combined
/// run adds, possibly none), or unlabeled texts alone.
enum Batch<'a> {
    Pairs {
        pairs: Vec<Sampled<'a>>,
        texts: Vec<&'a str>,
    },
    Texts(Vec<&'a str>),
}

/// One query's texts in a batch.
struct Sampled<'a> {
    query: &'a str,
    positive: &'a str,
    negatives: Vec<&'a str>,
}

/// Trainable variables and the full tensor map the model is built from.
struct Weights {
    all: HashMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

fn prepare_weights(model: &Path, config: &FinetuneConfig) -> Result<Weights> {
    let map = ModelConfig::from_file(&model.join("config.json"))?.checkpoint();
    let mut all: HashMap<String, Tensor> = crate::io::weights::load_all_tensors(model)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let trainable: Vec<String> = match &config.lora {
        Some(lora) => super::lora::add_adapters(&mut all, map, lora, config.seed)?,
        None => {
            let prefix = map.prefix(all.keys());
            let trainable: Vec<String> = all
                .iter()
                .filter(|(name, t)| {
                    t.dtype() == DType::F32
                        && !(config.freeze_embeddings && map.is_embedding(name))
                        && match config.trained {
                            TrainedWeights::All => true,
                            TrainedWeights::Mlp => map.is_mlp_tensor(prefix, name),
                        }
                })
                .map(|(name, _)| name.clone())
                .collect();
            if trainable.is_empty() {
                let why = match config.trained {
                    TrainedWeights::All => "no float weight outside the frozen embeddings",
                    TrainedWeights::Mlp => "trained: mlp, but the model has no MLP weights left",
                };
                return Err(Error::InvalidArgument(format!(
                    "{}: nothing to train ({why})",
                    model.display()
                )));
            }
            trainable
        }
    };
    let mut vars = BTreeMap::new();
    for name in trainable {
        let var = Var::from_tensor(&all[&name])?;
        all.insert(name.clone(), var.as_tensor().clone());
        vars.insert(name, var);
    }
    Ok(Weights { all, vars })
}

/// The forward passes of one micro-batch: ordinary ones, whose graphs the
/// loss's backward pass walks whole, or checkpointed ones
/// (`gradient_checkpointing`), kept for [`ForwardPasses::backward`] to recompute
/// layer by layer.
struct ForwardPasses<'a> {
    embedder: &'a Embedder,
    checkpointed: Option<Vec<Checkpointed>>,
}

impl<'a> ForwardPasses<'a> {
    fn new(embedder: &'a Embedder, config: &FinetuneConfig) -> Self {
        Self {
            embedder,
            checkpointed: config.gradient_checkpointing.then(Vec::new),
        }
    }

    /// Ordinary passes (gradient checks).
    fn plain(embedder: &'a Embedder) -> Self {
        Self {
            embedder,
            checkpointed: None,
        }
    }

    /// Embeddings `(N, D)` of already formatted texts, tracked for gradients.
    fn embed(&mut self, texts: &[&str]) -> Result<Tensor> {
        let input = self.batch(texts)?;
        match &mut self.checkpointed {
            None => self.embedder.embed_batch(&input),
            Some(kept) => {
                let (embeddings, pass) = embed_checkpointed(self.embedder, &input)?;
                kept.push(pass);
                Ok(embeddings)
            }
        }
    }

    /// Embeddings `(N, D)` of already formatted texts with the last hidden
    /// states `(N, T, H)` they were pooled from and the batch they were
    /// computed on, tracked for gradients. Always an ordinary pass, whose
    /// graph the loss's backward pass walks whole (the config refuses the
    /// token term with gradient checkpointing, which would keep less).
    fn embed_with_hidden(&mut self, texts: &[&str]) -> Result<(Tensor, Tensor, ModelInput)> {
        let input = self.batch(texts)?;
        let hidden = self.embedder.hidden_states(&input)?;
        let embeddings = self
            .embedder
            .head()
            .forward(&hidden, &input.attention_mask)?;
        Ok((embeddings, hidden, input))
    }

    /// The padded model input of already formatted texts.
    fn batch(&self, texts: &[&str]) -> Result<ModelInput> {
        let encoded = self.embedder.encode_texts(texts, "")?;
        let refs: Vec<&EncodedText> = encoded.iter().collect();
        self.embedder.batch(&refs)
    }

    /// The gradients of `loss` with respect to `parameters` (and, without
    /// checkpointing, everything else it depends on).
    fn backward(self, loss: &Tensor, parameters: &[&Tensor]) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let mut stems = Vec::new();
        for pass in self.checkpointed.into_iter().flatten() {
            stems.extend(pass.backpropagate_layers(self.embedder, parameters, &mut grads)?);
        }
        backpropagate_stems(&stems, parameters, &mut grads)?;
        Ok(grads)
    }
}

/// The values of a micro-batch's loss terms.
#[derive(Debug, Default, Clone, Copy)]
struct LossParts {
    info_nce: Option<f64>,
    distillation: Option<f64>,
    embedding_distance: Option<f64>,
    similarity_kl: Option<f64>,
    token_distance: Option<f64>,
    unlabeled_distillation: Option<f64>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

/// What a run's teacher gives each step: its cached embeddings (either
/// kind of distillation) and the model itself (the token term).
#[derive(Clone, Copy, Default)]
struct Teacher<'a> {
    embeddings: Option<&'a TeacherEmbeddings>,
    model: Option<&'a Embedder>,
}

/// The loss of one micro-batch and its parts.
fn batch_loss(
    passes: &mut ForwardPasses,
    batch: &Batch,
    config: &FinetuneConfig,
    teacher: Teacher,
) -> Result<(Tensor, LossParts)> {
    match batch {
        Batch::Pairs { pairs, texts } => {
            pairs_loss(passes, pairs, texts, config, teacher.embeddings)
        }
        Batch::Texts(texts) => {
            let embeddings = teacher.embeddings.ok_or_else(|| {
                Error::InvalidArgument("label-free distillation without a teacher".into())
            })?;
            let target = embeddings.embeddings(texts.iter().copied())?;
            texts_loss(passes, texts, &target, teacher.model, config)
        }
    }
}

/// The label-free loss of some texts: the embedding terms against the
/// teacher's embeddings `target` `(N, D)`, plus, with `teacher_model`, the
/// token term against the teacher's last hidden states of the same batch.
fn texts_loss(
    passes: &mut ForwardPasses,
    texts: &[&str],
    target: &Tensor,
    teacher_model: Option<&Embedder>,
    config: &FinetuneConfig,
) -> Result<(Tensor, LossParts)> {
    let mut parts = LossParts::default();
    let token_weight = config
        .embedding_distillation
        .as_ref()
        .map_or(0.0, |e| e.token_weight);
    let (student, token_term) = match teacher_model.filter(|_| token_weight > 0.0) {
        Some(model) => {
            let (student, hidden, input) = passes.embed_with_hidden(texts)?;
            // The teacher reads the student's batch: same tokenizer (checked
            // at load), same truncation and padding.
            let want = model.hidden_states(&input)?.detach();
            let distance = token_distance(&hidden, &want, &input.attention_mask)?;
            parts.token_distance = Some(scalar(&distance)?);
            (student, Some((distance * token_weight)?))
        }
        None => (passes.embed(texts)?, None),
    };
    let mut loss = embedding_terms(&student, target, config, &mut parts)?;
    if let Some(term) = token_term {
        loss = (loss + term)?;
    }
    Ok((loss, parts))
}

/// The label-free terms (`embedding_distillation`) for the student's
/// embeddings of some texts against the teacher's; records their values.
fn embedding_terms(
    student: &Tensor,
    teacher: &Tensor,
    config: &FinetuneConfig,
    parts: &mut LossParts,
) -> Result<Tensor> {
    let e = config.embedding_distillation.as_ref().ok_or_else(|| {
        Error::InvalidArgument("embedding distillation settings are missing".into())
    })?;
    let mut loss: Option<Tensor> = None;
    // Without the embedding term the teacher may have another size: only
    // the similarities of each batch's texts are compared.
    if e.weight > 0.0 {
        let distance = embedding_distance(student, teacher, e.loss)?;
        parts.embedding_distance = Some(scalar(&distance)?);
        loss = Some((distance * e.weight)?);
    }
    if e.similarity_weight > 0.0 && student.dim(0)? >= 2 {
        let kl = similarity_kl(student, teacher, e.similarity_temperature)?;
        parts.similarity_kl = Some(scalar(&kl)?);
        let term = (kl * e.similarity_weight)?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    // A batch of one text has no similarities to learn.
    match loss {
        Some(l) => Ok(l),
        None => Ok(student.zeros_like()?.sum_all()?),
    }
}

/// InfoNCE over in-batch positives and the batch's hard negatives, plus
/// the weighted KL to the teacher's scores over each query's own
/// candidates, plus (`combined`) the label-free terms on every text, and
/// on the unlabeled `texts` the batch carries beside them, if any.
fn pairs_loss(
    passes: &mut ForwardPasses,
    batch: &[Sampled],
    texts: &[&str],
    config: &FinetuneConfig,
    teacher: Option<&TeacherEmbeddings>,
) -> Result<(Tensor, LossParts)> {
    let queries: Vec<&str> = batch.iter().map(|s| s.query).collect();
    let mut docs: Vec<&str> = batch.iter().map(|s| s.positive).collect();
    for s in batch {
        docs.extend(s.negatives.iter().copied());
    }
    let q = passes.embed(&queries)?;
    let d = passes.embed(&docs)?;
    let nce = info_nce(&q, &d, config.temperature)?;
    let mut parts = LossParts {
        info_nce: Some(scalar(&nce)?),
        ..Default::default()
    };
    let mut loss = nce;
    if let (Some(distill), Some(teacher)) = (&config.distillation, teacher) {
        // Candidates of query i: its positive (row i), then its negatives.
        let b = batch.len();
        let per_query = 1 + config.hard_negatives;
        let mut rows = Vec::with_capacity(b * per_query);
        let mut candidates: Vec<Vec<&str>> = Vec::with_capacity(b);
        let mut offset = b;
        for (i, s) in batch.iter().enumerate() {
            rows.push(i as u32);
            for j in 0..s.negatives.len() {
                rows.push((offset + j) as u32);
            }
            offset += s.negatives.len();
            let mut c = vec![s.positive];
            c.extend(s.negatives.iter().copied());
            candidates.push(c);
        }
        let student_candidates = d.index_select(&Tensor::new(rows.as_slice(), d.device())?, 0)?;
        let student = candidate_scores(&q, &student_candidates, per_query)?;
        let target = teacher.scores(&queries, &candidates)?;
        let kl = distillation_kl(&student, &target, distill.temperature)?;
        parts.distillation = Some(scalar(&kl)?);
        loss = (loss + (kl * distill.weight)?)?;
    }
    if config.objective == Objective::Combined {
        let teacher = teacher
            .ok_or_else(|| Error::InvalidArgument("combined objective without a teacher".into()))?;
        let e = config.embedding_distillation.as_ref().ok_or_else(|| {
            Error::InvalidArgument("embedding distillation settings are missing".into())
        })?;
        let student = Tensor::cat(&[&q, &d], 0)?;
        let target = teacher.embeddings(queries.iter().chain(&docs).copied())?;
        let terms = embedding_terms(&student, &target, config, &mut parts)?;
        loss = ((loss * e.contrastive_weight)? + terms)?;
        if !texts.is_empty() {
            // The same terms on the unlabeled texts, compared among
            // themselves; their values are logged as one sum.
            let student = passes.embed(texts)?;
            let target = teacher.embeddings(texts.iter().copied())?;
            let term = embedding_terms(&student, &target, config, &mut LossParts::default())?;
            parts.unlabeled_distillation = Some(scalar(&term)?);
            loss = (loss + term)?;
        }
    }
    Ok((loss, parts))
}

/// The loss of `examples` (first positive, first negatives) with the model's
/// weights replaced by `tensors`: for gradient checks.
pub fn loss_of_examples(
    model: &Path,
    tensors: HashMap<String, Tensor>,
    examples: &[TrainingExample],
    config: &FinetuneConfig,
) -> Result<Tensor> {
    let embedder = embedder_with(model, tensors, config)?;
    let batch: Vec<Sampled> = examples
        .iter()
        .map(|e| Sampled {
            query: &e.query,
            positive: &e.positives[0],
            negatives: e
                .negatives
                .iter()
                .take(config.hard_negatives)
                .map(String::as_str)
                .collect(),
        })
        .collect();
    Ok(pairs_loss(
        &mut ForwardPasses::plain(&embedder),
        &batch,
        &[],
        config,
        None,
    )?
    .0)
}

/// The label-free distillation loss of `texts` against the teacher's
/// embeddings `teacher` (`(N, D)`), and with a token term the teacher model
/// `teacher_model`'s hidden states, with the model's weights replaced by
/// `tensors`: for gradient checks.
pub fn distillation_loss_of_texts(
    model: &Path,
    tensors: HashMap<String, Tensor>,
    texts: &[&str],
    teacher: &Tensor,
    teacher_model: Option<&Embedder>,
    config: &FinetuneConfig,
) -> Result<Tensor> {
    let embedder = embedder_with(model, tensors, config)?;
    let mut passes = ForwardPasses::plain(&embedder);
    Ok(texts_loss(&mut passes, texts, teacher, teacher_model, config)?.0)
}

/// The model in `model` with its weights replaced by `tensors`, encoding
/// at the run's maximum length.
fn embedder_with(
    model: &Path,
    tensors: HashMap<String, Tensor>,
    config: &FinetuneConfig,
) -> Result<Embedder> {
    let options = LoadOptions {
        max_length: config.max_length,
        ..Default::default()
    };
    Embedder::load_with_tensors(model, &options, tensors, &Device::Cpu)
}

/// The shuffled orders a run draws its batches from: the main data's
/// (labeled examples, or unlabeled texts alone) and, in a combined run with
/// unlabeled texts, theirs; each is shuffled again when its epoch ends.
struct Orders {
    main: Vec<usize>,
    texts: Vec<usize>,
}

impl Orders {
    /// The orders of the epochs `state` stands in.
    fn at(data: TrainingData, seed: u64, state: &LoopState) -> Self {
        let texts = match data {
            TrainingData::PairsWithTexts { texts, .. } => {
                text_order(texts.len(), seed, state.text_epoch)
            }
            _ => Vec::new(),
        };
        Self {
            main: epoch_order(data.len(), seed, state.epoch),
            texts,
        }
    }
}

/// Draws the next micro-batch of the data order, moving to the next
/// epoch's order when one ends.
fn next_batch<'a>(
    data: TrainingData<'a>,
    config: &FinetuneConfig,
    state: &mut LoopState,
    orders: &mut Orders,
) -> Batch<'a> {
    let mut rng = SplitMix64::new(state.rng);
    let mut next_index = |state: &mut LoopState| {
        if state.position >= orders.main.len() {
            state.epoch += 1;
            state.position = 0;
            orders.main = epoch_order(data.len(), config.seed, state.epoch);
        }
        state.position += 1;
        orders.main[state.position - 1]
    };
    let batch = match data {
        TrainingData::Texts(texts) => Batch::Texts(
            (0..config.batch_size)
                .map(|_| texts[next_index(state)].text.as_str())
                .collect(),
        ),
        TrainingData::Pairs(examples)
        | TrainingData::PairsWithTexts {
            pairs: examples, ..
        } => {
            let mut batch = Vec::with_capacity(config.batch_size);
            while batch.len() < config.batch_size {
                let e = &examples[next_index(state)];
                let positive = &e.positives[rng.below(e.positives.len())];
                let pool = &e.negatives[..e.negatives.len().min(config.negative_pool)];
                let mut picks: Vec<usize> = (0..pool.len()).collect();
                let mut negatives = Vec::new();
                while negatives.len() < config.hard_negatives && !picks.is_empty() {
                    let k = rng.below(picks.len());
                    negatives.push(pool[picks.swap_remove(k)].as_str());
                }
                batch.push(Sampled {
                    query: &e.query,
                    positive,
                    negatives,
                });
            }
            let texts = match data {
                TrainingData::PairsWithTexts { texts, .. } => {
                    next_texts(texts, config, state, &mut orders.texts)
                }
                _ => Vec::new(),
            };
            Batch::Pairs {
                pairs: batch,
                texts,
            }
        }
    };
    state.rng = rng.next_u64();
    batch
}

/// The next `text_batch_size` unlabeled texts of a combined run, in their
/// own order.
fn next_texts<'a>(
    texts: &'a [UnlabeledText],
    config: &FinetuneConfig,
    state: &mut LoopState,
    order: &mut Vec<usize>,
) -> Vec<&'a str> {
    let n = config
        .embedding_distillation
        .as_ref()
        .map_or(0, |e| e.text_batch_size);
    (0..n)
        .map(|_| {
            if state.text_position >= order.len() {
                state.text_epoch += 1;
                state.text_position = 0;
                *order = text_order(texts.len(), config.seed, state.text_epoch);
            }
            state.text_position += 1;
            texts[order[state.text_position - 1]].text.as_str()
        })
        .collect()
}

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    shuffled_indices(n, seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The unlabeled texts' order in a combined run: a stream of its own, so
/// it does not follow the labeled examples' order.
fn text_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    epoch_order(n, seed ^ 0x5445_5854_5445_5854, epoch)
}

/// Every text a run with a teacher may score (as the student reads it),
/// with whether it is a query.
fn teacher_texts(data: TrainingData, config: &FinetuneConfig) -> BTreeMap<String, bool> {
    match data {
        TrainingData::Texts(texts) => texts
            .iter()
            .map(|t| (t.text.clone(), t.role == TextRole::Query))
            .collect(),
        TrainingData::PairsWithTexts { pairs, texts } => {
            let mut all = teacher_texts(TrainingData::Pairs(pairs), config);
            for t in texts {
                all.entry(t.text.clone())
                    .or_insert(t.role == TextRole::Query);
            }
            all
        }
        TrainingData::Pairs(examples) => {
            let mut texts = BTreeMap::new();
            for e in examples {
                for doc in e
                    .positives
                    .iter()
                    .chain(e.negatives.iter().take(config.negative_pool))
                {
                    texts.entry(doc.clone()).or_insert(false);
                }
            }
            for e in examples {
                texts.insert(e.query.clone(), true);
            }
            texts
        }
    }
}

/// The current weights, detached, with LoRA merged: a plain checkpoint.
pub fn merged_weights(all: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = all
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.detach().copy()?)))
        .collect::<Result<_>>()?;
    super::lora::merge_adapters(&mut out)?;
    Ok(out)
}

/// Runs (or resumes) training; `progress` gets every step's report,
/// `after_checkpoint` each checkpointed step, and `dev_eval` scores the
/// current weights when development evaluation is configured. Returns the
/// outcome and the weights to save (the best development step's, with
/// development evaluation; else the last step's).
pub fn finetune(
    run: &TrainingRun,
    data: TrainingData,
    progress: &mut dyn FnMut(&StepReport),
    after_checkpoint: &mut dyn FnMut(usize),
    teacher_progress: &mut dyn FnMut(usize, usize),
    dev_eval: &mut dyn FnMut(&Embedder) -> Result<f64>,
) -> Result<(TrainingOutcome, HashMap<String, Tensor>)> {
    let config = run.config;
    config.validate()?;
    let text_batch_size = config
        .embedding_distillation
        .as_ref()
        .map_or(0, |e| e.text_batch_size);
    match (config.objective, data) {
        (Objective::Combined, TrainingData::PairsWithTexts { texts, .. }) => {
            if text_batch_size == 0 || texts.is_empty() {
                return Err(Error::InvalidArgument(
                    "unlabeled texts beside labeled examples need \
                     embedding_distillation.text_batch_size (texts a batch) above 0"
                        .into(),
                ));
            }
        }
        (Objective::Combined, TrainingData::Pairs(_)) if text_batch_size > 0 => {
            return Err(Error::InvalidArgument(format!(
                "embedding_distillation.text_batch_size is {text_batch_size}, but the run has \
                 no unlabeled texts (--train-texts, --train-queries)"
            )))
        }
        (Objective::Distill, TrainingData::Texts(_))
        | (Objective::Contrastive | Objective::Combined, TrainingData::Pairs(_)) => {}
        (objective, _) => {
            return Err(Error::InvalidArgument(format!(
                "objective {objective:?} trains on {}",
                if objective == Objective::Distill {
                    "unlabeled text (--train-texts, --train-queries)"
                } else {
                    "labeled examples (--train)"
                }
            )))
        }
    }
    let total_steps = config.total_steps(data.len());
    let mut weights = prepare_weights(run.model, config)?;
    let trainable_parameters = weights.vars.values().map(|v| v.elem_count()).sum();
    let mut adam = AdamW::new(AdamWSettings {
        weight_decay: config.weight_decay,
        ..Default::default()
    });
    let (mut state, resumed_from) = match resume(run, &weights, &mut adam)? {
        Some((step, state)) => (state, Some(step)),
        None => (
            LoopState {
                step: 0,
                epoch: 0,
                position: 0,
                rng: config.seed,
                text_epoch: 0,
                text_position: 0,
                adam_step: 0,
                best: None,
                data_fingerprint: run.data_fingerprint.clone(),
            },
            None,
        ),
    };
    let embedder = embedder_with(run.model, weights.all.clone(), config)?;
    let teacher_model = load_token_teacher(&embedder, config)?;
    let teacher = load_teacher(
        &embedder,
        config,
        data,
        teacher_model.as_ref(),
        run.teacher_part_texts,
        teacher_progress,
    )?;
    let mut orders = Orders::at(data, config.seed, &state);
    let start = Instant::now();
    let steps_at_start = state.step;
    let mut final_loss = f64::NAN;
    let mut best_weights: Option<HashMap<String, Tensor>> = None;
    while state.step < total_steps {
        let step_start = Instant::now();
        let step = accumulate_gradients(
            &embedder,
            &weights,
            data,
            config,
            Teacher {
                embeddings: teacher.as_ref(),
                model: teacher_model.as_ref(),
            },
            &mut state,
            &mut orders,
        )?;
        let mut grads = step.grads;
        let grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm)?;
        let lr = learning_rate(
            config.learning_rate,
            state.step,
            config.warmup_steps,
            total_steps,
            config.decay,
        );
        adam.step(&weights.vars, &grads, lr)?;
        state.step += 1;
        final_loss = step.loss;
        let mut report = StepReport {
            step: state.step,
            total_steps,
            epoch: state.epoch,
            loss: step.loss,
            info_nce: step.parts.info_nce,
            distillation: step.parts.distillation,
            embedding_distance: step.parts.embedding_distance,
            similarity_kl: step.parts.similarity_kl,
            token_distance: step.parts.token_distance,
            unlabeled_distillation: step.parts.unlabeled_distillation,
            learning_rate: lr,
            grad_norm,
            examples_per_second: (config.batch_size * config.gradient_accumulation) as f64
                / step_start.elapsed().as_secs_f64(),
            dev: None,
        };
        if let Some(dev) = &config.dev {
            if state.step.is_multiple_of(dev.every) || state.step == total_steps {
                let score = evaluate_dev(run.model, config, &weights, dev_eval)?;
                report.dev = Some(score);
                if state.best.is_none_or(|(b, _)| score > b) {
                    state.best = Some((score, state.step));
                    best_weights = Some(merged_weights(&weights.all)?);
                }
            }
        }
        progress(&report);
        if config.checkpoint_every > 0
            && state.step.is_multiple_of(config.checkpoint_every)
            && state.step < total_steps
        {
            save_checkpoint(run, &state, &weights, &adam)?;
            after_checkpoint(state.step);
        }
    }
    save_checkpoint(run, &state, &weights, &adam)?;
    let seconds = start.elapsed().as_secs_f64();
    let trained = state.step - steps_at_start;
    let out_weights = match best_weights {
        Some(w) => w,
        None => merged_weights(&weights.all)?,
    };
    weights.all.clear();
    Ok((
        TrainingOutcome {
            steps: state.step,
            resumed_from,
            seconds,
            examples_per_second: (trained * config.batch_size * config.gradient_accumulation)
                as f64
                / seconds.max(1e-9),
            final_loss,
            best_dev: state.best,
            trainable_parameters,
        },
        out_weights,
    ))
}

/// With `--resume`, the newest checkpoint's weights, AdamW moments and loop
/// state, checked against this run's model and data. Returns the step it
/// was taken at and the loop state; `None` to start afresh.
fn resume(
    run: &TrainingRun,
    weights: &Weights,
    adam: &mut AdamW,
) -> Result<Option<(usize, LoopState)>> {
    if !run.resume {
        return Ok(None);
    }
    let Some((step, dir)) = checkpoint::list(run.checkpoints)?.pop() else {
        return Ok(None);
    };
    let ckpt = checkpoint::load(&dir)?;
    let mismatch = |message: String| Error::CheckpointMismatch {
        path: dir.clone(),
        message,
    };
    // Everything is checked before any weight is set.
    for (name, var) in &weights.vars {
        let saved = ckpt.weights.get(name).ok_or_else(|| {
            mismatch(format!(
                "checkpoint has no tensor `{name}`: it was made for a different model shape, \
                 or with other trained tensors (`trained:`, `lora:`)"
            ))
        })?;
        if saved.dims() != var.dims() {
            return Err(mismatch(format!(
                "checkpoint tensor `{name}` is {:?}, the model's is {:?}: a different model shape",
                saved.dims(),
                var.dims()
            )));
        }
    }
    if ckpt.weights.len() != weights.vars.len() {
        return Err(mismatch(format!(
            "checkpoint holds {} trainable tensors, the model {}: a different model shape, \
             or other trained tensors (`trained:`, `lora:`)",
            ckpt.weights.len(),
            weights.vars.len()
        )));
    }
    if ckpt.state.data_fingerprint != run.data_fingerprint {
        return Err(mismatch(
            "checkpoint was made with other training data or settings; start a new run".into(),
        ));
    }
    for (name, var) in &weights.vars {
        var.set(&ckpt.weights[name])?;
    }
    adam.first = ckpt.first;
    adam.second = ckpt.second;
    adam.step = ckpt.state.adam_step;
    tracing::info!(step, "resumed from checkpoint");
    Ok(Some((step, ckpt.state)))
}

/// The teacher's embeddings of every text the run scores, with either kind
/// of distillation, each text truncated at the run's `max_length` as the
/// student's is; cached by teacher weights, length and texts, so runs on
/// the same data share them.
///
/// Embedding distillation's embedding term (`weight` above 0) compares
/// embeddings of the same text, so its teacher must share the student's
/// tokenizer and embedding size. Score distillation and the in-batch
/// similarity term compare only scores: a teacher of another architecture
/// (all-MiniLM-L6-v2 teaching a decoder LLM) reads each text as it formats
/// text itself, its own query prompt in place of the student's; both must
/// write documents the same way.
///
/// `token_teacher`, the teacher the token term already loaded (the same
/// directory, at the same length), embeds the texts instead of a second copy.
fn load_teacher(
    student: &Embedder,
    config: &FinetuneConfig,
    data: TrainingData,
    token_teacher: Option<&Embedder>,
    part_texts: usize,
    teacher_progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<TeacherEmbeddings>> {
    let teacher_dir = match (&config.distillation, &config.embedding_distillation) {
        (_, Some(e)) => &e.teacher,
        (Some(d), None) => &d.teacher,
        (None, None) => return Ok(None),
    };
    let student_dir = student.dir();
    let same_tokenizer = same_tokenizer(student_dir, teacher_dir)?;
    // The embedding term compares the two embeddings of each text directly.
    let compares_embeddings = config
        .embedding_distillation
        .as_ref()
        .is_some_and(|e| e.weight > 0.0);
    if !same_tokenizer && compares_embeddings {
        return Err(Error::InvalidArgument(format!(
            "{}: the teacher's tokenizer.json differs from the student's ({}); \
             embedding distillation's embedding term needs a teacher that reads text the \
             same way (with `weight: 0` only in-batch similarities are learned, which \
             any teacher can teach)",
            teacher_dir.display(),
            student_dir.display()
        )));
    }
    // The teacher reads each text as far as the student does: a target
    // computed from tokens the student never sees (EmbeddingGemma's own
    // limit is 2,048 tokens, a run's often 256) cannot be matched.
    let options = LoadOptions {
        max_length: config.max_length,
        ..Default::default()
    };
    let load = || -> Result<TeacherModel> {
        Ok(match token_teacher {
            Some(teacher) => TeacherModel::Shared(teacher),
            None => TeacherModel::Loaded(Box::new(Embedder::load(teacher_dir, &options)?)),
        })
    };
    let mut loaded = None;
    let texts = teacher_texts(data, config);
    // What the teacher embeds for each student text.
    let teacher_view: BTreeMap<String, String> = if same_tokenizer {
        texts.keys().map(|t| (t.clone(), t.clone())).collect()
    } else {
        let teacher = load()?;
        let ours = TextFormat::for_model(student.setup(), None, None)?;
        let theirs = TextFormat::for_model(teacher.setup(), None, None)?;
        let view = texts_in_teacher_format(&texts, &ours, &theirs).map_err(|message| {
            Error::InvalidArgument(format!(
                "{}: distillation from a teacher with another tokenizer: {message} \
                 (the student: {})",
                teacher_dir.display(),
                student_dir.display()
            ))
        })?;
        loaded = Some(teacher);
        view
    };
    let mut h = blake3::Hasher::new();
    h.update(
        crate::eval::embedding_cache::fingerprint_dir(teacher_dir)?
            .0
            .as_bytes(),
    );
    if let Some(n) = config.max_length {
        h.update(format!("max_length {n}\0").as_bytes());
    }
    for (text, view) in &teacher_view {
        h.update(text.as_bytes());
        h.update(&[0]);
        if text != view {
            h.update(view.as_bytes());
            h.update(&[1]);
        }
    }
    let cache = crate::eval::embedding_cache::EmbeddingCache::default_dir().join(format!(
        "teacher-{}.safetensors",
        &h.finalize().to_hex()[..32]
    ));
    // The embedding term compares embeddings directly: the sizes must
    // match, checked before any text is embedded. The teacher loaded for
    // the check embeds the texts too, if the cache lacks them.
    if compares_embeddings {
        let teacher = match loaded.take() {
            Some(t) => t,
            None => load()?,
        };
        let (teacher_dim, student_dim) = (teacher.dimension(), student.dimension());
        if teacher_dim != student_dim {
            return Err(Error::InvalidArgument(format!(
                "{}: the teacher's embeddings have {teacher_dim} dimensions, the student's ({}) \
                 {student_dim}",
                teacher_dir.display(),
                student_dir.display()
            )));
        }
        loaded = Some(teacher);
    }
    Ok(Some(TeacherEmbeddings::load_or_compute(
        || loaded.map_or_else(load, Ok),
        &teacher_view,
        &cache,
        32,
        part_texts,
        teacher_progress,
    )?))
}

/// The teacher model itself, for the token term (`token_weight` above 0),
/// which compares hidden states of the same tokens: it must read text as
/// the student does and have the student's hidden size. `None` without a
/// token term.
fn load_token_teacher(student: &Embedder, config: &FinetuneConfig) -> Result<Option<Embedder>> {
    let Some(e) = config
        .embedding_distillation
        .as_ref()
        .filter(|e| e.token_weight > 0.0)
    else {
        return Ok(None);
    };
    if !same_tokenizer(student.dir(), &e.teacher)? {
        return Err(Error::InvalidArgument(format!(
            "{}: the teacher's tokenizer.json differs from the student's ({}); the token term \
             (token_weight) compares hidden states of the same tokens",
            e.teacher.display(),
            student.dir().display()
        )));
    }
    let options = LoadOptions {
        max_length: config.max_length,
        ..Default::default()
    };
    let teacher = Embedder::load(&e.teacher, &options)?;
    let (theirs, ours) = (teacher.hidden_size(), student.hidden_size());
    if theirs != ours {
        return Err(Error::InvalidArgument(format!(
            "{}: the teacher's hidden states have {theirs} dimensions, the student's ({}) {ours}; \
             the token term (token_weight) compares them directly",
            e.teacher.display(),
            student.dir().display()
        )));
    }
    Ok(Some(teacher))
}

/// Whether the teacher reads text as the student does: the same `tokenizer.json`.
fn same_tokenizer(student: &Path, teacher: &Path) -> Result<bool> {
    let read = |dir: &Path| -> Result<Vec<u8>> {
        let path = dir.join("tokenizer.json");
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    };
    Ok(read(student)? == read(teacher)?)
}

/// The summed gradients and mean losses of one optimizer step's micro-batches.
struct AccumulatedStep {
    grads: BTreeMap<String, Tensor>,
    loss: f64,
    parts: LossParts,
}

/// Runs `gradient_accumulation` micro-batches forward and backward.
fn accumulate_gradients(
    embedder: &Embedder,
    weights: &Weights,
    data: TrainingData,
    config: &FinetuneConfig,
    teacher: Teacher,
    state: &mut LoopState,
    orders: &mut Orders,
) -> Result<AccumulatedStep> {
    let micro_batches = config.gradient_accumulation as f64;
    let mut step = AccumulatedStep {
        grads: BTreeMap::new(),
        loss: 0.0,
        parts: LossParts::default(),
    };
    let add = |total: &mut Option<f64>, part: Option<f64>| {
        if let Some(v) = part {
            *total.get_or_insert(0.0) += v / micro_batches;
        }
    };
    let parameters: Vec<&Tensor> = weights.vars.values().map(Var::as_tensor).collect();
    for _ in 0..config.gradient_accumulation {
        let batch = next_batch(data, config, state, orders);
        let mut passes = ForwardPasses::new(embedder, config);
        let (loss, parts) = batch_loss(&mut passes, &batch, config, teacher)?;
        let scaled = (loss / micro_batches)?;
        step.loss += scaled.to_scalar::<f32>()? as f64;
        add(&mut step.parts.info_nce, parts.info_nce);
        add(&mut step.parts.distillation, parts.distillation);
        add(&mut step.parts.embedding_distance, parts.embedding_distance);
        add(&mut step.parts.similarity_kl, parts.similarity_kl);
        add(&mut step.parts.token_distance, parts.token_distance);
        add(
            &mut step.parts.unlabeled_distillation,
            parts.unlabeled_distillation,
        );
        let store = passes.backward(&scaled, &parameters)?;
        for (name, var) in &weights.vars {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                let sum = match step.grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                step.grads.insert(name.clone(), sum);
            }
        }
    }
    Ok(step)
}

/// The development score of the current weights (a frozen copy).
fn evaluate_dev(
    model: &Path,
    config: &FinetuneConfig,
    weights: &Weights,
    dev_eval: &mut dyn FnMut(&Embedder) -> Result<f64>,
) -> Result<f64> {
    let snapshot: HashMap<String, Tensor> = weights
        .all
        .iter()
        .map(|(k, v)| (k.clone(), v.detach()))
        .collect();
    let frozen = embedder_with(model, snapshot, config)?;
    dev_eval(&frozen)
}

/// Writes a checkpoint of the trainable weights, AdamW moments and loop state.
fn save_checkpoint(
    run: &TrainingRun,
    state: &LoopState,
    weights: &Weights,
    adam: &AdamW,
) -> Result<()> {
    let current: HashMap<String, Tensor> = weights
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let mut s = state.clone();
    s.adam_step = adam.step;
    checkpoint::save(
        run.checkpoints,
        &s,
        &current,
        &adam.first,
        &adam.second,
        run.config.keep_checkpoints,
    )?;
    Ok(())
}
