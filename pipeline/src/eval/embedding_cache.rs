//! A cache of corpus embeddings, keyed by everything that determines them:
//! the model's files (content), the corpus (content), the encoding settings
//! and the effir version. Any change gives a new key, so a stale entry is
//! never read.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::io::npy::{read_npy, write_npy};

/// A content fingerprint (BLAKE3, hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(pub String);

/// Hashes every file under `dir` (relative path and content), in sorted
/// order. Model weights are memory-mapped and hashed on all cores.
pub fn fingerprint_dir(dir: &Path) -> Result<Fingerprint> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for relative in files {
        let path = dir.join(&relative);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let mut file_hasher = blake3::Hasher::new();
        file_hasher
            .update_mmap_rayon(&path)
            .map_err(|e| Error::io(&path, e))?;
        hasher.update(file_hasher.finalize().as_bytes());
    }
    Ok(Fingerprint(hasher.finalize().to_hex().to_string()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || name == "README.md" {
            continue;
        }
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

/// Hashes one file's content (decompressed or not, as stored).
pub fn fingerprint_file(path: &Path) -> Result<Fingerprint> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Fingerprint(hasher.finalize().to_hex().to_string()))
}

/// The key of one cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey(String);

impl CacheKey {
    /// Combines the model and corpus fingerprints with a description of the
    /// encoding settings (any string that changes when they change).
    pub fn new(model: &Fingerprint, corpus: &Fingerprint, settings: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        for part in [
            "effir corpus embeddings v1",
            env!("CARGO_PKG_VERSION"),
            &model.0,
            &corpus.0,
            settings,
        ] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        Self(hasher.finalize().to_hex()[..32].to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A directory of cached embedding matrices.
pub struct EmbeddingCache {
    dir: PathBuf,
}

impl EmbeddingCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$EFFIR_CACHE_DIR`, else `$XDG_CACHE_HOME/effir`, else `~/.cache/effir`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("EFFIR_CACHE_DIR") {
            return PathBuf::from(dir);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        base.join("effir")
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("corpus-{}.npy", key.as_str()))
    }

    /// The cached matrix for `key`, if present with `rows` rows. An entry
    /// that does not load is reported and ignored.
    pub fn get(&self, key: &CacheKey, rows: usize) -> Option<Array2<f32>> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        match read_npy(&path) {
            Ok(m) if m.nrows() == rows => Some(m),
            Ok(m) => {
                tracing::warn!(path = %path.display(), rows = m.nrows(), expected = rows, "ignoring cache entry with the wrong row count");
                None
            }
            Err(e) => {
                tracing::warn!("ignoring unreadable cache entry: {e}");
                None
            }
        }
    }

    /// Stores `matrix` under `key` (atomically).
    pub fn put(&self, key: &CacheKey, matrix: &Array2<f32>) -> Result<PathBuf> {
        let path = self.path(key);
        write_npy(&path, matrix)?;
        Ok(path)
    }
}
