//! Outputs survive `kill -9`: `export --overwrite`, `prune`, `rewrite`,
//! `finetune` and `eval` are killed at random points (10 trials each, seeded
//! delays). Afterwards the output path holds the complete previous output,
//! or the complete new one, or (for a new output) nothing: never a mix.
//! The next run removes what a killed one left beside it, and a second
//! process writing the same output at once is refused with a message.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture, minilm_dir, prune_fixture, stderr};

const TRIALS: usize = 10;

/// Every file under `dir` by relative path, with its content's hash;
/// `None` when `dir` does not exist. `skip` names files whose content
/// legitimately differs between runs (timings).
fn manifest(dir: &Path, skip: &[&str]) -> Option<BTreeMap<String, String>> {
    if !dir.exists() {
        return None;
    }
    Some(
        common::files_under(dir)
            .into_iter()
            .map(|f| {
                let name = f.strip_prefix(dir).unwrap().display().to_string();
                let hash = if skip.contains(&name.as_str()) {
                    "(any)".to_string()
                } else {
                    blake3::hash(&std::fs::read(&f).unwrap())
                        .to_hex()
                        .to_string()
                };
                (name, hash)
            })
            .collect(),
    )
}

/// xorshift: the same delays on every run.
struct Delays(u64);

impl Delays {
    fn next_below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 10_000) as f64 / 10_000.0)
    }
}

fn effir_command(args: &[String]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_effir"));
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Runs `args` to completion, returning how long it took.
fn run_whole(args: &[String]) -> Duration {
    let start = Instant::now();
    let out = effir_command(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    start.elapsed()
}

/// Starts `args` and kills it (SIGKILL) after `delay`, or lets it finish.
fn run_killed(args: &[String], delay: Duration) {
    let mut child = effir_command(args).spawn().unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

/// Temporary files and directories effir left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".effir-") || n.ends_with(".effir-lock"))
        .collect()
}

/// Kills `new` (which writes `out`) at random points up to its full run
/// time; after each kill `out` must be `before` (what it held before; `None`:
/// absent) or `after` (what a complete run writes). `reset` puts `before`
/// back when a trial completed. Finally a complete run leaves nothing
/// beside `out`.
fn kill_trials(what: &str, new: &[String], out: &Path, skip: &[&str], reset: &dyn Fn(), seed: u64) {
    reset();
    let before = manifest(out, skip);
    // A complete run: what `out` holds afterwards, and how long it takes.
    let full = run_whole(new);
    let after = manifest(out, skip);
    assert!(
        after.is_some() && after != before,
        "{what}: the run wrote nothing new"
    );
    let mut delays = Delays(seed);
    let mut outcomes = BTreeMap::new();
    for trial in 0..TRIALS {
        reset();
        let delay = delays.next_below(full.mul_f64(1.2));
        run_killed(new, delay);
        let state = manifest(out, skip);
        let outcome = if state == before {
            "previous"
        } else if state == after {
            "new"
        } else {
            panic!(
                "{what}: trial {trial}, killed after {delay:?}: {} holds a mix:\n{state:#?}",
                out.display()
            )
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    eprintln!("{what}: {outcomes:?} in {TRIALS} trials (a full run takes {full:?})");
    // The next complete run removes what the killed ones left.
    reset();
    run_whole(new);
    let parent = out.parent().unwrap();
    assert_eq!(leftovers(parent), Vec::<String>::new(), "{what}: leftovers");
    assert_eq!(manifest(out, skip), after, "{what}: the rerun");
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_export_killed_while_overwriting_leaves_the_old_export_or_the_new_one() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("export");
    let minilm = minilm_dir();
    let old = strings(&[
        "export",
        "--model",
        path(&minilm),
        "--out",
        path(&out),
        "--overwrite",
    ]);
    let mut new = old.clone();
    new.extend(strings(&["--precision", "int8"]));
    let reset = || {
        run_whole(&old);
    };
    kill_trials("export --overwrite", &new, &out, &[], &reset, 1);
}

#[test]
fn a_killed_prune_leaves_the_whole_model_or_nothing() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, "some calibration text\nand a little more of it\n").unwrap();
    let out = work.path().join("pruned");
    let source = fixture("bert");
    let new = strings(&[
        "prune",
        "--model",
        path(&source),
        "--calib",
        path(&calib),
        "--drop-layers",
        "1",
        "--mlp-keep",
        "0.5",
        "--out",
        path(&out),
    ]);
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
    };
    kill_trials("prune", &new, &out, &[], &reset, 2);
}

#[test]
fn a_killed_finetune_leaves_the_whole_model_or_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (train, config) = common::tiny_finetune_inputs(
        work.path(),
        &["query text", "document text", "other text"],
        "max_steps: 3\nbatch_size: 4\nlearning_rate: 1.0e-3\ncheckpoint_every: 0\n",
    );
    let out = work.path().join("tuned");
    let source = fixture("bert");
    let new = strings(&[
        "finetune",
        "--quiet",
        "--model",
        path(&source),
        "--train",
        path(&train),
        "--config",
        path(&config),
        "--out",
        path(&out),
    ]);
    // The training log's timing fields differ between runs.
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(work.path().join("tuned.checkpoints"));
    };
    kill_trials(
        "finetune",
        &new,
        &out,
        &["train_log.jsonl", "effir_finetune.json", "README.md"],
        &reset,
        3,
    );
}

