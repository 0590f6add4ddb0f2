//! Every reader of files that come from strangers, fed mutated copies of
//! real files (bit flips, truncation, spliced and duplicated spans, extreme
//! numbers, deep nesting, very long lines) in-process: none may panic, each
//! error names the file it could not read, and no single allocation is
//! larger than [`ALLOCATION_LIMIT`] (a header that claims 2^60 bytes
//! allocates nothing of that size).
//!
//! Readers: ONNX graphs, `config.json`, safetensors weights, `tokenizer.json`,
//! sentence-transformers files (`modules.json`, the pooling config,
//! `sentence_bert_config.json`, `config_sentence_transformers.json`),
//! effir's records (`effir_shape.json`, `effir_prune.json`), BEIR corpus,
//! queries and qrels, unlabeled training text (`--train-texts`,
//! `--train-queries`), pruning plans, fine-tuning configs, gates YAML.
//!
//! In CI each reader gets [`ITERATIONS`] mutations from a fixed seed.
//! `make fuzz FUZZ_SECONDS=600` sets `EFFIR_FUZZ_SECONDS` (shared by the
//! readers) and a random seed (`EFFIR_FUZZ_SEED` to repeat one), and saves
//! any input that panics under `tests/fixtures/fuzz-regressions/<reader>/`,
//! which every run replays.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fixture;
use effir_onnx::graph_file::GraphFile;
use effir_onnx::validate::Gates;
use effir_pipeline::compress::prune::{PrunePlan, PruneRecord};
use effir_pipeline::data::beir::{load_corpus, load_qrels, load_queries};
use effir_pipeline::data::text_format::{DocumentTemplate, TextFormat};
use effir_pipeline::finetune::texts::{load_texts, TextSources};
use effir_pipeline::finetune::FinetuneConfig;
use effir_pipeline::import::gguf_file::GgufFile;
use effir_pipeline::import::gguf_model::{check_tensors, GgufModel};
use effir_pipeline::import::gguf_tokenizer::GgufTokenizer;
use effir_pipeline::io::weights::check_safetensors;
use effir_pipeline::io::yaml_file::read_yaml;
use effir_pipeline::model::arch::ModelConfig;
use effir_pipeline::model::sentence_transformers::SentenceConfig;
use effir_pipeline::model::shape::ModelShape;
use effir_pipeline::model::text_encoder::{TextEncoder, TextEncoderSettings};

/// No reader may ask for more than this in one allocation, whatever its
/// input claims (the seed files are at most a few MB).
const ALLOCATION_LIMIT: usize = 256 << 20;

/// The system allocator, recording the largest single request.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

fn assert_allocations_bounded(what: &str) {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "{what}: one allocation of {largest} bytes (limit {ALLOCATION_LIMIT})"
    );
}

/// Iterations per reader in CI (a few seconds in all).
const ITERATIONS: usize = 500;

/// How long and from which seed: CI's fixed budget, or `make fuzz`'s.
struct Budget {
    seed: u64,
    until: Option<Instant>,
}

impl Budget {
    fn for_reader(reader: &str) -> Self {
        let seconds: Option<f64> = std::env::var("EFFIR_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok());
        let fixed = 0x9E37_79B9_7F4A_7C15 ^ reader.len() as u64;
        let seed = match std::env::var("EFFIR_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(seed) => seed ^ reader.len() as u64,
            None if seconds.is_some() => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.as_nanos() as u64 ^ fixed
            }
            None => fixed,
        };
        Self {
            seed: seed.max(1),
            until: seconds
                .map(|s| Instant::now() + Duration::from_secs_f64(s / ALL_READERS.len() as f64)),
        }
    }

    fn more(&self, done: usize) -> bool {
        match self.until {
            Some(until) => Instant::now() < until,
            None => done < ITERATIONS,
        }
    }
}

/// Where inputs that made a reader panic are kept, and replayed by every run.
fn regressions_dir(reader: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz-regressions")
        .join(reader)
}

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

/// A reader under test: reads the directory it is given.
type ReadFn = Box<dyn Fn(&Path) -> Result<(), String>>;

/// One reader: the file `name` in a copy of `seed_dir` is what it reads.
struct Reader {
    name: &'static str,
    seed_dir: PathBuf,
    file: &'static str,
    read: ReadFn,
}

