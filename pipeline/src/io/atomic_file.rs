//! Output files that appear whole or not at all.
//!
//! Every file effir writes goes through [`write_atomically`]: the content is
//! written to a temporary file in the destination directory, flushed, and
//! renamed over the destination only when the writer succeeded. A failure
//! half-way leaves no partial output behind. Output directories are staged
//! beside their destination ([`StagedDir`]) and moved into place whole; an
//! existing one is exchanged with the new one in a single rename. While a
//! directory is staged its destination is locked, so a second process
//! writing the same output fails with a message instead of interleaving.
//! Temporary names carry the writer's process id, and a later run removes
//! those whose writer is gone (a killed run leaves nothing that lasts).
//! Files are created 0666 and
//! directories 0777, less the umask (what `std::fs::write` and `mkdir` give),
//! not the owner-only modes of temporary files: a server running as another
//! user reads what effir wrote.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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

/// The directory `path` is written in (created if need be), with what dead
/// writers left there removed.
fn writable_parent(path: &Path) -> Result<&Path> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    remove_stale_temporaries(dir);
    Ok(dir)
}

/// A new temporary file in `path`'s directory (created if need be), named
/// for this process, after removing what dead writers left there.
fn temporary_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = writable_parent(path)?;
    let prefix = format!("{FILE_PREFIX}{}-", std::process::id());
    output_builder(&prefix, false)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Writes `path` through `write`, atomically. The closure's error aborts the
/// write and the destination is left untouched.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let tmp = temporary_beside(path)?;
    // Held while it is written: a cleanup by another process sees it alive.
    let _ = tmp.as_file().try_lock();
    {
        let mut out = BufWriter::new(tmp.as_file());
        write(&mut out)?;
        out.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A new staging directory in `parent`, named for this process, and the
/// handle that holds it locked while it is used: a cleanup by another
/// process sees it alive ([`remove_stale_temporaries`]). The lock is `None`
/// where the file system refuses it.
fn locked_staging_dir(parent: &Path) -> Result<(tempfile::TempDir, Option<std::fs::File>)> {
    let dir = output_builder(&format!("{STAGING_PREFIX}{}-", std::process::id()), true)
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    let held = std::fs::File::open(dir.path())
        .ok()
        .filter(|f| f.try_lock().is_ok());
    Ok((dir, held))
}

/// Saves `tensors` to `path` as safetensors, atomically and synced like
/// [`write_atomically`]. The safetensors crate streams the tensors into a
/// temporary file of its own, in the directory it writes to: that directory
/// is an effir staging directory beside `path` (locked, named for this
/// process), so what a killed run leaves there is removed by a later one
/// ([`remove_stale_temporaries`]). The finished file is synced and given the
/// mode an ordinary file gets (0666 less the umask) before it takes
/// `path`'s name.
pub fn save_safetensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    let dir = writable_parent(path)?;
    let (staging, _held) = locked_staging_dir(dir)?;
    let staged = staging.path().join("weights.safetensors");
    candle_core::safetensors::save(tensors, &staged).map_err(|e| Error::weights(path, e))?;
    let written = std::fs::File::open(&staged).map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !process_umask();
        written
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(path, e))?;
    }
    written.sync_all().map_err(|e| Error::io(path, e))?;
    std::fs::rename(&staged, path).map_err(|e| Error::io(path, e))?;
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

/// Prefixes of the temporary files and directories effir writes beside its
/// outputs, each followed by the writer's process id and a `-`.
const FILE_PREFIX: &str = ".effir-";
const STAGING_PREFIX: &str = ".effir-staging-";
/// A previous output moved aside while a new one takes its place (where
/// directories cannot be exchanged in one rename); holds `old` and, in
/// [`TARGET_FILE`], the name of the output it belongs to.
const REPLACED_PREFIX: &str = ".effir-replaced-";
const TARGET_FILE: &str = "target";
/// The suffix of an output's lock file, `.NAME.effir-lock`.
const LOCK_SUFFIX: &str = ".effir-lock";

