//! Inputs built to exhaust memory are refused with a message naming the
//! file and the flag that raises the limit, or handled in bounded memory:
//! a corpus line of 100 MB, a qrels file naming a million unknown
//! documents, a tokenizer with a 10-million-token vocabulary. Peak memory is
//! the child process's (`getrusage`), not a timing.

mod common;

use std::io::Write;
use std::path::Path;

use common::{fixture, stderr};

/// The largest resident set of any child this test process waited for, in MB.
fn children_peak_mb() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// A copy of the tiny BEIR dataset.
fn tiny_copy(work: &Path) -> std::path::PathBuf {
    let dir = work.join("tiny");
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    for f in ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"] {
        std::fs::copy(fixture("eval/tiny").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn eval(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = fixture("bert");
    let mut args = vec![
        "eval",
        "--quiet",
        "--no-cache",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::effir(&args)
}

#[test]
fn limits_refuse_or_bound_inputs_built_to_exhaust_memory() {
    let work = tempfile::tempdir().unwrap();

    // A corpus line of 100 MB: refused, naming the file, the line and the flag.
    let data = tiny_copy(work.path());
    {
        let mut corpus = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("corpus.jsonl"))
            .unwrap();
        write!(corpus, "{{\"_id\": \"huge\", \"text\": \"").unwrap();
        let block = "lorem ipsum ".repeat(1 << 16);
        for _ in 0..(100 << 20) / block.len() {
            corpus.write_all(block.as_bytes()).unwrap();
        }
        writeln!(corpus, "\"}}").unwrap();
    }
    let o = eval(&data, &work.path().join("out-line"), &[]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("corpus.jsonl") && e.contains("--max-line-mb"),
        "{e}"
    );
    assert!(!work.path().join("out-line").exists());
    let peak = children_peak_mb();
    assert!(peak < 700.0, "peak RSS {peak:.0} MB reading a 100 MB line");

    // A line over a lowered limit is refused; the default takes it.
    let data = tiny_copy(&work.path().join("two"));
    {
        let mut corpus = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("corpus.jsonl"))
            .unwrap();
        let text = "long text ".repeat(200_000);
        writeln!(corpus, "{{\"_id\": \"long\", \"text\": \"{text}\"}}").unwrap();
    }
    let o = eval(&data, &work.path().join("out-2mb"), &["--max-line-mb", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("over the 1 MB limit"), "{}", stderr(&o));
    let o = eval(&data, &work.path().join("out-2mb"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A qrels file naming a million documents the corpus lacks: the
    // judgements are dropped with a warning, in bounded memory.
    let data = tiny_copy(&work.path().join("three"));
    {
        let mut qrels = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("qrels/test.tsv"))
            .unwrap();
        let mut text = String::new();
        for i in 0..1_000_000 {
            text += &format!("q1\tunknown-{i}\t1\n");
        }
        qrels.write_all(text.as_bytes()).unwrap();
    }
    let o = eval(&data, &work.path().join("out-qrels"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1000000"), "{}", stderr(&o));
    let peak = children_peak_mb();
    assert!(
        peak < 700.0,
        "peak RSS {peak:.0} MB with a million dangling qrels"
    );

    // A tokenizer with a 10-million-token vocabulary: refused before it is
    // parsed, naming the file and the flag.
    let model = common::copy_model(&fixture("bert"));
    {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(model.path().join("tokenizer.json")).unwrap(),
        );
        write!(file, "{{\"version\":\"1.0\",\"model\":{{\"type\":\"WordPiece\",\"unk_token\":\"[UNK]\",\"vocab\":{{").unwrap();
        for i in 0..10_000_000u32 {
            if i > 0 {
                file.write_all(b",").unwrap();
            }
            write!(file, "\"t{i}\":{i}").unwrap();
        }
        write!(file, "}}}}}}").unwrap();
    }
    let texts = work.path().join("texts.txt");
    std::fs::write(&texts, "hello world\n").unwrap();
    let o = common::effir(&[
        "embed",
        "--model",
        model.path().to_str().unwrap(),
        "--input",
        texts.to_str().unwrap(),
        "--output",
        work.path().join("e.npy").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("tokenizer.json") && e.contains("--max-tokenizer-mb"),
        "{e}"
    );
    let peak = children_peak_mb();
    assert!(
        peak < 700.0,
        "peak RSS {peak:.0} MB refusing a 10M-token tokenizer"
    );
}
