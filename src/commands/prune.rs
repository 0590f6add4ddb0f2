//! `effir prune`: coarse MLP dropping and fine width reduction into a new,
//! smaller model directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use effir_pipeline::compress::prune::{
    check_taylor_inputs, plan_pruning, stage_pruned_model, CoarseMode, CoarsePlan, FinePlan,
    NeuronScore, PruneInputs, PrunePlan, PruneRecord, SourceWeights,
};
use effir_pipeline::compress::reconstruct::{LayerFit, ReconstructPlan};
use effir_pipeline::compress::streamed_prune::{check_streamable, plan_pruning_streamed};
use effir_pipeline::data::calibration::{training_pairs, CalibrationBudget, CalibrationSet};
use effir_pipeline::io::atomic_file::write_bytes_atomically;
use effir_pipeline::io::model_card::{command_line, ModelCard};
use effir_pipeline::io::recorded_path::relative_to;
use effir_pipeline::io::transformers_loading::read_loading_form;
use effir_pipeline::io::weights::load_all_tensors;
use effir_pipeline::model::layer_stream::LayerStream;
use effir_pipeline::{Embedder, ParameterReport, Prompt};

use super::model_options::{ModelArgs, OpenedModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    OneShot,
    Iterative,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScoreArg {
    /// ‖W_out[:, j]‖ · sqrt(E[a_j²]) over calibration tokens.
    Activation,
    /// First-order Taylor of the contrastive loss over query–document pairs.
    Taylor,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// New directory for the pruned model (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Pruning plan (YAML, e.g. configs/prune-minilm-50.yaml).
    #[arg(long, conflicts_with_all = ["drop_mlp", "drop_fraction", "mlp_keep", "drop_layers"])]
    pub plan: Option<PathBuf>,
    /// Drop this many MLP sub-layers, least important first.
    #[arg(long)]
    pub drop_mlp: Option<usize>,
    /// Or drop this fraction of the MLP sub-layers (rounded down), least important first.
    #[arg(long, conflicts_with = "drop_mlp")]
    pub drop_fraction: Option<f64>,
    /// Or drop exactly these layers' MLPs (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["drop_mlp", "drop_fraction"])]
    pub drop_layers: Option<Vec<usize>>,
    /// Fraction of the original MLP parameters kept after dropping and narrowing.
    #[arg(long)]
    pub mlp_keep: Option<f64>,
    /// Neuron importance of the fine step.
    #[arg(long, value_enum, default_value = "activation")]
    pub score: ScoreArg,
    /// Re-fit each narrowed MLP's output projection to the full MLP's output
    /// on the calibration text (least squares, this ridge; 1e-4 is a good
    /// start). Overrides a plan's `reconstruct`.
    #[arg(long)]
    pub reconstruct_ridge: Option<f64>,
    /// Query–document pairs for Taylor scores (from --data's --pairs-split).
    #[arg(long, default_value_t = 64)]
    pub taylor_pairs: usize,
    /// Qrels split the Taylor pairs come from.
    #[arg(long, default_value = "train")]
    pub pairs_split: String,
    /// Coarse selection: rank once, or re-measure after each drop.
    #[arg(long, value_enum, default_value = "one-shot")]
    pub mode: ModeArg,
    /// Calibration: a BEIR dataset to sample queries and documents from.
    #[arg(long, env = "EFFIR_DATA")]
    pub data: Option<PathBuf>,
    /// Or a file of calibration texts.
    #[arg(long, conflicts_with = "data")]
    pub calib: Option<PathBuf>,
    /// Token budget of the calibration text.
    #[arg(long, default_value_t = 65_536)]
    pub calib_tokens: usize,
    /// Queries sampled from --data (queries and documents alternate until
    /// the token budget is spent).
    #[arg(long, default_value_t = 256)]
    pub calib_queries: usize,
    /// Documents sampled from --data.
    #[arg(long, default_value_t = 256)]
    pub calib_documents: usize,
    /// Seed of the calibration sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Stream the model one layer at a time from its memory-mapped files
    /// and write the pruned weights tensor by tensor (decoders; models
    /// larger than memory). One-shot or listed drops and activation scores
    /// only.
    #[arg(long)]
    pub stream: bool,
}

fn flops_per_token(p: &ParameterReport, attention_width: &[usize], seq_len: usize) -> (f64, f64) {
    // 2 FLOPs per weight of every projection, plus QK^T and AV: 4·T·(heads·head_dim) per layer.
    let attention: f64 = p
        .layers
        .iter()
        .map(|l| 2.0 * l.attention as f64)
        .sum::<f64>()
        + attention_width
            .iter()
            .map(|w| 4.0 * seq_len as f64 * *w as f64)
            .sum::<f64>();
    let mlp: f64 = p.layers.iter().map(|l| 2.0 * l.mlp as f64).sum();
    (attention, mlp)
}

/// Each re-fitted MLP's output error on the calibration tokens.
fn reconstruction_table(fits: &[LayerFit]) -> String {
    let mut md = String::from(
        "\nReconstruction (least-squares re-fit of each narrowed MLP's output projection; \
         relative error of its output against the source model's MLP (all of its neurons) on the calibration tokens):\n\n\
         | layer | neurons kept | tokens | error, sliced | error, re-fitted |\n|---:|---:|---:|---:|---:|\n",
    );
    for f in fits {
        md += &format!(
            "| {} | {} of {} | {} | {:.4} | {:.4} |\n",
            f.layer, f.kept, f.width, f.tokens, f.relative_error_sliced, f.relative_error_refit
        );
    }
    md
}

/// What a model's size report reads: parameters, attention widths and
/// the sequence length FLOPs are counted at.
struct Size {
    parameters: ParameterReport,
    attention_widths: Vec<usize>,
    seq: usize,
}

impl Size {
    fn of(source: &OpenedModel) -> anyhow::Result<Self> {
        Ok(Self {
            parameters: source.parameters()?,
            attention_widths: source
                .shape()
                .layers
                .iter()
                .map(|l| l.num_heads * l.head_dim)
                .collect(),
            seq: source.setup().text.max_length(),
        })
    }
}

fn report(before: &Size, after: &Size) -> String {
    let seq = before.seq;
    let (pb, pa) = (&before.parameters, &after.parameters);
    let (ab, mb) = flops_per_token(pb, &before.attention_widths, seq);
    let (aa, ma) = flops_per_token(pa, &after.attention_widths, seq);
    let sum = |p: &ParameterReport,
               f: fn(&effir_pipeline::model::embedder::LayerParameterReport) -> usize|
     -> usize { p.layers.iter().map(f).sum() };
    let row = |name: &str, b: f64, a: f64| {
        format!(
            "| {name} | {b:.0} | {a:.0} | {:+.1}% |\n",
            100.0 * (a - b) / b.max(1.0)
        )
    };
    let mut md = String::from("| component | before | after | change |\n|---|---:|---:|---:|\n");
    md += &row(
        "embedding parameters",
        pb.embeddings as f64,
        pa.embeddings as f64,
    );
    md += &row(
        "attention parameters",
        sum(pb, |l| l.attention) as f64,
        sum(pa, |l| l.attention) as f64,
    );
    md += &row(
        "MLP parameters",
        sum(pb, |l| l.mlp) as f64,
        sum(pa, |l| l.mlp) as f64,
    );
    md += &row("head (Dense) parameters", pb.head as f64, pa.head as f64);
    md += &row("total parameters", pb.total as f64, pa.total as f64);
    md += &row(&format!("attention FLOPs/token (T={seq})"), ab, aa);
    md += &row("MLP FLOPs/token", mb, ma);
    md += &row("transformer FLOPs/token", ab + mb, aa + ma);
    md
}

pub fn run(args: PruneArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut plan: PrunePlan = match &args.plan {
        Some(path) => effir_pipeline::io::yaml_file::read_yaml(path)
            .with_context(|| format!("{}: invalid pruning plan", path.display()))?,
        None => PrunePlan {
            coarse: CoarsePlan {
                drop_mlp: args.drop_mlp,
                drop_fraction: args.drop_fraction,
                layers: args.drop_layers.clone(),
                mode: match args.mode {
                    ModeArg::OneShot => CoarseMode::OneShot,
                    ModeArg::Iterative => CoarseMode::Iterative,
                },
            },
            fine: args.mlp_keep.map(|mlp_keep| FinePlan {
                mlp_keep,
                score: match args.score {
                    ScoreArg::Activation => NeuronScore::ActivationMagnitude,
                    ScoreArg::Taylor => NeuronScore::Taylor,
                },
                min_width_fraction: 0.1,
                alignment: 8,
            }),
            ..Default::default()
        },
    };
    if let Some(ridge) = args.reconstruct_ridge {
        plan.reconstruct = Some(ReconstructPlan { ridge });
    }
    if args.out.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            args.out.display()
        );
    }
    let mut source = OpenedModel::open(&args.model, args.stream)?;
    // Every check on the plan before any work.
    plan.validate(source.shape())?;
    if args.stream {
        check_streamable(&plan, source.shape())?;
    }
    let taylor = plan
        .fine
        .as_ref()
        .is_some_and(|f| f.score == NeuronScore::Taylor);
    if taylor {
        check_taylor_inputs(args.taylor_pairs, args.batch_size)?;
    }
    let calibration = match (&args.calib, &args.data) {
        (Some(file), None) => {
            CalibrationSet::from_file(source.setup(), file, &Prompt::None, args.calib_tokens)?
        }
        (None, Some(dir)) => CalibrationSet::from_dataset(
            source.setup(),
            dir,
            &CalibrationBudget {
                queries: args.calib_queries,
                documents: args.calib_documents,
                max_tokens: args.calib_tokens,
                seed: args.seed,
            },
        )?,
        _ => bail!("give calibration text with --data DIR or --calib FILE"),
    };
    let pairs = match (&args.data, taylor) {
        (_, false) => Vec::new(),
        (Some(dir), true) => training_pairs(source.setup(), dir, &args.pairs_split, args.taylor_pairs, args.seed)?,
        (None, true) => bail!("Taylor scores need query-document pairs: give --data DIR (a BEIR dataset with a {} split)", args.pairs_split),
    };
    if taylor {
        check_taylor_inputs(pairs.len(), args.batch_size)
            .with_context(|| format!("the {} split of --data", args.pairs_split))?;
    }
    let start = Instant::now();
    let inputs = PruneInputs {
        calibration: &calibration.texts,
        pairs: &pairs,
        batch_size: args.batch_size,
    };
    let mut progress = |step: &str| eprintln!("{step} …");
    // Everything, reports and card included, is written into a staging
    // directory that becomes `--out` at the end: a killed run leaves no
    // partial model.
    let (result, staged) = match &mut source {
        OpenedModel::Loaded(embedder) => {
            let tensors = load_all_tensors(&args.model.model)?;
            let result = plan_pruning(embedder, &tensors, &plan, inputs, &mut progress)?;
            let staged = stage_pruned_model(
                &args.model.model,
                &args.out,
                SourceWeights::Loaded(tensors),
                &embedder.setup().config,
                &plan,
                &result,
            )?;
            (result, staged)
        }
        OpenedModel::Streamed(stream) => {
            let result = plan_pruning_streamed(stream, &plan, inputs, &mut progress)?;
            progress("writing the pruned weights, tensor by tensor");
            let staged = stage_pruned_model(
                &args.model.model,
                &args.out,
                SourceWeights::Streamed(stream.store()),
                &stream.setup().config,
                &plan,
                &result,
            )?;
            (result, staged)
        }
    };
    let dir = staged.path().to_path_buf();
    let pruned = match &source {
        OpenedModel::Loaded(_) => OpenedModel::Loaded(
            Embedder::load(&dir, &args.model.load_options())
                .with_context(|| format!("re-loading the pruned model {}", dir.display()))?,
        ),
        OpenedModel::Streamed(_) => OpenedModel::Streamed(
            LayerStream::open(&dir, &args.model.load_options())
                .with_context(|| format!("re-opening the pruned model {}", dir.display()))?,
        ),
    };
    let parameters = report(&Size::of(&source)?, &Size::of(&pruned)?);
    let mut table = parameters.clone();
    if let Some(reconstruction) = &result.reconstruction {
        table += &reconstruction_table(&reconstruction.fits);
    }
    // Paths relative to the pruned directory, as its records hold them.
    let relative = |p: &Path| relative_to(&args.out, p).display().to_string();
    let md = format!(
        "# Pruning {} (paths relative to this directory)\n\nDropped MLPs: {:?}; MLP widths: {:?}; {:.1}% of the MLP neurons kept; calibration: {} tokens of {}.\n\n{table}",
        relative(&args.model.model),
        result.dropped_mlps(),
        result.shape().layers.iter().map(|l| l.mlp.map(|m| m.intermediate_size)).collect::<Vec<_>>(),
        100.0 * result.mlp_keep_achieved(),
        calibration.tokens,
        relative(Path::new(&calibration.source)),
    );
    // The report is the same bytes for the same inputs; the time is not.
    eprintln!("pruned in {:.1} s", start.elapsed().as_secs_f64());
    write_bytes_atomically(&dir.join("prune_report.md"), md.as_bytes())?;
    let record = PruneRecord::read(&dir)?.context("the pruned model's record")?;
    ModelCard::new(format!(
        "{}: {:.0} % of the MLP neurons kept, pruned by effir",
        args.out
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        100.0 * record.mlp_keep_achieved
    ))
    .section("Pruning", record.card_section())
    .section("Parameters and FLOPs", parameters)
    .section(
        "Recovery",
        "None: pruned only, not fine-tuned. `effir finetune` recovers quality.",
    )
    .section(
        "Precision",
        "The source's dtype (sliced, not converted), in safetensors.",
    )
    .section(
        "Loading in transformers",
        read_loading_form(&dir)?.describe(),
    )
    .section(
        "Made with",
        format!("```sh\n{}\n```", command_line(&args.out)),
    )
    .write(&dir, &args.model.model, &args.out)?;
    drop(pruned);
    staged.publish(&args.out)?;
    print!("{md}");
    crate::peak_memory::report("prune");
    Ok(())
}