/// Removes the temporary files and staging directories in `dir` that no
/// writer holds any more: what a killed run left. A writer holds each of
/// its temporaries locked (`flock`) and names it with its process id; an
/// entry is removed only when that process does not run here and the lock
/// is free, so a live writer in another container or on another machine
/// sharing the directory keeps its files. A previous output moved aside by
/// a killed replacement is put back where its output is missing. Best
/// effort; what cannot be removed stays.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(LOCK_SUFFIX) {
            remove_free_lock(&entry.path());
            continue;
        }
        let rest = [STAGING_PREFIX, REPLACED_PREFIX]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .or_else(|| {
                name.strip_prefix(FILE_PREFIX)
                    .filter(|_| name.ends_with(".tmp"))
            });
        let Some(rest) = rest else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || process_runs(pid) {
            continue;
        }
        let path = entry.path();
        // Held by a writer this machine cannot see: leave it.
        let Ok(handle) = std::fs::File::open(&path) else {
            continue;
        };
        if handle.try_lock().is_err() {
            continue;
        }
        if name.starts_with(REPLACED_PREFIX) {
            restore_moved_aside(dir, &path);
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(
                "removed {}, left by a run that did not finish",
                path.display()
            ),
            Err(e) => tracing::warn!("could not remove {}: {e}", path.display()),
        }
    }
}

/// Removes an output lock file nobody holds (its writer was killed). A
/// process about to lock it notices it is gone and makes a new one
/// ([`OutputLock::acquire`]).
fn remove_free_lock(path: &Path) {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    if file.try_lock().is_ok() && same_file(&file, path) {
        let _ = std::fs::remove_file(path);
    }
}

/// Puts a previous output that a killed replacement moved aside back in
/// place, if its output is missing.
fn restore_moved_aside(dir: &Path, aside: &Path) {
    let Ok(target) = std::fs::read_to_string(aside.join(TARGET_FILE)) else {
        return;
    };
    let target = target.trim();
    if target.is_empty() || target.contains('/') {
        return;
    }
    let out = dir.join(target);
    if !out.exists() && aside.join("old").exists() {
        match std::fs::rename(aside.join("old"), &out) {
            Ok(()) => tracing::warn!(
                "put the previous {} back: a replacement of it was interrupted",
                out.display()
            ),
            Err(e) => tracing::warn!("could not put the previous {} back: {e}", out.display()),
        }
    }
}

