//! Corpus encoding split across processes or machines: shard `i` of `n`
//! embeds the blocks of [`BATCHING_BLOCK`] documents whose index is `i`
//! modulo `n`, batched exactly as a run over the whole corpus batches them,
//! so the merged shards are bit for bit the single run's embeddings.
//!
//! A shard directory holds `embeddings.npy` (its rows, block by block),
//! `ids.txt` (one document id a line, in the same order) and `shard.json`
//! (which shard, which blocks, and what produced them). While it runs, a
//! shard keeps each finished block in `OUT.partial/`, so a run killed by
//! preemption resumes from the blocks it finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{s, Array2};
use serde::{Deserialize, Serialize};

use crate::data::beir::Dataset;
use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::eval::evaluation::CorpusEncoding;
use crate::eval::text_embedder::TextEmbedder;
use crate::io::atomic_file::{write_bytes_atomically, StagedDir};
use crate::io::json_file::{read_json, to_json_document};
use crate::io::npy::{read_npy, write_npy};
use crate::model::encoder_setup::BATCHING_BLOCK;

pub const MANIFEST_FILE: &str = "shard.json";
pub const EMBEDDINGS_FILE: &str = "embeddings.npy";
pub const IDS_FILE: &str = "ids.txt";

/// Shard `index` of `count` (`--shard 0/3` … `2/3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl FromStr for ShardSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{text}`: a shard is I/N with 0 <= I < N, e.g. 0/3");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// The corpus rows of block `block` of a corpus of `documents`.
fn block_range(block: usize, documents: usize) -> std::ops::Range<usize> {
    (block * BATCHING_BLOCK).min(documents)..((block + 1) * BATCHING_BLOCK).min(documents)
}

impl ShardSpec {
    /// How many documents of a corpus of `documents` this shard encodes.
    pub fn rows(&self, documents: usize) -> usize {
        self.blocks(documents)
            .into_iter()
            .map(|b| block_range(b, documents).len())
            .sum()
    }

    /// The blocks of a corpus of `documents` this shard encodes.
    pub fn blocks(&self, documents: usize) -> Vec<usize> {
        (0..documents.div_ceil(BATCHING_BLOCK))
            .filter(|b| b % self.count == self.index)
            .collect()
    }
}

/// `shard.json`: what a shard holds and what made it. Shards merge only
/// when every field but `shard`, `blocks` and `rows` agrees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardManifest {
    pub shard: usize,
    pub shards: usize,
    pub block_size: usize,
    pub batch_size: usize,
    /// Fingerprints of the model (weights or graph) and the corpus file.
    pub model_fingerprint: String,
    pub corpus_fingerprint: String,
    /// The encoding settings (documents, format, length, pooling, size).
    pub settings: String,
    pub documents: usize,
    pub dimension: usize,
    pub blocks: Vec<usize>,
    pub rows: usize,
}

impl ShardManifest {
    fn same_run(&self, other: &Self) -> bool {
        Self {
            shard: 0,
            blocks: Vec::new(),
            rows: 0,
            ..self.clone()
        } == Self {
            shard: 0,
            blocks: Vec::new(),
            rows: 0,
            ..other.clone()
        }
    }
}

fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Encodes shard `spec` of `dataset`'s corpus into the directory `out`
/// (which must not exist), resuming from `OUT.partial/` when an earlier
/// run of the same shard was interrupted. `progress` gets (documents done,
/// documents in the shard). Returns the manifest and how many blocks came
/// from the interrupted run.
pub fn encode_shard(
    embedder: &dyn TextEmbedder,
    dataset: &Dataset,
    format: &TextFormat,
    spec: ShardSpec,
    batch_size: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(ShardManifest, usize)> {
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{}: already exists (a finished shard); choose a new output directory",
            out.display()
        )));
    }
    let identity = CorpusEncoding::of(embedder, dataset, format)?;
    let documents = dataset.corpus.len();
    let blocks = spec.blocks(documents);
    let manifest = ShardManifest {
        shard: spec.index,
        shards: spec.count,
        block_size: BATCHING_BLOCK,
        batch_size,
        model_fingerprint: identity.model.0,
        corpus_fingerprint: identity.corpus.0,
        settings: identity.settings,
        documents,
        dimension: embedder.dimension(),
        rows: spec.rows(documents),
        blocks,
    };

    // Finished blocks of an interrupted run of this very shard are kept.
    let partial = partial_dir(out);
    let partial_manifest = partial.join(MANIFEST_FILE);
    if partial_manifest.is_file() {
        let earlier: ShardManifest = read_json(&partial_manifest)?;
        if earlier != manifest {
            return Err(Error::InvalidArgument(format!(
                "{}: an interrupted run of another shard, model, corpus or settings; remove it to start afresh",
                partial.display()
            )));
        }
        tracing::info!(dir = %partial.display(), "resuming the shard from its finished blocks");
    } else {
        std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        write_bytes_atomically(&partial_manifest, to_json_document(&manifest).as_bytes())?;
    }

    let docs: Vec<String> = dataset.corpus.iter().map(|d| format.document(d)).collect();
    let block_file = |b: usize| partial.join(format!("block-{b:06}.npy"));
    let total = manifest.rows;
    let mut done = 0;
    let mut resumed = 0;
    for &b in &manifest.blocks {
        let rows = block_range(b, documents);
        let file = block_file(b);
        if file.is_file() {
            resumed += 1;
        } else {
            let texts: Vec<&str> = docs[rows.clone()].iter().map(String::as_str).collect();
            let base = done;
            let embeddings =
                embedder.embed_texts(&texts, "", batch_size, &mut |n| progress(base + n, total))?;
            write_npy(&file, &embeddings)?;
        }
        done += rows.len();
        progress(done, total);
    }

    // Assemble and publish; the partial directory goes only after.
    let mut matrix = Array2::<f32>::zeros((manifest.rows, manifest.dimension));
    let mut ids = String::new();
    let mut at = 0;
    for &b in &manifest.blocks {
        let rows = block_range(b, documents);
        let block = read_npy(&block_file(b))?;
        if block.dim() != (rows.len(), manifest.dimension) {
            return Err(Error::InvalidArgument(format!(
                "{}: holds {:?}, the block has {} documents of dimension {}; remove {} to start afresh",
                block_file(b).display(),
                block.dim(),
                rows.len(),
                manifest.dimension,
                partial.display()
            )));
        }
        matrix.slice_mut(s![at..at + rows.len(), ..]).assign(&block);
        for doc in &dataset.corpus[rows.clone()] {
            ids.push_str(&doc.id);
            ids.push('\n');
        }
        at += rows.len();
    }
    let staged = StagedDir::beside(out)?;
    write_npy(&staged.path().join(EMBEDDINGS_FILE), &matrix)?;
    write_bytes_atomically(&staged.path().join(IDS_FILE), ids.as_bytes())?;
    write_bytes_atomically(
        &staged.path().join(MANIFEST_FILE),
        to_json_document(&manifest).as_bytes(),
    )?;
    staged.publish(out)?;
    std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    Ok((manifest, resumed))
}