/// Reads `input` as the reader's file: `Err` with the panic's message if
/// the reader panicked, else whether the reader accepted it, or its error
/// (which must name the file).
fn check_input(reader: &Reader, dir: &Path, input: &[u8]) -> Result<Result<(), String>, String> {
    std::fs::write(dir.join(reader.file), input).unwrap();
    match catch_unwind(AssertUnwindSafe(|| (reader.read)(dir))) {
        Ok(result) => Ok(result),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()),
    }
}

/// An error a reader returned must name the file it read.
fn assert_names_file(reader: &Reader, message: &str, context: &str) {
    let name = Path::new(reader.file)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        message.contains(name),
        "{}: {context}: the error does not name {name}: {message}",
        reader.name
    );
}

/// A copy of the reader's seed directory to mutate in.
fn workspace(reader: &Reader) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("input");
    copy_dir(&reader.seed_dir, &dir);
    (work, dir)
}

/// Mutations of the reader's seed file until the budget is spent; a
/// panicking input is saved as a regression and fails the test.
fn fuzz(reader: &Reader) {
    let seed = std::fs::read(reader.seed_dir.join(reader.file)).unwrap();
    let (_work, dir) = workspace(reader);
    // The unmutated file reads.
    assert_eq!(
        check_input(reader, &dir, &seed),
        Ok(Ok(())),
        "{}: the seed file itself",
        reader.name
    );
    let budget = Budget::for_reader(reader.name);
    let mut rng = Rng(budget.seed);
    let (mut done, mut refused) = (0, 0);
    // A long run keeps the input being read on disk: an input that aborts
    // the process (an allocation the system refuses) stays there, and
    // every later run replays it.
    let in_flight = budget
        .until
        .map(|_| regressions_dir(reader.name).join("in-flight.bin"));
    while budget.more(done) {
        let input = mutate(&seed, &mut rng);
        if let Some(path) = &in_flight {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &input).unwrap();
        }
        match check_input(reader, &dir, &input) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                refused += 1;
                assert_names_file(reader, &message, &format!("iteration {done}"));
            }
            Err(panic) => {
                let kept = regressions_dir(reader.name);
                std::fs::create_dir_all(&kept).unwrap();
                let file = kept.join(format!("{}.bin", &blake3::hash(&input).to_hex()[..16]));
                std::fs::write(&file, &input).unwrap();
                panic!(
                    "{}: iteration {done} (seed {}) panicked: {panic}; input saved as {}",
                    reader.name,
                    budget.seed,
                    file.display()
                );
            }
        }
        done += 1;
    }
    if let Some(path) = &in_flight {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir(path.parent().unwrap());
    }
    assert!(refused > 0, "{}: no mutation was refused", reader.name);
    assert_allocations_bounded(reader.name);
    eprintln!(
        "fuzz {}: {done} inputs ({refused} refused with an error naming the file), seed {}",
        reader.name, budget.seed
    );
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

/// A pruned copy of the BERT fixture (its `effir_shape.json` is a seed).
fn pruned_bert() -> PathBuf {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let work = tempfile::tempdir().unwrap();
        let out = common::prune_fixture(
            "bert",
            work.path(),
            &["some calibration text", "and more of it"],
            &["--drop-layers", "1", "--mlp-keep", "0.5"],
        );
        (work, out)
    })
    .1
    .clone()
}

fn repo_file_dir(files: &[&str]) -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    for f in files {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        std::fs::copy(&from, dir.join(from.file_name().unwrap())).unwrap();
    }
    dir.to_path_buf()
}

/// Unlabeled training text from `path`, as documents or as queries.
fn read_unlabeled(path: &Path, as_queries: bool) -> Result<(), String> {
    let format = TextFormat {
        template: DocumentTemplate(DocumentTemplate::TITLE_TEXT.into()),
        document_prompt: String::new(),
        query_prefix: "query: ".into(),
    };
    let paths = [path.to_path_buf()];
    let (documents, queries): (&[PathBuf], &[PathBuf]) = if as_queries {
        (&[], &paths)
    } else {
        (&paths, &[])
    };
    let sources = TextSources {
        documents,
        queries,
        query_split: "test",
    };
    load_texts(&sources, &format).map(|_| ()).map_err(err)
}

