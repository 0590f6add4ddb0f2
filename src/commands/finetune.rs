//! `effir finetune`: retrieval fine-tuning of a model directory (pruned or
//! not) into a new model directory: contrastive on labeled pairs, label-free
//! distillation from the unpruned model on unlabeled text, or both.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use effir_pipeline::data::beir::{DanglingPolicy, Dataset};
use effir_pipeline::data::text_format::TextFormat;
use effir_pipeline::eval::evaluation::{evaluate_model, EvalSettings};
use effir_pipeline::finetune::checkpoint;
use effir_pipeline::finetune::data::{load_examples, TrainingExample, TrainingSource};
use effir_pipeline::finetune::record::write_model;
use effir_pipeline::finetune::texts::{load_texts, TextSources, UnlabeledText};
use effir_pipeline::finetune::trainer::{TrainingData, TrainingRun};
use effir_pipeline::finetune::{finetune, FinetuneConfig, FinetuneRecord, Objective};
use effir_pipeline::{EncoderSetup, LoadOptions};

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Model directory to fine-tune (pruned or not).
    #[arg(long, env = "EFFIR_MODEL")]
    pub model: PathBuf,
    /// Labeled training data (objectives contrastive and combined): a BEIR
    /// directory (train qrels) or a JSONL of {query, pos, neg}.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Unlabeled text (repeatable) for `objective: distill`, or beside --train
    /// for `objective: combined` with `embedding_distillation.text_batch_size`
    /// (that many added to each labeled batch): a BEIR directory
    /// (its corpus; for its queries see --train-queries), a JSONL of strings or
    /// {text, title} objects, or a text file with one text per line. No qrels are read.
    #[arg(long = "train-texts", value_name = "PATH")]
    pub train_texts: Vec<PathBuf>,
    /// Unlabeled query text (repeatable; used as --train-texts is), written
    /// with the model's query prompt: a BEIR directory (the text of the
    /// queries of --split; never their judgements), a JSONL of strings or
    /// {text} objects, or a text file with one query per line.
    #[arg(long = "train-queries", value_name = "PATH")]
    pub train_queries: Vec<PathBuf>,
    /// Qrels split of a BEIR --train or --train-queries directory.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Hard negatives (JSONL of query_id, query, pos_ids, neg_ids) for a BEIR --train directory.
    #[arg(long)]
    pub hard_negatives: Option<PathBuf>,
    /// Output model directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Training config (YAML); see configs/finetune-minilm.yaml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint directory [default: OUT.checkpoints].
    #[arg(long)]
    pub checkpoints: Option<PathBuf>,
    /// Continue from the newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Override the config's seed: the order of the training data (and so
    /// which texts share a batch), the sampling of positives and negatives,
    /// LoRA's initialisation and the dev set's document sample.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the config's max_steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// No progress bars (the step log, train_log.jsonl, is written either way).
    #[arg(long)]
    pub quiet: bool,
    /// Save the distillation teacher's embeddings every N texts (rounded up
    /// to a multiple of 1,024, the embedder's batching block, so the
    /// embeddings do not depend on it) while they are computed: a run
    /// interrupted then resumes there instead of starting the teacher over.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub teacher_save_every: u64,
    /// Crash on purpose (abort, no clean-up) after checkpointing this step: for resume tests.
    #[arg(long, hide = true)]
    pub abort_after_step: Option<usize>,
    /// Crash on purpose once the teacher has embedded this many texts
    /// (before saving the part in progress): for resume tests.
    #[arg(long, hide = true)]
    pub abort_after_teacher_texts: Option<usize>,
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let mut config: FinetuneConfig = crate::stage_config::load(args.config.as_deref())?;
    if let Some(n) = args.max_steps {
        config.max_steps = Some(n);
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    config.validate()?;
    if args.out.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            args.out.display()
        );
    }
    let checkpoints = args.checkpoints.clone().unwrap_or_else(|| {
        let mut name = args.out.as_os_str().to_owned();
        name.push(".checkpoints");
        PathBuf::from(name)
    });
    let existing = checkpoint::list(&checkpoints)?;
    if !args.resume && !existing.is_empty() {
        bail!(
            "{}: holds checkpoints of an earlier run; pass --resume to continue it or remove it",
            checkpoints.display()
        );
    }

    // Data before model weights: bad examples fail fast.
    let setup = EncoderSetup::load(
        &args.model,
        &LoadOptions {
            max_length: config.max_length,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let format = TextFormat::for_model(&setup, None, None)?;
    let (examples, texts) = training_data(&args, &config, &format)?;
    let data = match config.objective {
        Objective::Distill => TrainingData::Texts(&texts),
        Objective::Contrastive | Objective::Combined if texts.is_empty() => {
            TrainingData::Pairs(&examples)
        }
        Objective::Contrastive | Objective::Combined => TrainingData::PairsWithTexts {
            pairs: &examples,
            texts: &texts,
        },
    };
    let dev = match &config.dev {
        Some(dev) => {
            let mut data = Dataset::load(&dev.data, &dev.split, DanglingPolicy::Warn)?;
            if let Some(n) = dev.doc_sample {
                data = data.with_document_sample(n, config.seed);
            }
            Some(data)
        }
        None => None,
    };
    let fingerprint = {
        let mut h = match data {
            TrainingData::Pairs(e) => effir_pipeline::finetune::data::fingerprint(e),
            TrainingData::Texts(t) => effir_pipeline::finetune::texts::fingerprint(t),
            TrainingData::PairsWithTexts { pairs, texts } => format!(
                "{}|{}",
                effir_pipeline::finetune::data::fingerprint(pairs),
                effir_pipeline::finetune::texts::fingerprint(texts)
            ),
        };
        // Gradient checkpointing changes memory, not results: a run that
        // ran out of memory resumes with it switched on.
        let results_settings = FinetuneConfig {
            gradient_checkpointing: false,
            ..config.clone()
        };
        h.push_str(&format!(
            "|{}|{}|{}",
            serde_json::to_string(&results_settings)?,
            args.model.display(),
            args.split
        ));
        blake3::hash(h.as_bytes()).to_hex().to_string()
    };
    let total = config.total_steps(data.len());
    eprintln!(
        "{} training {}, {} steps of {} x {}{}",
        data.len(),
        match data {
            TrainingData::Pairs(_) => "examples".to_string(),
            TrainingData::Texts(_) => "texts".to_string(),
            TrainingData::PairsWithTexts { texts, .. } =>
                format!("examples (and {} unlabeled texts beside them)", texts.len()),
        },
        total,
        config.batch_size,
        config.gradient_accumulation,
        if config.lora.is_some() { ", LoRA" } else { "" }
    );

    let bar =
        super::progress::progress_bar(args.quiet, total as u64, super::progress::PHASE_TEMPLATE);
    let created_checkpoints = !checkpoints.exists();
    std::fs::create_dir_all(&checkpoints)
        .with_context(|| format!("creating {}", checkpoints.display()))?;
    let log_path = checkpoints.join("train_log.jsonl");
    // The log continues from the checkpoint the run resumes at (none: from
    // the start), so each step is logged once. Without --resume there are
    // no checkpoints (refused above).
    let resumes_at = existing.last().map_or(0, |(step, _)| *step);
    checkpoint::trim_step_log(&log_path, resumes_at)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let run = TrainingRun {
        model: &args.model,
        config: &config,
        checkpoints: &checkpoints,
        resume: args.resume,
        data_fingerprint: fingerprint,
        teacher_part_texts: args.teacher_save_every as usize,
    };
    let metric = config
        .dev
        .as_ref()
        .map(|d| d.metric.clone())
        .unwrap_or_default();
    let trained = finetune(
        &run,
        data,
        &mut |r| {
            use std::io::Write;
            let _ = writeln!(log, "{}", serde_json::to_string(r).unwrap_or_default());
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} ex/s{}",
                r.loss,
                r.learning_rate,
                r.examples_per_second,
                r.dev.map(|d| format!(" dev {d:.4}")).unwrap_or_default()
            ));
        },
        &mut |step| {
            if args.abort_after_step == Some(step) {
                eprintln!("aborting after checkpoint {step} (--abort-after-step)");
                std::process::abort();
            }
        },
        &mut |done, total| {
            if args.abort_after_teacher_texts.is_some_and(|n| done >= n) {
                eprintln!("aborting after {done} teacher texts (--abort-after-teacher-texts)");
                std::process::abort();
            }
            bar.set_message(format!("teacher embeddings {done}/{total}"));
        },
        &mut |embedder| {
            let data = dev.as_ref().expect("dev data loaded");
            let settings = EvalSettings {
                cache: None,
                ..Default::default()
            };
            let report = evaluate_model(embedder, data, &settings, &mut |_, _, _| {})?;
            Ok(report
                .evaluation
                .mean
                .get(&metric)
                .copied()
                .unwrap_or(f64::NAN))
        },
    );
    let (outcome, weights) = match trained {
        Ok(trained) => trained,
        Err(e) => {
            // A run refused before its first step (a teacher that does not
            // fit the student, say) leaves nothing behind: the checkpoint
            // directory it made holds no checkpoint and an empty log. A run
            // that trained keeps its log and checkpoints for --resume.
            drop(log);
            if created_checkpoints && nothing_trained(&checkpoints, &log_path) {
                let _ = std::fs::remove_dir_all(&checkpoints);
            }
            return Err(e.into());
        }
    };
    bar.finish_and_clear();
    let record = FinetuneRecord {
        config: config.clone(),
        effir_version: env!("CARGO_PKG_VERSION").to_string(),
        hard_negatives: args.hard_negatives.clone(),
        outcome: outcome.clone(),
        paths_relative_to_record: false,
        source_model: args.model.clone(),
        train: args.train.clone(),
        train_texts: args.train_texts.clone(),
        train_queries: args.train_queries.clone(),
        train_queries_split: args
            .train_queries
            .iter()
            .any(|p| p.is_dir())
            .then(|| args.split.clone()),
    };
    write_model(&args.model, &args.out, &weights, &record, Some(&log_path))?;
    println!(
        "wrote {}: {} steps{} in {:.0} s ({:.2} examples/s), final loss {:.4}{}",
        args.out.display(),
        outcome.steps,
        outcome
            .resumed_from
            .map(|s| format!(" (resumed at {s})"))
            .unwrap_or_default(),
        outcome.seconds,
        outcome.examples_per_second,
        outcome.final_loss,
        outcome
            .best_dev
            .map(|(s, step)| format!(", best dev {s:.4} at step {step}"))
            .unwrap_or_default()
    );
    crate::peak_memory::report("finetune");
    Ok(())
}