/// Merges shard directories into corpus embeddings, rows in corpus order,
/// after checking that they are every shard of one encoding of `dataset`
/// by `embedder` (`format`): each shard exactly once, the same model,
/// corpus and settings (for an ONNX graph, the same execution providers and
/// optimization level), and every row's document id where the corpus has
/// it. Shards encoded in batches of another size than `batch_size` merge
/// with a warning: the same embeddings up to the last bits, not the single
/// run's exact bytes.
pub fn merge_shards(
    dirs: &[PathBuf],
    embedder: &dyn TextEmbedder,
    dataset: &Dataset,
    format: &TextFormat,
    batch_size: usize,
) -> Result<Array2<f32>> {
    let first = dirs
        .first()
        .ok_or_else(|| Error::InvalidArgument("no shard directories given".into()))?;
    let mut shards: BTreeMap<usize, (PathBuf, ShardManifest)> = BTreeMap::new();
    let mut reference: Option<(PathBuf, ShardManifest)> = None;
    for dir in dirs {
        let manifest: ShardManifest = read_json(&dir.join(MANIFEST_FILE))?;
        if let Some((ref_dir, ref_manifest)) = &reference {
            if !manifest.same_run(ref_manifest) {
                return Err(Error::InvalidArgument(format!(
                    "{} and {} are shards of different encodings (model, corpus, settings or shard count differ)",
                    dir.display(),
                    ref_dir.display()
                )));
            }
        } else {
            reference = Some((dir.clone(), manifest.clone()));
        }
        if manifest.shard >= manifest.shards {
            return Err(Error::config(
                dir.join(MANIFEST_FILE),
                format!("shard {} of {}", manifest.shard, manifest.shards),
            ));
        }
        if let Some((other, _)) = shards.get(&manifest.shard) {
            return Err(Error::InvalidArgument(format!(
                "shard {}/{} is given twice: {} and {}",
                manifest.shard,
                manifest.shards,
                other.display(),
                dir.display()
            )));
        }
        shards.insert(manifest.shard, (dir.clone(), manifest));
    }
    let (_, reference) = reference.expect("at least one shard");
    let missing: Vec<String> = (0..reference.shards)
        .filter(|i| !shards.contains_key(i))
        .map(|i| format!("{i}/{}", reference.shards))
        .collect();
    if !missing.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "shards missing: {} (given {} of {}, e.g. {})",
            missing.join(", "),
            shards.len(),
            reference.shards,
            first.display()
        )));
    }
    let identity = CorpusEncoding::of(embedder, dataset, format)?;
    let mismatch = |what: &str| {
        Error::InvalidArgument(format!(
            "{}: the shards were encoded with another {what} than this evaluation uses",
            first.display()
        ))
    };
    if reference.model_fingerprint != identity.model.0 {
        return Err(mismatch("model"));
    }
    if reference.corpus_fingerprint != identity.corpus.0 {
        return Err(mismatch("corpus file"));
    }
    if reference.settings != identity.settings || reference.documents != dataset.corpus.len() {
        return Err(mismatch(
            "document set or encoding settings (for a graph: providers or optimization level)",
        ));
    }
    if reference.batch_size != batch_size {
        tracing::warn!(
            shards = %first.display(),
            shard_batch_size = reference.batch_size,
            batch_size,
            "the shards were encoded in batches of another size than this evaluation's: \
             the merged embeddings are not bit-equal to a single run's"
        );
    }
    let documents = dataset.corpus.len();
    let mut matrix = Array2::<f32>::zeros((documents, reference.dimension));
    for (dir, manifest) in shards.values() {
        let spec = ShardSpec {
            index: manifest.shard,
            count: manifest.shards,
        };
        if manifest.blocks != spec.blocks(documents)
            || manifest.block_size != BATCHING_BLOCK
            || manifest.rows != spec.rows(documents)
        {
            return Err(Error::config(
                dir.join(MANIFEST_FILE),
                "its blocks and rows are not the ones its shard number implies",
            ));
        }
        let embeddings_path = dir.join(EMBEDDINGS_FILE);
        let embeddings = read_npy(&embeddings_path)?;
        if embeddings.dim() != (manifest.rows, reference.dimension) {
            return Err(Error::config(
                &embeddings_path,
                format!(
                    "holds {:?}; shard.json says {} rows of {}",
                    embeddings.dim(),
                    manifest.rows,
                    reference.dimension
                ),
            ));
        }
        let ids_path = dir.join(IDS_FILE);
        let ids_text = std::fs::read_to_string(&ids_path).map_err(|e| Error::io(&ids_path, e))?;
        let ids: Vec<&str> = ids_text.lines().collect();
        if ids.len() != manifest.rows {
            return Err(Error::config(
                &ids_path,
                format!("{} ids for {} rows", ids.len(), manifest.rows),
            ));
        }
        let mut at = 0;
        for &b in &manifest.blocks {
            let std::ops::Range { start, end } = block_range(b, documents);
            for (offset, doc) in dataset.corpus[start..end].iter().enumerate() {
                if ids[at + offset] != doc.id {
                    return Err(Error::config(
                        &ids_path,
                        format!(
                            "line {}: document `{}`, the corpus has `{}` there",
                            at + offset + 1,
                            ids[at + offset],
                            doc.id
                        ),
                    ));
                }
            }
            matrix
                .slice_mut(s![start..end, ..])
                .assign(&embeddings.slice(s![at..at + (end - start), ..]));
            at += end - start;
        }
    }
    Ok(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_cover_every_block_once() {
        assert_eq!(
            "1/3".parse::<ShardSpec>(),
            Ok(ShardSpec { index: 1, count: 3 })
        );
        for bad in ["3/3", "1/0", "a/3", "1", "-1/3", ""] {
            assert!(bad.parse::<ShardSpec>().is_err(), "{bad} accepted");
        }
        let documents = 5 * BATCHING_BLOCK + 7;
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|i| ShardSpec { index: i, count: 3 }.blocks(documents))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        let rows: usize = (0..3)
            .map(|i| ShardSpec { index: i, count: 3 }.rows(documents))
            .sum();
        assert_eq!(rows, documents);
        assert_eq!(
            ShardSpec { index: 2, count: 3 }.rows(documents),
            BATCHING_BLOCK + 7
        );
        assert_eq!(ShardSpec { index: 2, count: 8 }.blocks(documents), vec![2]);
        assert!(ShardSpec { index: 7, count: 8 }
            .blocks(documents)
            .is_empty());
    }
}
