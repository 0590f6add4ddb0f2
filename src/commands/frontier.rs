//! `effir frontier`: the speed/quality frontier of candidate graphs (effir's
//! and peers' such as Optimum's exports): each is validated on every
//! dataset (parity and quality gates, as `effir validate`), then all are
//! timed in one interleaved ONNX Runtime run. Writes frontier.json, .md and
//! .svg; with `--select DIR`, copies the fastest graph that passes the gates
//! to DIR, which is what a CI job that ships the fastest passing graph runs.

use super::document_sample::DocumentSampleArgs;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use effir_onnx::bench::{measure_interleaved, BenchSession};
use effir_onnx::frontier::{Frontier, FrontierPoint, Origin};
use effir_onnx::GraphLocation;
use effir_pipeline::io::atomic_file::{write_bytes_atomically, StagedDir};

use super::provider_options::ProviderArgs;
use super::validate::{validate, write_report, ValidateArgs};

#[derive(Debug, Args)]
pub struct FrontierArgs {
    /// Reference model directory (the unpruned model), run in candle.
    #[arg(long)]
    pub reference: PathBuf,
    /// An effir graph (directory or .onnx), as NAME=PATH or PATH (named by its
    /// directory); repeatable.
    #[arg(long = "candidate", required = true)]
    pub candidates: Vec<String>,
    /// A peer's graph a user could pick instead (Optimum's exports, another
    /// model), as NAME=PATH or PATH; repeatable.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// BEIR dataset directories (repeatable): every point is scored on each.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Gates (YAML), as `effir validate` reads them.
    #[arg(long)]
    pub gates: PathBuf,
    /// The point speed-ups are relative to [default: the first candidate].
    #[arg(long)]
    pub baseline: Option<String>,
    /// Throughput shape, BATCHxLENGTH.
    #[arg(long, default_value = "32x256", value_parser = parse_shape)]
    pub throughput: (usize, usize),
    /// Latency shape, BATCHxLENGTH.
    #[arg(long, default_value = "1x32", value_parser = parse_shape)]
    pub latency: (usize, usize),
    /// Timed rounds (every graph runs once per round).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub sample: DocumentSampleArgs,
    /// Maximum tokens per text [default: the model's own].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Output directory: frontier.{json,md,svg} and validations/NAME/.
    #[arg(long)]
    pub out: PathBuf,
    /// Copy the fastest candidate (effir's or a peer's) that passes every
    /// gate to this directory (must not exist); fails when none passes.
    #[arg(long)]
    pub select: Option<PathBuf>,
    #[command(flatten)]
    pub providers: ProviderArgs,
    #[arg(long)]
    pub quiet: bool,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (b, l) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}`: expected BATCHxLENGTH, e.g. 32x256"))?;
    let parse = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("`{s}`: batch and length are integers of at least 1"))
    };
    Ok((parse(b)?, parse(l)?))
}

/// `NAME=PATH` or `PATH`.
fn named(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            (name.to_string(), PathBuf::from(path))
        }
        _ => {
            let path = PathBuf::from(spec);
            let dir = if path.extension().is_some_and(|e| e == "onnx") {
                path.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                path.clone()
            };
            let name = dir
                .file_name()
                .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
            (name, path)
        }
    }
}

pub fn run(args: FrontierArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(select) = &args.select {
        if select.exists() {
            bail!(
                "{}: already exists; --select writes a new directory",
                select.display()
            );
        }
    }
    // Every graph is found before any work.
    let mut points: Vec<(String, Origin, PathBuf)> = Vec::new();
    let mut names = HashSet::new();
    for (specs, origin) in [
        (&args.candidates, Origin::Effir),
        (&args.peers, Origin::Peer),
    ] {
        for spec in specs {
            let (name, path) = named(spec);
            let graph = GraphLocation::find_graph(&path)
                .with_context(|| format!("{}: no graph for `{name}`", path.display()))?;
            if !names.insert(name.clone()) {
                bail!("two points are named `{name}`; name them with NAME=PATH");
            }
            points.push((name, origin, graph));
        }
    }
    let baseline = match &args.baseline {
        None => 0,
        Some(b) => points
            .iter()
            .position(|(n, _, _)| n == b)
            .ok_or_else(|| anyhow::anyhow!("--baseline {b}: no candidate or peer has that name"))?,
    };
    let settings = args.providers.settings()?;

    let mut reports = Vec::new();
    for (name, _, graph) in &points {
        if !args.quiet {
            eprintln!("validating {name} ({})", graph.display());
        }
        let validate_args = ValidateArgs {
            reference: args.reference.clone(),
            candidate: graph.clone(),
            candidate_model: None,
            data: args.data.clone(),
            gates: args.gates.clone(),
            split: "test".into(),
            parity_texts: 64,
            sample: args.sample.clone(),
            max_length: args.max_length,
            batch_size: 32,
            out: None,
            no_card: true,
            cache_dir: None,
            no_cache: false,
            providers: args.providers.clone(),
            quiet: args.quiet,
            stream: false,
        };
        let report = validate(&validate_args).with_context(|| format!("validating `{name}`"))?;
        write_report(&report, &args.out.join("validations").join(name))?;
        reports.push(report);
    }

    if !args.quiet {
        eprintln!("timing {} graphs, interleaved", points.len());
    }
    let mut sessions = points
        .iter()
        .map(|(_, _, graph)| {
            BenchSession::open(graph, &settings)
                .with_context(|| format!("opening {}", graph.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ((tb, tl), (lb, ll)) = (args.throughput, args.latency);
    let throughput = measure_interleaved(&mut sessions, tb, tl, args.warmup, args.runs)?;
    let latency = measure_interleaved(&mut sessions, lb, ll, args.warmup, args.runs)?;
    drop(sessions);

    let frontier_points = points
        .iter()
        .zip(&reports)
        .zip(throughput.iter().zip(&latency))
        .map(|(((name, origin, graph), report), (t, l))| {
            Ok(FrontierPoint::new(
                name.clone(),
                *origin,
                report,
                effir_onnx::graph_file::graph_bytes(graph)? as f64 / 1e6,
                (t.texts_per_second, l.median_ms),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let frontier = Frontier::new(frontier_points, baseline, args.throughput, args.latency);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let markdown = frontier.to_markdown(&command);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_bytes_atomically(
        &args.out.join("frontier.json"),
        (serde_json::to_string_pretty(&frontier)? + "\n").as_bytes(),
    )?;
    write_bytes_atomically(&args.out.join("frontier.md"), markdown.as_bytes())?;
    write_bytes_atomically(&args.out.join("frontier.svg"), frontier.to_svg().as_bytes())?;
    print!("{markdown}");

    if let Some(select) = &args.select {
        let Some(best) = frontier.fastest_passing() else {
            bail!(
                "no candidate passes the gates of {}; nothing written to {} (see {})",
                args.gates.display(),
                select.display(),
                args.out.join("frontier.md").display()
            );
        };
        let source = GraphLocation::resolve(Path::new(&best.graph))?.model_dir;
        let staged = StagedDir::beside(select)?;
        copy_tree(&source, staged.path())?;
        staged.publish(select)?;
        println!(
            "selected {} ({:.2}x) -> {}",
            best.name,
            best.speedup,
            select.display()
        );
    }
    Ok(())
}

/// Copies the files and folders under `from` into `to` (which exists).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
