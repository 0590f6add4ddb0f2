//! The distillation teacher: embeddings of every text the training may
//! score, computed once with the teacher model and cached on disk, so each
//! step's teacher scores are dot products.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::text_format::TextFormat;
use crate::error::{Error, Result};
use crate::model::embedder::Embedder;
use crate::model::encoder_setup::BATCHING_BLOCK;

/// What a teacher that formats text its own way embeds for each student
/// text (`true`: a query): queries lose the student's query prefix and get
/// the teacher's; documents stay, and must be written the same way by both
/// (an error says how each writes them).
pub fn texts_in_teacher_format(
    texts: &BTreeMap<String, bool>,
    student: &TextFormat,
    teacher: &TextFormat,
) -> std::result::Result<BTreeMap<String, String>, String> {
    let rendered = |f: &TextFormat| f.template.0.replace("{prompt}", &f.document_prompt);
    if rendered(student) != rendered(teacher) {
        return Err(format!(
            "the teacher writes documents as `{}`, the student as `{}`",
            rendered(teacher),
            rendered(student)
        ));
    }
    texts
        .iter()
        .map(|(text, &is_query)| {
            let view = if is_query {
                let query = text
                    .strip_prefix(student.query_prefix.as_str())
                    .ok_or_else(|| {
                        format!(
                            "the query `{text}` lacks the student's prompt `{}`",
                            student.query_prefix
                        )
                    })?;
                format!("{}{query}", teacher.query_prefix)
            } else {
                text.clone()
            };
            Ok((text.clone(), view))
        })
        .collect()
}

/// The teacher model: the one the run already holds for the token term, or
/// one loaded for the embeddings alone.
pub enum TeacherModel<'a> {
    Shared(&'a Embedder),
    Loaded(Box<Embedder>),
}

impl std::ops::Deref for TeacherModel<'_> {
    type Target = Embedder;

    fn deref(&self) -> &Embedder {
        match self {
            Self::Shared(e) => e,
            Self::Loaded(e) => e,
        }
    }
}

/// Teacher embeddings by text.
pub struct TeacherEmbeddings {
    index: HashMap<String, usize>,
    /// `(N, D)`, unit rows.
    matrix: Tensor,
}

fn key(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// Where the parts of an unfinished teacher computation are saved: the
/// part size is in the name, so parts of another size are never mixed in.
pub fn parts_dir(cache: &Path, part_texts: usize) -> PathBuf {
    cache.with_extension(format!("parts-{part_texts}"))
}

/// Texts a saved part holds for `asked`: rounded up to whole blocks of
/// [`BATCHING_BLOCK`], the blocks the embedder sorts and batches texts in,
/// so a part's batches are those of the whole list and the embeddings do
/// not depend on the part size.
pub fn part_size(asked: usize) -> usize {
    asked.max(1).div_ceil(BATCHING_BLOCK) * BATCHING_BLOCK
}

/// A saved part's unit embeddings, if it is whole: `rows` float32 rows of
/// `width` (the first part's, when known). Anything else is computed again,
/// with a warning naming the file.
fn read_part(path: &Path, rows: usize, width: Option<usize>) -> Option<Tensor> {
    if !path.is_file() {
        return None;
    }
    let problem = match candle_core::safetensors::load(path, &Device::Cpu) {
        Ok(part) => match part.get("embeddings") {
            Some(m)
                if m.dtype() == DType::F32
                    && m.dims().len() == 2
                    && m.dims()[0] == rows
                    && width.is_none_or(|w| m.dims()[1] == w) =>
            {
                return Some(m.clone())
            }
            Some(m) => format!(
                "{:?} {:?}, expected {rows} float32 rows{}",
                m.dtype(),
                m.dims(),
                width.map(|w| format!(" of {w}")).unwrap_or_default()
            ),
            None => "no `embeddings` tensor".into(),
        },
        Err(e) => e.to_string(),
    };
    tracing::warn!(path = %path.display(), problem, "a saved teacher part is computed again");
    None
}

/// Writes a part: serialized whole, then written and synced through
/// [`write_bytes_atomically`](crate::io::atomic_file::write_bytes_atomically),
/// so a part on disk is complete.
fn save_part(path: &Path, m: &Tensor) -> Result<()> {
    let bytes = safetensors::serialize([("embeddings", m)], None)
        .map_err(|e| Error::weights(path, e.into()))?;
    crate::io::atomic_file::write_bytes_atomically(path, &bytes)
}

/// Removes the parts directories of `cache` (of every part size).
fn remove_parts(cache: &Path) {
    let (Some(dir), Some(stem)) = (cache.parent(), cache.file_stem()) else {
        return;
    };
    let prefix = format!("{}.parts-", stem.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let path = entry.path();
            if let Err(e) = std::fs::remove_dir_all(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove saved teacher parts");
                }
            }
        }
    }
}

