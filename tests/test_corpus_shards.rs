//! Corpus encoding across processes: `effir encode --shard I/N` writes one
//! shard of a corpus's document embeddings, `effir eval --embeddings`
//! merges them. The merged shards are the single run's embeddings bit for
//! bit, so the metrics are the same bytes; an interrupted shard resumes
//! from the blocks it finished; shards that do not make up one encoding
//! are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::{effir, fixture, stderr};
use effir_pipeline::io::npy::read_npy;

/// A BEIR directory of `docs` documents of varied length (so batches pad
/// differently), 12 queries and their judgements.
fn corpus(dir: &Path, docs: usize) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("qrels")).unwrap();
    let words = [
        "fox",
        "retrieval",
        "pruning",
        "attention",
        "vector",
        "dog",
        "layer",
        "query",
    ];
    let mut corpus = String::new();
    for i in 0..docs {
        let text: Vec<&str> = (0..(i * 7919) % 23 + 1)
            .map(|j| words[(i + j * 3) % words.len()])
            .collect();
        corpus += &serde_json::json!({"_id": format!("d{i}"), "title": format!("t{}", i % 5), "text": text.join(" ")}).to_string();
        corpus.push('\n');
    }
    std::fs::write(data.join("corpus.jsonl"), corpus).unwrap();
    let mut queries = String::new();
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for q in 0..12 {
        queries += &serde_json::json!({"_id": format!("q{q}"), "text": format!("{} {}", words[q % 8], words[(q + 3) % 8])}).to_string();
        queries.push('\n');
        qrels += &format!(
            "q{q}\td{}\t1\nq{q}\td{}\t2\n",
            q * 97 % docs,
            q * 389 % docs
        );
    }
    std::fs::write(data.join("queries.jsonl"), queries).unwrap();
    std::fs::write(data.join("qrels/test.tsv"), qrels).unwrap();
    data
}

fn run_ok(args: &[&str]) {
    let out = effir(args);
    assert!(
        out.status.success(),
        "effir {}: {}",
        args.join(" "),
        stderr(&out)
    );
}

/// `effir encode --quiet --model MODEL --data DATA --shard SHARD --out OUT --batch-size 16`.
fn encode_args<'a>(model: &'a str, data: &'a str, shard: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "encode",
        "--quiet",
        "--model",
        model,
        "--data",
        data,
        "--shard",
        shard,
        "--out",
        out,
        "--batch-size",
        "16",
    ]
}

fn encode(model: &Path, data: &Path, shard: &str, out: &Path) {
    run_ok(&encode_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        shard,
        out.to_str().unwrap(),
    ));
}

fn eval_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "--quiet",
        "--no-cache",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        "16",
    ]
}

#[test]
fn merged_shards_score_the_same_bytes_as_a_single_run() {
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path(), 2500); // three blocks of 1,024 (the last partial)
    let model = fixture("bert");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    let single = work.path().join("single");
    run_ok(&eval_args(m, d, single.to_str().unwrap()));
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| work.path().join(format!("shard-{i}")))
        .collect();
    for (i, dir) in shards.iter().enumerate() {
        encode(&model, &data, &format!("{i}/3"), dir);
    }
    let merged = work.path().join("merged");
    let mut args = eval_args(m, d, merged.to_str().unwrap());
    for dir in &shards {
        args.extend(["--embeddings", dir.to_str().unwrap()]);
    }
    run_ok(&args);
    for file in ["metrics.json", "run.trec"] {
        assert_eq!(
            std::fs::read(single.join(file)).unwrap(),
            std::fs::read(merged.join(file)).unwrap(),
            "{file} of the merged shards differs from the single run's"
        );
    }

    // Each row is bit-equal to the one-shard encoding of the whole corpus.
    let whole = work.path().join("whole");
    encode(&model, &data, "0/1", &whole);
    let all = read_npy(&whole.join("embeddings.npy")).unwrap();
    let mut row = 0;
    for (i, dir) in shards.iter().enumerate() {
        let part = read_npy(&dir.join("embeddings.npy")).unwrap();
        let ids = std::fs::read_to_string(dir.join("ids.txt")).unwrap();
        assert_eq!(ids.lines().next(), Some(format!("d{}", i * 1024).as_str()));
        for (r, line) in part.rows().into_iter().zip(ids.lines()) {
            let index: usize = line[1..].parse().unwrap();
            let bits =
                |v: ndarray::ArrayView1<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(r), bits(all.row(index)), "document {line}");
            row += 1;
        }
    }
    assert_eq!(row, 2500);
}