/// Every reader and its seed.
fn reader(name: &str) -> Reader {
    let tiny = fixture("eval/tiny");
    let r = |name, seed_dir, file, read: ReadFn| Reader {
        name,
        seed_dir,
        file,
        read,
    };
    match name {
        "onnx" => r(
            "onnx",
            fixture("optimum/bert"),
            "model.onnx",
            Box::new(|d| {
                GraphFile::read(&d.join("model.onnx"))
                    .map(|_| ())
                    .map_err(err)
            }),
        ),
        // Every tensor of every type, dequantized.
        "gguf-tensors" => r(
            "gguf-tensors",
            fixture("gguf"),
            "types.gguf",
            Box::new(|d| {
                let file = GgufFile::open(&d.join("types.gguf")).map_err(err)?;
                for info in &file.tensors {
                    file.dequantize(info).map_err(err)?;
                }
                Ok(())
            }),
        ),
        // A model's metadata, tensor directory and tokenizer, as
        // `import-gguf` checks them before writing anything.
        "gguf-model" => r(
            "gguf-model",
            fixture("gguf"),
            "llama.gguf",
            Box::new(|d| {
                let file = GgufFile::open(&d.join("llama.gguf")).map_err(err)?;
                let model = GgufModel::read(&file).map_err(err)?;
                check_tensors(&file, &model).map_err(err)?;
                GgufTokenizer::read(&file, model.context_length).map_err(err)?;
                Ok(())
            }),
        ),
        "config" => r(
            "config",
            fixture("llama"),
            "config.json",
            Box::new(|d| {
                ModelConfig::from_file(&d.join("config.json"))
                    .map(|_| ())
                    .map_err(err)
            }),
        ),
        "safetensors" => r(
            "safetensors",
            fixture("bert"),
            "model.safetensors",
            Box::new(|d| check_safetensors(&d.join("model.safetensors")).map_err(err)),
        ),
        "tokenizer" => r(
            "tokenizer",
            fixture("bert"),
            "tokenizer.json",
            Box::new(|d| {
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
            }),
        ),
        "modules" => r(
            "modules",
            fixture("gemma3"),
            "modules.json",
            Box::new(|d| SentenceConfig::load(d).map(|_| ()).map_err(err)),
        ),
        "pooling" => r(
            "pooling",
            fixture("gemma3"),
            "1_Pooling/config.json",
            Box::new(|d| SentenceConfig::load(d).map(|_| ()).map_err(err)),
        ),
        "sentence-bert-config" => r(
            "sentence-bert-config",
            fixture("gemma3"),
            "sentence_bert_config.json",
            Box::new(|d| SentenceConfig::load(d).map(|_| ()).map_err(err)),
        ),
        "sentence-transformers-config" => r(
            "sentence-transformers-config",
            fixture("gemma3"),
            "config_sentence_transformers.json",
            Box::new(|d| SentenceConfig::load(d).map(|_| ()).map_err(err)),
        ),
        "prune-record" => r(
            "prune-record",
            pruned_bert(),
            "effir_prune.json",
            Box::new(|d| PruneRecord::read(d).map(|_| ()).map_err(err)),
        ),
        "shape" => r(
            "shape",
            pruned_bert(),
            "effir_shape.json",
            Box::new(|d| {
                let config = ModelConfig::from_file(&d.join("config.json")).map_err(err)?;
                ModelShape::load_or(d, config.uniform_shape())
                    .map(|_| ())
                    .map_err(err)
            }),
        ),
        "corpus" => r(
            "corpus",
            tiny,
            "corpus.jsonl",
            Box::new(|d| load_corpus(d).map(|_| ()).map_err(err)),
        ),
        "queries" => r(
            "queries",
            tiny,
            "queries.jsonl",
            Box::new(|d| load_queries(d).map(|_| ()).map_err(err)),
        ),
        "qrels" => r(
            "qrels",
            tiny,
            "qrels/test.tsv",
            Box::new(|d| load_qrels(d, "test").map(|_| ()).map_err(err)),
        ),
        // JSONL lines as `--train-texts` and `--train-queries` read them
        // (the corpus's {_id, title, text} objects are texts with titles).
        "train-texts" => r(
            "train-texts",
            tiny,
            "corpus.jsonl",
            Box::new(|d| read_unlabeled(&d.join("corpus.jsonl"), false)),
        ),
        "train-queries" => r(
            "train-queries",
            tiny,
            "queries.jsonl",
            Box::new(|d| read_unlabeled(&d.join("queries.jsonl"), true)),
        ),
        "plan" => r(
            "plan",
            repo_file_dir(&["configs/prune-minilm-50.yaml"]),
            "prune-minilm-50.yaml",
            Box::new(|d| {
                read_yaml::<PrunePlan>(&d.join("prune-minilm-50.yaml"))
                    .map(|_| ())
                    .map_err(err)
            }),
        ),
        "finetune-config" => r(
            "finetune-config",
            repo_file_dir(&["configs/finetune-minilm.yaml"]),
            "finetune-minilm.yaml",
            Box::new(|d| {
                let path = d.join("finetune-minilm.yaml");
                let config: FinetuneConfig = read_yaml(&path).map_err(err)?;
                config
                    .validate()
                    .map_err(|e| format!("{}: {e}", path.display()))
            }),
        ),
        "gates" => r(
            "gates",
            repo_file_dir(&["configs/gates.yaml"]),
            "gates.yaml",
            Box::new(|d| Gates::load(&d.join("gates.yaml")).map(|_| ()).map_err(err)),
        ),
        other => panic!("no reader {other}"),
    }
}