#[test]
fn a_killed_rewrite_leaves_the_whole_graph_or_nothing() {
    let work = tempfile::tempdir().unwrap();
    let pruned = prune_fixture(
        "bert",
        work.path(),
        &["some text", "more text"],
        &["--mlp-keep", "0.5"],
    );
    let out = work.path().join("rewritten");
    let graph = fixture("optimum/bert").join("model.onnx");
    let new = strings(&[
        "rewrite",
        "--onnx",
        path(&graph),
        "--model",
        path(&pruned),
        "--out",
        path(&out),
    ]);
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
    };
    kill_trials("rewrite", &new, &out, &[], &reset, 4);
}

#[test]
fn a_killed_eval_leaves_the_previous_metrics_with_their_ranking_or_the_new_ones() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("eval");
    let data = fixture("eval/tiny");
    let eval = |model: &Path| {
        strings(&[
            "eval",
            "--quiet",
            "--no-cache",
            "--model",
            path(model),
            "--data",
            path(&data),
            "--out",
            path(&out),
        ])
    };
    let old = eval(&fixture("bert"));
    let new = eval(&fixture("gemma3"));
    let reset = || {
        run_whole(&old);
    };
    kill_trials("eval", &new, &out, &["timings.json"], &reset, 5);
}

#[test]
fn a_second_process_writing_the_same_output_is_refused() {
    // This test process plays the first writer: it holds the output's lock
    // as effir does from staging to publishing.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("export");
    let lock_path = work.path().join(".export.effir-lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.try_lock().unwrap();
    let args = strings(&[
        "export",
        "--model",
        path(&fixture("bert")),
        "--out",
        path(&out),
    ]);
    let second = effir_command(&args).output().unwrap();
    let message = stderr(&second);
    assert!(!second.status.success());
    assert!(message.contains("another process is writing"), "{message}");
    assert!(message.contains(path(&out)), "{message}");
    assert!(!out.exists(), "the refused writer wrote output");
    // Released (the holder finished, or died): the export goes through.
    drop(lock);
    let third = effir_command(&args).output().unwrap();
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(leftovers(work.path()), Vec::<String>::new());
}

#[test]
fn eval_writes_into_the_working_directory_with_out_dot() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("here");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "kept").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_effir"))
        .current_dir(&dir)
        .args(["eval", "--quiet", "--no-cache", "--model"])
        .arg(fixture("bert"))
        .arg("--data")
        .arg(fixture("eval/tiny"))
        .args(["--out", "."])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("metrics.json").is_file() && dir.join("run.trec").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "kept"
    );
    assert_eq!(leftovers(work.path()), Vec::<String>::new());
}