#[test]
fn an_interrupted_shard_resumes_from_its_finished_blocks() {
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path(), 2500);
    let model = fixture("bert");
    // Shard 0/2 holds blocks 0 and 2.
    let reference = work.path().join("reference");
    encode(&model, &data, "0/2", &reference);
    let manifest = std::fs::read(reference.join("shard.json")).unwrap();

    // What a run killed after its first block leaves: the manifest and
    // block 0, here marked (all 7.0) to show it is taken, not recomputed.
    let out = work.path().join("resumed");
    let partial = work.path().join("resumed.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("shard.json"), &manifest).unwrap();
    let marked = ndarray::Array2::<f32>::from_elem((1024, 64), 7.0);
    effir_pipeline::io::npy::write_npy(&partial.join("block-000000.npy"), &marked).unwrap();
    encode(&model, &data, "0/2", &out);
    assert!(
        !partial.exists(),
        "the partial directory is removed once the shard is published"
    );
    let got = read_npy(&out.join("embeddings.npy")).unwrap();
    let want = read_npy(&reference.join("embeddings.npy")).unwrap();
    assert!(
        got.slice(ndarray::s![..1024, ..]).iter().all(|&v| v == 7.0),
        "block 0 was recomputed"
    );
    assert_eq!(
        got.slice(ndarray::s![1024.., ..]),
        want.slice(ndarray::s![1024.., ..]),
        "block 2"
    );

    // A partial directory of another shard is not mixed in.
    let other = work.path().join("other");
    let other_partial = work.path().join("other.partial");
    std::fs::create_dir_all(&other_partial).unwrap();
    std::fs::write(other_partial.join("shard.json"), &manifest).unwrap();
    let run = effir(&encode_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        "1/2",
        other.to_str().unwrap(),
    ));
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("other.partial: an interrupted run of another shard"),
        "{}",
        stderr(&run)
    );
    assert!(!other.exists());
}

#[test]
fn shards_that_are_not_one_encoding_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path(), 2100);
    let model = fixture("bert");
    let shard = |name: &str, spec: &str, model: &Path| {
        let dir = work.path().join(name);
        encode(model, &data, spec, &dir);
        dir
    };
    let s0 = shard("s0", "0/3", &model);
    let s1 = shard("s1", "1/3", &model);
    let s2 = shard("s2", "2/3", &model);
    let half = shard("half", "0/2", &model);
    let pruned = common::prune_fixture(
        "bert",
        work.path(),
        &["a calibration text about foxes"],
        &["--mlp-keep", "0.5"],
    );
    let p2 = shard("p2", "2/3", &pruned);

    let cases: Vec<(&str, Vec<&Path>, &str)> = vec![
        ("a missing shard", vec![&s0, &s1], "shards missing: 2/3"),
        (
            "a shard twice",
            vec![&s0, &s1, &s1, &s2],
            "shard 1/3 is given twice",
        ),
        (
            "another shard count",
            vec![&s0, &s1, &half],
            "shards of different encodings",
        ),
        (
            "another model's shard",
            vec![&s0, &s1, &p2],
            "shards of different encodings",
        ),
    ];
    for (what, dirs, needle) in cases {
        let out = work.path().join("out");
        let mut args = eval_args(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        for dir in &dirs {
            args.extend(["--embeddings", dir.to_str().unwrap()]);
        }
        let run = effir(&args);
        assert!(!run.status.success(), "{what}: accepted");
        assert!(stderr(&run).contains(needle), "{what}: {}", stderr(&run));
        assert!(!out.join("metrics.json").exists(), "{what}: wrote metrics");
    }
    // Every shard of the pruned model, scored with the full one.
    let out = work.path().join("out");
    let mut args = eval_args(
        pruned.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    args.extend([
        "--embeddings",
        s0.to_str().unwrap(),
        "--embeddings",
        s1.to_str().unwrap(),
        "--embeddings",
        s2.to_str().unwrap(),
    ]);
    let run = effir(&args);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("encoded with another model"),
        "{}",
        stderr(&run)
    );
}