/// Whether a process with this id runs on this machine.
fn process_runs(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        Path::new(&format!("/proc/{pid}")).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// Opens (creating it if needed) a file that is only ever locked, never
/// written: its content is left as it is.
pub(crate) fn open_lock_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// An exclusive lock on an output path, held while it is being written:
/// `.NAME.effir-lock` beside it, locked with `flock` (released by the
/// kernel when the process dies, however it dies).
struct OutputLock {
    path: std::path::PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    fn acquire(out: &Path, parent: &Path) -> Result<Self> {
        let name = out
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        let path = parent.join(format!(".{name}{LOCK_SUFFIX}"));
        loop {
            let file = open_lock_file(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                // Held by a cleanup that is removing it: try a new one.
                Err(std::fs::TryLockError::WouldBlock) if !same_file(&file, &path) => continue,
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: another process is writing this output (it holds {}); wait for it to finish or choose another output",
                        out.display(),
                        path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The holder before us removes the file when done; a lock on a
            // file that is no longer at `path` locks nothing: try again.
            if same_file(&file, &path) {
                return Ok(Self { path, _file: file });
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so a waiter that opened it retries.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// A directory built next to its destination and renamed into place when
/// complete; dropped unpublished, it is removed with everything in it. The
/// destination is locked from creation to publication.
pub struct StagedDir {
    dir: tempfile::TempDir,
    /// The staging directory itself, locked while this process uses it.
    _held: Option<std::fs::File>,
    _lock: OutputLock,
    /// Dropped last: the parent directories made for this output.
    _parents: CreatedParents,
}

/// Directories an output created above itself, deepest first. Dropped, it
/// removes those that are empty: an output that was never published
/// leaves no directories behind, and a published one keeps its parents
/// (they hold it).
struct CreatedParents(Vec<PathBuf>);

impl CreatedParents {
    /// Creates `dir` and its missing ancestors, remembering which.
    fn create(dir: &Path) -> Result<Self> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            missing.push(d.to_path_buf());
            at = d.parent();
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Self(missing))
    }
}

impl Drop for CreatedParents {
    fn drop(&mut self) {
        for dir in &self.0 {
            // Fails, leaving it, when anything is in it.
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
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
        let staged = Self::beside_existing(out)?;
        // Another process may have published it while we waited to lock.
        if out.exists() {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists; choose a new output directory",
                out.display()
            )));
        }
        Ok(staged)
    }

    /// Like [`StagedDir::beside`], for a destination [`StagedDir::replace`]
    /// may overwrite.
    pub fn beside_existing(out: &Path) -> Result<Self> {
        if out.file_name().is_none() {
            return Err(Error::InvalidArgument(format!(
                "{}: not a path effir can write an output to (it must end in a name)",
                out.display()
            )));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parents = CreatedParents::create(parent)?;
        let lock = OutputLock::acquire(out, parent)?;
        remove_stale_temporaries(parent);
        let (dir, held) = locked_staging_dir(parent)?;
        Ok(Self {
            dir,
            _held: held,
            _lock: lock,
            _parents: parents,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the staged directory to `out`.
    pub fn publish(self, out: &Path) -> Result<()> {
        // The locks and the created parents stay held until this returns.
        let staged = self.dir.keep();
        std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))
    }

    /// Publishes over an existing `out`: the two directories are exchanged
    /// in one rename (Linux `renameat2(RENAME_EXCHANGE)`), so `out` is at
    /// every moment the old directory or the new one, then the old one is
    /// removed. Where the exchange is not available, the old directory is
    /// moved aside first (for an instant `out` does not exist).
    pub fn replace(self, out: &Path) -> Result<()> {
        if !out.exists() {
            return self.publish(out);
        }
        // The locks and the created parents stay held until this returns.
        let staged = self.dir.keep();
        if exchange(&staged, out).is_ok() {
            // `staged` now holds the old directory, named as a temporary
            // of this process: removed here, or by a later run if this one
            // is killed first. The new output is in place either way.
            if let Err(e) = std::fs::remove_dir_all(&staged) {
                tracing::warn!(
                    "could not remove the previous output ({}): {e}",
                    staged.display()
                );
            }
            return Ok(());
        }
        // No exchange here (NFS, FUSE, CIFS): move the old one aside, with
        // the name of its output, then the new one in. Killed in between, a
        // later run puts the old one back ([`remove_stale_temporaries`]).
        let parent = staged.parent().unwrap_or(Path::new("."));
        let aside = output_builder(&format!("{REPLACED_PREFIX}{}-", std::process::id()), true)
            .tempdir_in(parent)
            .map_err(|e| Error::io(out, e))?
            .keep();
        let _held_aside = std::fs::File::open(&aside)
            .ok()
            .filter(|f| f.try_lock().is_ok());
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::fs::write(aside.join(TARGET_FILE), &name).map_err(|e| Error::io(&aside, e))?;
        let old = aside.join("old");
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        if let Err(e) = std::fs::rename(&staged, out) {
            // Put the previous output back; the new one stays staged.
            let _ = std::fs::rename(&old, out);
            return Err(Error::io(out, e));
        }
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(
                "could not remove the previous output ({}): {e}",
                aside.display()
            );
        }
        Ok(())
    }

    /// Publishes over an existing `out` keeping what it holds besides the
    /// staged entries: every other top-level entry of `out` is hard-linked
    /// (or copied) into the staged directory first, then the two are
    /// exchanged ([`StagedDir::replace`]). For outputs several commands
    /// write into (an evaluation's directory).
    pub fn replace_keeping_others(self, out: &Path) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(out) {
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(out, e))?;
                let to = self.path().join(entry.file_name());
                if to.exists() {
                    continue;
                }
                link_tree(&entry.path(), &to)?;
            }
        }
        self.replace(out)
    }
}

/// `from` (a file, a symbolic link or a directory tree) hard-linked at
/// `to`, copying where a link cannot be made; symbolic links are recreated,
/// not followed, and effir's own temporaries and locks are left out.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with(FILE_PREFIX) || name.ends_with(LOCK_SUFFIX) {
        return Ok(());
    }
    let kind = std::fs::symlink_metadata(from)
        .map_err(|e| Error::io(from, e))?
        .file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| Error::io(from, e))?;
        #[cfg(unix)]
        return std::os::unix::fs::symlink(&target, to).map_err(|e| Error::io(to, e));
        #[cfg(not(unix))]
        return Err(Error::io(
            to,
            std::io::Error::from(std::io::ErrorKind::Unsupported),
        ));
    }
    if kind.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if std::fs::hard_link(from, to).is_ok() {
        Ok(())
    } else {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| Error::io(from, e))
    }
}

