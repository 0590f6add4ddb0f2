//! Output files that appear whole or not at all.
//!
//! Every file effir writes goes through [`write_atomically`]: the content is
//! written to a temporary file in the destination directory, flushed, and
//! renamed over the destination only when the writer succeeded. A failure
//! half-way leaves no partial output behind.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `path` through `write`, atomically. The closure's error aborts the
/// write and the destination is left untouched.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = tempfile::Builder::new()
        .prefix(".effir-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    {
        let mut out = BufWriter::new(tmp.as_file());
        write(&mut out)?;
        out.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes `bytes` to `path`, atomically.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// A directory built next to its destination and renamed into place when
/// complete; dropped unpublished, it is removed with everything in it.
pub struct StagedDir {
    dir: tempfile::TempDir,
}

impl StagedDir {
    /// A fresh staging directory beside `out` (whose parent is created).
    /// `out` itself must not exist.
    pub fn beside(out: &Path) -> Result<Self> {
        if out.exists() {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists; choose a new output directory",
                out.display()
            )));
        }
        Self::beside_existing(out)
    }

    /// Like [`StagedDir::beside`], for a destination [`StagedDir::replace`]
    /// may overwrite.
    pub fn beside_existing(out: &Path) -> Result<Self> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let dir = tempfile::Builder::new()
            .prefix(".effir-staging-")
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the staged directory to `out`.
    pub fn publish(self, out: &Path) -> Result<()> {
        let staged = self.dir.keep();
        std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))
    }

    /// Publishes over an existing `out`: the old directory is moved aside,
    /// the new one moved in, then the old one removed.
    pub fn replace(self, out: &Path) -> Result<()> {
        if !out.exists() {
            return self.publish(out);
        }
        let aside = tempfile::Builder::new()
            .prefix(".effir-replaced-")
            .tempdir_in(self.dir.path().parent().unwrap_or(Path::new(".")))
            .map_err(|e| Error::io(out, e))?;
        let old = aside.path().join("old");
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        self.publish(out)?;
        drop(aside);
        Ok(())
    }
}