/// An exclusive lock on a teacher cache while it is computed
/// (`<cache>.lock`, `flock`, released by the kernel however the process
/// ends): a second run on the same texts waits, then reads the cache.
fn lock_cache(cache: &Path) -> Result<std::fs::File> {
    let path = cache.with_extension("lock");
    let file = crate::io::atomic_file::open_lock_file(&path)?;
    if file.try_lock().is_err() {
        tracing::info!(path = %path.display(), "another run computes these teacher embeddings; waiting for it");
        file.lock().map_err(|e| Error::io(&path, e))?;
    }
    Ok(file)
}

impl TeacherEmbeddings {
    /// Loads `cache` if it holds every text of `texts`, else embeds them
    /// with the teacher `load_teacher` gives (called only then) and writes
    /// the cache. `texts` maps each text the student scores to the text the
    /// teacher embeds for it (the same text, or the text in the teacher's
    /// own format).
    ///
    /// The texts are embedded in parts of [`part_size`]`(part_texts)`, each
    /// saved as it is done (beside the cache, in `<cache>.parts-<size>/`),
    /// so a run interrupted while its teacher embeds picks up at the first
    /// missing part; the parts are removed once the cache is written. The
    /// embeddings are the same bit for bit whatever the part size and
    /// however often the computation was interrupted. `progress` gets texts
    /// done and total, counting those of saved parts.
    pub fn load_or_compute<'a>(
        load_teacher: impl FnOnce() -> Result<TeacherModel<'a>>,
        texts: &BTreeMap<String, String>,
        cache: &Path,
        batch_size: usize,
        part_texts: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let keys: Vec<String> = texts.keys().map(|t| key(t)).collect();
        if let Some(cached) = Self::load_cache(cache, &keys)? {
            return Ok(cached);
        }
        if let Some(parent) = cache.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let _lock = lock_cache(cache)?;
        // Written by the run that held the lock before us?
        if let Some(cached) = Self::load_cache(cache, &keys)? {
            return Ok(cached);
        }
        let list: Vec<&str> = texts.values().map(String::as_str).collect();
        let total = list.len();
        let part_texts = part_size(part_texts);
        let parts_dir = parts_dir(cache, part_texts);
        std::fs::create_dir_all(&parts_dir).map_err(|e| Error::io(&parts_dir, e))?;
        let mut teacher = Some(load_teacher);
        let mut model: Option<TeacherModel<'a>> = None;
        let mut rows: Vec<Tensor> = Vec::with_capacity(list.len().div_ceil(part_texts));
        let mut saved = 0;
        for (i, part) in list.chunks(part_texts).enumerate() {
            let done = i * part_texts;
            let path = parts_dir.join(format!("part-{i:06}.safetensors"));
            let width = rows.first().map(|m| m.dims()[1]);
            if let Some(m) = read_part(&path, part.len(), width) {
                saved += part.len();
                progress(done + part.len(), total);
                rows.push(m);
                continue;
            }
            if model.is_none() {
                if saved > 0 {
                    tracing::info!(
                        saved,
                        total,
                        path = %parts_dir.display(),
                        "teacher embeddings: resuming after the saved parts"
                    );
                }
                model = Some((teacher.take().expect("loaded once"))()?);
            }
            let teacher = model.as_ref().expect("loaded");
            let m = teacher.embed(part, "", batch_size, &mut |n| progress(done + n, total))?;
            let (n, d) = m.dim();
            let m = Tensor::from_vec(m.into_raw_vec_and_offset().0, (n, d), &Device::Cpu)?;
            let m = super::objective::normalize(&m)?;
            save_part(&path, &m)?;
            rows.push(m);
        }
        let matrix = Tensor::cat(&rows, 0).map_err(|e| Error::weights(&parts_dir, e))?;
        let map = HashMap::from([("embeddings".to_string(), matrix.clone())]);
        // The keys first, then the embeddings written beside the cache and
        // renamed into place: a killed run leaves no half-written cache,
        // and a cache file always has its keys.
        let names_path = cache.with_extension("keys.json");
        crate::io::atomic_file::write_bytes_atomically(
            &names_path,
            serde_json::to_string(&keys).expect("keys").as_bytes(),
        )?;
        let partial = cache.with_extension("safetensors.partial");
        crate::io::atomic_file::save_safetensors(&map, &partial)?;
        std::fs::rename(&partial, cache).map_err(|e| Error::io(cache, e))?;
        remove_parts(cache);
        Ok(Self {
            index: keys.into_iter().enumerate().map(|(i, k)| (k, i)).collect(),
            matrix,
        })
    }

    /// The cache at `cache`, if it holds every one of `keys`.
    fn load_cache(cache: &Path, keys: &[String]) -> Result<Option<Self>> {
        if !cache.is_file() {
            return Ok(None);
        }
        let tensors = candle_core::safetensors::load(cache, &Device::Cpu)
            .map_err(|e| Error::weights(cache, e))?;
        let names_path = cache.with_extension("keys.json");
        let names: Vec<String> = crate::io::json_file::read_json(&names_path)?;
        let Some(matrix) = tensors.get("embeddings") else {
            return Ok(None);
        };
        let index: HashMap<String, usize> =
            names.into_iter().enumerate().map(|(i, k)| (k, i)).collect();
        if !keys.iter().all(|k| index.contains_key(k)) {
            return Ok(None);
        }
        tracing::info!(path = %cache.display(), "teacher embeddings from the cache");
        Ok(Some(Self {
            index,
            matrix: matrix.clone(),
        }))
    }

    /// The teacher's unit embeddings `(N, D)` of `texts`, in order.
    pub fn embeddings<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> Result<Tensor> {
        let rows: Vec<u32> = texts
            .into_iter()
            .map(|t| {
                self.index.get(&key(t)).map(|r| *r as u32).ok_or_else(|| {
                    Error::InvalidArgument("a training text has no teacher embedding".into())
                })
            })
            .collect::<Result<_>>()?;
        Ok(self
            .matrix
            .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?)
    }

    /// Cosine scores `(B, C)` of each query against its candidates.
    pub fn scores(&self, queries: &[&str], candidates: &[Vec<&str>]) -> Result<Tensor> {
        let b = queries.len();
        let c = candidates.first().map_or(0, Vec::len);
        let q = self.embeddings(queries.iter().copied())?;
        let cand = self.embeddings(candidates.iter().flatten().copied())?;
        Ok(super::objective::candidate_scores(&q, &cand, c)?.reshape((b, c))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::text_format::DocumentTemplate;

    #[test]
    fn a_second_run_waits_for_the_first_and_reads_its_cache_without_a_teacher() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("teacher-x.safetensors");
        let texts = BTreeMap::from([
            ("one".to_string(), "one".to_string()),
            ("two".to_string(), "two".to_string()),
        ]);
        // The first run holds the lock while it computes.
        let first = lock_cache(&cache).unwrap();
        let waiting = {
            let (cache, texts) = (cache.clone(), texts.clone());
            std::thread::spawn(move || {
                TeacherEmbeddings::load_or_compute(
                    || -> Result<TeacherModel<'static>> {
                        panic!("the teacher was loaded: the run did not wait for the cache")
                    },
                    &texts,
                    &cache,
                    32,
                    1024,
                    &mut |_, _| {},
                )
                .map(|t| t.matrix.dims().to_vec())
            })
        };
        // Give the second run time to reach the lock, then finish the
        // first: its cache, then the lock released.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let keys: Vec<String> = texts.keys().map(|t| key(t)).collect();
        crate::io::atomic_file::write_bytes_atomically(
            &cache.with_extension("keys.json"),
            serde_json::to_string(&keys).unwrap().as_bytes(),
        )
        .unwrap();
        let m = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        crate::io::atomic_file::save_safetensors(&HashMap::from([("embeddings", m)]), &cache)
            .unwrap();
        drop(first);
        assert_eq!(waiting.join().unwrap().unwrap(), vec![2, 2]);
    }

    fn format(template: &str, document_prompt: &str, query_prefix: &str) -> TextFormat {
        TextFormat {
            template: DocumentTemplate(template.into()),
            document_prompt: document_prompt.into(),
            query_prefix: query_prefix.into(),
        }
    }

    #[test]
    fn a_teacher_reads_queries_with_its_own_prompt_and_documents_as_they_are() {
        let student = format("{prompt}{title} {text}", "", "Instruct: find it\nQuery: ");
        let teacher = format("{title} {text}", "", "");
        let texts = BTreeMap::from([
            ("Instruct: find it\nQuery: what is X?".to_string(), true),
            ("Title Body of a document.".to_string(), false),
        ]);
        let view = texts_in_teacher_format(&texts, &student, &teacher).unwrap();
        assert_eq!(view["Instruct: find it\nQuery: what is X?"], "what is X?");
        assert_eq!(
            view["Title Body of a document."],
            "Title Body of a document."
        );

        let prompted_teacher = format("{title} {text}", "", "query: ");
        let view = texts_in_teacher_format(&texts, &student, &prompted_teacher).unwrap();
        assert_eq!(
            view["Instruct: find it\nQuery: what is X?"],
            "query: what is X?"
        );

        // A query without the student's prompt was not formatted by it.
        let stray = BTreeMap::from([("what is X?".to_string(), true)]);
        let err = texts_in_teacher_format(&stray, &student, &teacher).unwrap_err();
        assert!(err.contains("lacks the student's prompt"), "{err}");
    }

    #[test]
    fn documents_written_differently_are_refused() {
        let student = format("{prompt}{title} {text}", "", "");
        let teacher = format("title: {title_or_none} | text: {text}", "", "");
        let texts = BTreeMap::from([("a document".to_string(), false)]);
        let err = texts_in_teacher_format(&texts, &student, &teacher).unwrap_err();
        assert!(
            err.contains("title: {title_or_none} | text: {text}"),
            "{err}"
        );
    }
}