/// Exchanges two paths in one rename.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves
    // relative ones against the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`.
    fn entry_names(dir: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect()
    }

    #[test]
    fn a_second_writer_of_the_same_output_is_refused_until_the_first_is_done() {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        let first = StagedDir::beside(&out).unwrap();
        let Err(second) = StagedDir::beside(&out) else {
            panic!("a second writer got the output");
        };
        assert!(
            second.to_string().contains("another process is writing"),
            "{second}"
        );
        std::fs::write(first.path().join("a"), "1").unwrap();
        first.publish(&out).unwrap();
        // Done: the lock is gone, and a replacement may start.
        assert!(!work.path().join(".out.effir-lock").exists());
        let next = StagedDir::beside_existing(&out).unwrap();
        std::fs::write(next.path().join("b"), "2").unwrap();
        next.replace(&out).unwrap();
        assert!(out.join("b").is_file() && !out.join("a").exists());
        let names = entry_names(work.path());
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("out")],
            "leftovers: {names:?}"
        );
    }

    /// A weight file replaces the old one whole, loads back equal, gets an
    /// ordinary file's mode (others may read it) and leaves nothing else.
    #[cfg(unix)]
    #[test]
    fn a_saved_weight_file_replaces_the_old_one_readable_with_nothing_left_over() {
        use std::os::unix::fs::PermissionsExt;
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("model.safetensors");
        std::fs::write(&path, "old").unwrap();
        let weights = candle_core::Tensor::arange(0f32, 6.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let tensors = std::collections::HashMap::from([("w".to_string(), weights.clone())]);
        save_safetensors(&tensors, &path).unwrap();
        let loaded = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            loaded["w"].to_vec2::<f32>().unwrap(),
            weights.to_vec2::<f32>().unwrap()
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !process_umask(), "mode {mode:o}");
        let names = entry_names(work.path());
        assert_eq!(names, vec![std::ffi::OsString::from("model.safetensors")]);
    }

    /// Run only as the child of the next test: saves a 64 MB weight file
    /// into `$EFFIR_SAVE_UNTIL_KILLED` over and over until it is killed.
    #[test]
    #[ignore = "the writer a_weight_file_write_killed_half_way_leaves_nothing_behind kills"]
    fn saves_weight_files_until_killed() {
        let Some(dir) = std::env::var_os("EFFIR_SAVE_UNTIL_KILLED") else {
            return;
        };
        let weights = candle_core::Tensor::zeros(
            (4096, 4096),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let tensors = std::collections::HashMap::from([("w".to_string(), weights)]);
        let path = Path::new(&dir).join("model.safetensors");
        loop {
            save_safetensors(&tensors, &path).unwrap();
        }
    }

    /// Whether the safetensors crate's own temporary (`.tmp…`) is anywhere
    /// in `dir` or one level below it.
    fn holds_crate_temporary(dir: &Path) -> bool {
        entry_names(dir).iter().any(|name| {
            let name = name.to_string_lossy();
            name.starts_with(".tmp")
                || (name.starts_with(STAGING_PREFIX)
                    && std::fs::read_dir(dir.join(&*name)).is_ok_and(|inner| {
                        inner
                            .flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
                    }))
        })
    }

    /// A writer killed while the safetensors crate streams a weight file
    /// leaves the crate's temporary behind; the next weight file saved in
    /// that directory removes it (it was written inside a staging
    /// directory of the dead process), and nothing else is left.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_weight_file_write_killed_half_way_leaves_nothing_behind() {
        let work = tempfile::tempdir().unwrap();
        for _attempt in 0..20 {
            let mut writer = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--ignored",
                    "--exact",
                    "io::atomic_file::tests::saves_weight_files_until_killed",
                    "--test-threads=1",
                ])
                .env("EFFIR_SAVE_UNTIL_KILLED", work.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !holds_crate_temporary(work.path()) && std::time::Instant::now() < deadline {}
            writer.kill().unwrap();
            writer.wait().unwrap();
            if holds_crate_temporary(work.path()) {
                break;
            }
        }
        assert!(
            holds_crate_temporary(work.path()),
            "the writer was never killed in the middle of a write"
        );
        let weights =
            candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let tensors = std::collections::HashMap::from([("w".to_string(), weights)]);
        save_safetensors(&tensors, &work.path().join("other.safetensors")).unwrap();
        let left: Vec<_> = entry_names(work.path())
            .into_iter()
            .filter(|n| n != "model.safetensors" && n != "other.safetensors")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// An output under directories that did not exist creates them; if it
    /// is never published they go again, and a published one keeps them.
    /// Directories that existed, or that something else wrote into, stay.
    #[test]
    fn an_unpublished_output_leaves_no_parent_directories_behind() {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("a/b/c/out");
        let staged = StagedDir::beside(&out).unwrap();
        std::fs::write(staged.path().join("x"), "1").unwrap();
        assert!(work.path().join("a/b/c").is_dir());
        drop(staged);
        assert!(!work.path().join("a").exists(), "a/b/c left behind");

        std::fs::create_dir(work.path().join("a")).unwrap();
        let staged = StagedDir::beside(&out).unwrap();
        std::fs::write(work.path().join("a/b/note"), "someone else's").unwrap();
        drop(staged);
        assert!(!work.path().join("a/b/c").exists());
        assert!(
            work.path().join("a/b/note").is_file(),
            "a non-empty parent went"
        );

        let staged = StagedDir::beside(&out).unwrap();
        staged.publish(&out).unwrap();
        assert!(out.is_dir());
    }

    #[test]
    fn leftovers_of_a_dead_writer_are_removed_and_a_live_ones_kept() {
        let work = tempfile::tempdir().unwrap();
        // No process has id 0 in a name we write; u32::MAX is never a pid.
        let dead = work
            .path()
            .join(format!("{STAGING_PREFIX}{}-abc", u32::MAX));
        std::fs::create_dir_all(dead.join("inner")).unwrap();
        let dead_file = work
            .path()
            .join(format!("{FILE_PREFIX}{}-xyz.tmp", u32::MAX));
        std::fs::write(&dead_file, "partial").unwrap();
        let live = work
            .path()
            .join(format!("{STAGING_PREFIX}{}-def", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        let unrelated = work.path().join(".effir-notes");
        std::fs::write(&unrelated, "kept").unwrap();
        let free_lock = work.path().join(format!(".out{LOCK_SUFFIX}"));
        std::fs::write(&free_lock, "").unwrap();
        remove_stale_temporaries(work.path());
        assert!(!dead.exists() && !dead_file.exists() && !free_lock.exists());
        assert!(live.exists() && unrelated.exists());
    }

    #[test]
    fn a_previous_output_moved_aside_by_a_killed_replacement_is_put_back() {
        let work = tempfile::tempdir().unwrap();
        let aside = work
            .path()
            .join(format!("{REPLACED_PREFIX}{}-abc", u32::MAX));
        std::fs::create_dir_all(aside.join("old")).unwrap();
        std::fs::write(aside.join("old/metrics.json"), "previous").unwrap();
        std::fs::write(aside.join(TARGET_FILE), "eval").unwrap();
        remove_stale_temporaries(work.path());
        assert_eq!(
            std::fs::read_to_string(work.path().join("eval/metrics.json")).unwrap(),
            "previous"
        );
        assert!(!aside.exists());
    }

    #[test]
    fn a_dead_writers_temporary_that_is_still_locked_is_kept() {
        // A writer this machine cannot see (another PID namespace) holds
        // its lock: the entry stays.
        let work = tempfile::tempdir().unwrap();
        let file = work
            .path()
            .join(format!("{FILE_PREFIX}{}-held.tmp", u32::MAX));
        std::fs::write(&file, "being written").unwrap();
        let holder = std::fs::File::open(&file).unwrap();
        holder.lock().unwrap();
        remove_stale_temporaries(work.path());
        assert!(file.exists());
        drop(holder);
        remove_stale_temporaries(work.path());
        assert!(!file.exists());
    }

    #[test]
    fn replacing_keeps_the_entries_the_new_output_does_not_write() {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("eval");
        std::fs::create_dir_all(out.join("cache")).unwrap();
        std::fs::write(out.join("metrics.json"), "old").unwrap();
        std::fs::write(out.join("cache/x"), "kept").unwrap();
        let staged = StagedDir::beside_existing(&out).unwrap();
        std::fs::write(staged.path().join("metrics.json"), "new").unwrap();
        staged.replace_keeping_others(&out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("metrics.json")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("cache/x")).unwrap(),
            "kept"
        );
    }
}