/// Every reader with a target; `make fuzz` shares its time among them.
const ALL_READERS: [&str; 17] = [
    "onnx",
    "config",
    "safetensors",
    "tokenizer",
    "modules",
    "pooling",
    "shape",
    "corpus",
    "queries",
    "qrels",
    "train-texts",
    "train-queries",
    "plan",
    "finetune-config",
    "gates",
    "gguf-tensors",
    "gguf-model",
];

#[test]
fn onnx_graphs() {
    fuzz(&reader("onnx"));
}

#[test]
fn gguf_files() {
    fuzz(&reader("gguf-tensors"));
    fuzz(&reader("gguf-model"));
}

#[test]
fn model_configs() {
    fuzz(&reader("config"));
}

#[test]
fn safetensors_weights() {
    fuzz(&reader("safetensors"));
}

#[test]
fn tokenizers() {
    fuzz(&reader("tokenizer"));
}

#[test]
fn sentence_transformers_files() {
    fuzz(&reader("modules"));
    fuzz(&reader("pooling"));
    fuzz(&reader("sentence-bert-config"));
    fuzz(&reader("sentence-transformers-config"));
}

#[test]
fn effir_records() {
    fuzz(&reader("shape"));
    fuzz(&reader("prune-record"));
}

#[test]
fn beir_files() {
    fuzz(&reader("corpus"));
    fuzz(&reader("queries"));
    fuzz(&reader("qrels"));
}

#[test]
fn unlabeled_training_text() {
    fuzz(&reader("train-texts"));
    fuzz(&reader("train-queries"));
}

#[test]
fn plans_and_configs() {
    fuzz(&reader("plan"));
    fuzz(&reader("finetune-config"));
    fuzz(&reader("gates"));
}

/// Every input a long `make fuzz` found panicking is read again, forever.
#[test]
fn saved_regressions_replay_without_panicking() {
    let mut replayed = 0;
    for name in ALL_READERS {
        let Ok(entries) = std::fs::read_dir(regressions_dir(name)) else {
            continue;
        };
        let reader = reader(name);
        let (_work, dir) = workspace(&reader);
        for entry in entries.flatten() {
            let input = std::fs::read(entry.path()).unwrap();
            match check_input(&reader, &dir, &input) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    assert_names_file(&reader, &message, &entry.path().display().to_string())
                }
                Err(panic) => panic!("{name}: {} panics again: {panic}", entry.path().display()),
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} saved fuzz inputs");
}

/// A safetensors header that claims 2^60 bytes, and one tensor claiming
/// more data than the file has: refused, naming the file, with no
/// allocation of that size.
#[test]
fn a_header_claiming_2_to_the_60_bytes_allocates_nothing_of_that_size() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("model.safetensors");
    let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).unwrap();
    let e = check_safetensors(&path).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let header = br#"{"w":{"dtype":"F32","shape":[1073741824,1073741824],"data_offsets":[0,4611686018427387904]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let e = check_safetensors(&path).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    assert_allocations_bounded("safetensors headers");
}
