//! Output files that appear whole or not at all.
//!
//! Every file effir writes goes through [`write_atomically`]: the content is
//! written to a temporary file in the destination directory, flushed, and
//! renamed over the destination only when the writer succeeded. A failure
//! half-way leaves no partial output behind. Files are created 0666 and
//! directories 0777, less the umask (what `std::fs::write` and `mkdir` give),
//! not the owner-only modes of temporary files: a server running as another
//! user reads what effir wrote.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Temporary files and directories that become outputs: the modes of
/// ordinary ones (the umask applies).
pub fn output_builder<'a>(prefix: &'a str, directory: bool) -> tempfile::Builder<'a, 'a> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if directory { 0o777 } else { 0o666 };
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = directory;
    builder
}

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
    let tmp = output_builder(".effir-", false)
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

/// Saves `tensors` to `path` as safetensors. The safetensors crate writes
/// through an owner-only temporary file; the result gets the mode an
/// ordinary file gets (0666 less the umask).
pub fn save_safetensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::weights(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !process_umask();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// The process's umask, from `/proc/self/status` (Linux); 022 where it
/// cannot be read.
#[cfg(unix)]
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
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
        let dir = output_builder(".effir-staging-", true)
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