/// Whether `checkpoints` holds no checkpoint and its step log is empty.
fn nothing_trained(checkpoints: &Path, log_path: &Path) -> bool {
    checkpoint::list(checkpoints).is_ok_and(|c| c.is_empty())
        && std::fs::metadata(log_path).map_or(true, |m| m.len() == 0)
}

/// The labeled examples (contrastive, combined) or the unlabeled texts
/// (distill) the objective trains on, or both for a combined run that adds
/// `text_batch_size` unlabeled texts to each batch; any other source is
/// refused.
fn training_data(
    args: &FinetuneArgs,
    config: &FinetuneConfig,
    format: &TextFormat,
) -> anyhow::Result<(Vec<TrainingExample>, Vec<UnlabeledText>)> {
    let has_unlabeled = !args.train_texts.is_empty() || !args.train_queries.is_empty();
    match (config.objective, &args.train) {
        (Objective::Distill, Some(train)) => bail!(
            "--train {}: objective distill trains on unlabeled text; pass --train-texts \
             (or --train-queries) instead",
            train.display()
        ),
        (Objective::Distill, None) => {
            if !has_unlabeled {
                bail!(
                    "objective distill needs unlabeled text: pass --train-texts PATH \
                     (or --train-queries PATH)"
                );
            }
            let sources = TextSources {
                documents: &args.train_texts,
                queries: &args.train_queries,
                query_split: &args.split,
            };
            Ok((Vec::new(), load_texts(&sources, format)?))
        }
        (objective, None) => bail!(
            "objective {objective:?} trains on labeled examples: pass --train (or set \
             objective: distill in the config for --train-texts and --train-queries)"
        ),
        (objective, Some(train)) => {
            let text_batch_size = config
                .embedding_distillation
                .as_ref()
                .map_or(0, |e| e.text_batch_size);
            if has_unlabeled && text_batch_size == 0 {
                let without = match objective {
                    Objective::Combined => "distills on the texts of its labeled batches only",
                    _ => "learns from the labeled examples only",
                };
                bail!(
                    "--train-texts and --train-queries are for objective distill, or for \
                     objective combined with embedding_distillation.text_batch_size (unlabeled \
                     texts added to each labeled batch) in the config; objective {objective:?} \
                     without it {without}"
                );
            }
            if text_batch_size > 0 && !has_unlabeled {
                bail!(
                    "embedding_distillation.text_batch_size is {text_batch_size}: pass the \
                     unlabeled texts to add to each batch with --train-texts PATH (or \
                     --train-queries PATH)"
                );
            }
            let source = if train.is_dir() {
                TrainingSource::Beir {
                    dir: train,
                    split: &args.split,
                    hard_negatives: args.hard_negatives.as_deref(),
                }
            } else {
                TrainingSource::Jsonl(train)
            };
            let examples = load_examples(&source, format)?;
            let texts = if has_unlabeled {
                let sources = TextSources {
                    documents: &args.train_texts,
                    queries: &args.train_queries,
                    query_split: &args.split,
                };
                load_texts(&sources, format)?
            } else {
                Vec::new()
            };
            Ok((examples, texts))
        }
    }
}