/// The exported graph encodes shards too (`--onnx`), as a GPU cluster
/// would run it, and merges into the same metrics as its single run.
#[test]
fn an_onnx_export_encodes_shards() {
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path(), 1100);
    let export = work.path().join("onnx");
    common::export(&fixture("bert"), &export, &[]);
    let (m, d) = (export.to_str().unwrap(), data.to_str().unwrap());
    let single = work.path().join("single");
    let mut args = eval_args(m, d, single.to_str().unwrap());
    args.push("--onnx");
    run_ok(&args);
    for i in 0..2 {
        let out = work.path().join(format!("shard-{i}"));
        let shard = format!("{i}/2");
        let mut args = encode_args(m, d, &shard, out.to_str().unwrap());
        args.push("--onnx");
        run_ok(&args);
    }
    let merged = work.path().join("merged");
    let mut args = eval_args(m, d, merged.to_str().unwrap());
    let (s0, s1) = (work.path().join("shard-0"), work.path().join("shard-1"));
    args.extend([
        "--onnx",
        "--embeddings",
        s0.to_str().unwrap(),
        "--embeddings",
        s1.to_str().unwrap(),
    ]);
    run_ok(&args);
    assert_eq!(
        std::fs::read(single.join("metrics.json")).unwrap(),
        std::fs::read(merged.join("metrics.json")).unwrap()
    );
    let shards = [
        "--onnx",
        "--embeddings",
        s0.to_str().unwrap(),
        "--embeddings",
        s1.to_str().unwrap(),
    ];
    // The same graph run otherwise (here unoptimized; a GPU provider would
    // be another) computes other last bits: its shards do not merge.
    let other = work.path().join("unoptimized");
    let mut args = eval_args(m, d, other.to_str().unwrap());
    args.extend(shards);
    args.extend(["--graph-optimization", "none"]);
    let run = effir(&args);
    assert!(
        !run.status.success() && stderr(&run).contains("providers or optimization level"),
        "{}",
        stderr(&run)
    );
    assert!(!other.exists());
    // Another batch size merges, and says the result is not the single
    // run's exact bytes.
    let rebatched = work.path().join("rebatched");
    let mut args = eval_args(m, d, rebatched.to_str().unwrap());
    args.extend(shards);
    let at = args.iter().position(|a| *a == "--batch-size").unwrap();
    args[at + 1] = "8";
    let run = effir(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("not bit-equal to a single run"),
        "{}",
        stderr(&run)
    );
}

/// The batching rule the shards rely on: texts are batched within blocks
/// of 1,024, so embedding a list at once or block by block gives the same
/// bits (here with a batch size that does not divide the block).
#[test]
fn a_list_embeds_the_same_bits_whole_or_block_by_block() {
    use effir_pipeline::{Embedder, LoadOptions};
    let embedder = Embedder::load(&fixture("bert"), &LoadOptions::default()).unwrap();
    let words = ["fox", "retrieval", "pruning", "attention", "vector"];
    let texts: Vec<String> = (0..1500)
        .map(|i| {
            (0..(i * 31) % 17 + 1)
                .map(|j| words[(i + j) % 5])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let whole = embedder.embed(&texts, "", 24, &mut |_| {}).unwrap();
    let first = embedder.embed(&texts[..1024], "", 24, &mut |_| {}).unwrap();
    let rest = embedder.embed(&texts[1024..], "", 24, &mut |_| {}).unwrap();
    let bits = |a: ndarray::ArrayView2<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(whole.slice(ndarray::s![..1024, ..])),
        bits(first.view())
    );
    assert_eq!(
        bits(whole.slice(ndarray::s![1024.., ..])),
        bits(rest.view())
    );
}
