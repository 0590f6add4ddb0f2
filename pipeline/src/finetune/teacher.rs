//! The distillation teacher: embeddings of every text the training may
//! score, computed once with the teacher model and cached on disk, so each
//! step's teacher scores are dot products.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::embedder::Embedder;

/// Teacher embeddings by text.
pub struct TeacherEmbeddings {
    index: HashMap<String, usize>,
    /// `(N, D)`, unit rows.
    matrix: Tensor,
}

fn key(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

impl TeacherEmbeddings {
    /// Loads `cache` if it holds every text of `texts`, else embeds them
    /// with the teacher `load_teacher` gives (called only then) and writes
    /// the cache.
    pub fn load_or_compute(
        load_teacher: impl FnOnce() -> Result<Embedder>,
        texts: &BTreeSet<String>,
        cache: &Path,
        batch_size: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let keys: Vec<String> = texts.iter().map(|t| key(t)).collect();
        if cache.is_file() {
            let tensors = candle_core::safetensors::load(cache, &Device::Cpu)
                .map_err(|e| Error::weights(cache, e))?;
            let names_path = cache.with_extension("keys.json");
            let names: Vec<String> = crate::io::json_file::read_json(&names_path)?;
            if let Some(matrix) = tensors.get("embeddings") {
                let index: HashMap<String, usize> =
                    names.into_iter().enumerate().map(|(i, k)| (k, i)).collect();
                if keys.iter().all(|k| index.contains_key(k)) {
                    tracing::info!(path = %cache.display(), "teacher embeddings from the cache");
                    return Ok(Self {
                        index,
                        matrix: matrix.clone(),
                    });
                }
            }
        }
        let teacher = load_teacher()?;
        let list: Vec<&str> = texts.iter().map(String::as_str).collect();
        let total = list.len();
        let m = teacher.embed(&list, "", batch_size, &mut |done| progress(done, total))?;
        let (n, d) = m.dim();
        let matrix = Tensor::from_vec(m.into_raw_vec_and_offset().0, (n, d), &Device::Cpu)?;
        let matrix = super::objective::normalize(&matrix)?;
        let map = HashMap::from([("embeddings".to_string(), matrix.clone())]);
        if let Some(parent) = cache.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
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
        Ok(Self {
            index: keys.into_iter().enumerate().map(|(i, k)| (k, i)).collect(),
            matrix,
        })
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
