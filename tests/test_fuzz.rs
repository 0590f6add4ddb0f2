//! Every reader of files that come from strangers, fed mutated copies of
//! real files (bit flips, truncation, spliced and duplicated spans, extreme
//! numbers, deep nesting, very long lines) in-process, with a fixed seed:
//! none may panic, and each error names the file it could not read.
//!
//! Readers: ONNX graphs, `config.json`, safetensors weights, `tokenizer.json`,
//! BEIR corpus, queries and qrels, gates YAML.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common::fixture;
use effir_onnx::graph_file::GraphFile;
use effir_onnx::validate::Gates;
use effir_pipeline::data::beir::{load_corpus, load_qrels, load_queries};
use effir_pipeline::io::weights::check_safetensors;
use effir_pipeline::model::arch::ModelConfig;
use effir_pipeline::model::text_encoder::{TextEncoder, TextEncoderSettings};

/// Iterations per reader in CI (a few seconds in all).
const ITERATIONS: usize = 500;

/// xorshift64*: the same mutations on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    let len = out.len();
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                if len > 0 {
                    let i = rng.below(len);
                    out[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => out.truncate(rng.below(len + 1)),
        2 => {
            // Splice: a span copied over another place.
            let (a, b) = (rng.below(len + 1), rng.below(len + 1));
            let span: Vec<u8> = out[a.min(b)..a.max(b)].to_vec();
            let at = rng.below(len + 1);
            out.splice(at..(at + span.len()).min(len), span);
        }
        3 => {
            // A span duplicated in place.
            let (a, b) = (rng.below(len + 1), rng.below(len + 1));
            let span: Vec<u8> = out[a.min(b)..a.max(b)].to_vec();
            let at = a.max(b);
            out.splice(at..at, span);
        }
        4 => {
            let numbers: [&[u8]; 6] = [
                b"1e309",
                b"-9223372036854775809",
                b"18446744073709551616",
                b"4294967296",
                b"-1",
                b"1152921504606846976",
            ];
            let at = rng.below(len + 1);
            let n = numbers[rng.below(numbers.len())];
            out.splice(at..at, n.iter().copied());
        }
        5 => {
            let at = rng.below(len + 1);
            let depth = 1 + rng.below(5000);
            let open = if rng.below(2) == 0 { b'[' } else { b'{' };
            out.splice(at..at, std::iter::repeat_n(open, depth));
        }
        _ => {
            let at = rng.below(len + 1);
            out.splice(at..at, std::iter::repeat_n(b'a', 1 + rng.below(200_000)));
        }
    }
    out
}

/// Feeds `ITERATIONS` mutations of the file `seed_dir/name` to `read`, each
/// in a copy of `seed_dir` with that file replaced.
fn fuzz(reader: &str, seed_dir: &Path, name: &str, read: &dyn Fn(&Path) -> Result<(), String>) {
    let seed = std::fs::read(seed_dir.join(name)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("input");
    copy_dir(seed_dir, &dir);
    let target = dir.join(name);
    // The unmutated file reads.
    assert_eq!(read(&dir), Ok(()), "{reader}: the seed file itself");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ reader.len() as u64);
    let mut errors = 0;
    for i in 0..ITERATIONS {
        let input = mutate(&seed, &mut rng);
        std::fs::write(&target, &input).unwrap();
        match catch_unwind(AssertUnwindSafe(|| read(&dir))) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                errors += 1;
                assert!(
                    message.contains(name),
                    "{reader}: iteration {i}: the error does not name {name}: {message}"
                );
            }
            Err(_) => {
                let kept = std::env::temp_dir().join(format!("effir-fuzz-{reader}-{i}"));
                std::fs::write(&kept, &input).unwrap();
                panic!(
                    "{reader}: iteration {i} panicked; input kept in {}",
                    kept.display()
                );
            }
        }
    }
    assert!(errors > 0, "{reader}: no mutation was refused");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[test]
fn onnx_graphs() {
    let dir: PathBuf = fixture("optimum/bert");
    fuzz("onnx", &dir, "model.onnx", &|d| {
        GraphFile::read(&d.join("model.onnx"))
            .map(|_| ())
            .map_err(err)
    });
}

#[test]
fn model_configs() {
    fuzz("config", &fixture("llama"), "config.json", &|d| {
        ModelConfig::from_file(&d.join("config.json"))
            .map(|_| ())
            .map_err(err)
    });
}

#[test]
fn safetensors_weights() {
    fuzz("safetensors", &fixture("bert"), "model.safetensors", &|d| {
        check_safetensors(&d.join("model.safetensors")).map_err(err)
    });
}

#[test]
fn tokenizers() {
    fuzz("tokenizer", &fixture("bert"), "tokenizer.json", &|d| {
        let settings = TextEncoderSettings {
            max_length: 64,
            lowercase: false,
            append_eos: None,
            padding_side: None,
            pad_id: 0,
            token_type_ids: true,
        };
        let encoder = TextEncoder::load(d, settings).map_err(err)?;
        encoder
            .encode(&["a text to encode", ""], "")
            .map(|_| ())
            .map_err(err)
    });
}

#[test]
fn beir_files() {
    let tiny = fixture("eval/tiny");
    fuzz("corpus", &tiny, "corpus.jsonl", &|d| {
        load_corpus(d).map(|_| ()).map_err(err)
    });
    fuzz("queries", &tiny, "queries.jsonl", &|d| {
        load_queries(d).map(|_| ()).map_err(err)
    });
    fuzz("qrels", &tiny, "qrels/test.tsv", &|d| {
        load_qrels(d, "test").map(|_| ()).map_err(err)
    });
}

#[test]
fn gates_files() {
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gates.yaml"),
        work.path().join("gates.yaml"),
    )
    .unwrap();
    fuzz("gates", work.path(), "gates.yaml", &|d| {
        Gates::load(&d.join("gates.yaml")).map(|_| ()).map_err(err)
    });
}
