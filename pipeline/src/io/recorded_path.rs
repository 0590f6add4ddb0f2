//! Paths that outputs record (the model a pruned or exported directory came
//! from, the data it was tuned on) are written relative to the directory
//! that holds the record: no machine path leaks into a shipped model, and a
//! tree moved whole still resolves. Records written before this, with
//! absolute paths, still read.

use std::path::{Component, Path, PathBuf};

/// `target` as a path relative to `base_dir`. `base_dir` need not exist
/// yet (an output being staged): its nearest existing ancestor is resolved.
/// When no relative path exists (another drive), `target` as given.
pub fn relative_to(base_dir: &Path, target: &Path) -> PathBuf {
    let (Some(base), Some(target_abs)) = (absolute(base_dir), absolute(target)) else {
        return target.to_path_buf();
    };
    let base: Vec<Component> = base.components().collect();
    let to: Vec<Component> = target_abs.components().collect();
    let common = base.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return target.to_path_buf();
    }
    let mut relative = PathBuf::new();
    for _ in common..base.len() {
        relative.push("..");
    }
    for c in &to[common..] {
        relative.push(c.as_os_str());
    }
    if relative.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        relative
    }
}

/// `target` for display in a file under `base_dir` (a model card's
/// command line): relative to `base_dir` when the two share a directory
/// below the filesystem root; otherwise (the path would climb to the root,
/// which is an absolute path in disguise) as typed when that is relative,
/// else its file name after `…/`. No machine path is shown either way.
pub fn display_from(base_dir: &Path, target: &Path) -> String {
    let shares_more_than_root = match (absolute(base_dir), absolute(target)) {
        (Some(base), Some(to)) => {
            base.components()
                .zip(to.components())
                .take_while(|(a, b)| a == b)
                .count()
                > 1
        }
        _ => false,
    };
    if shares_more_than_root {
        relative_to(base_dir, target).display().to_string()
    } else if target.is_relative() {
        target.display().to_string()
    } else {
        format!(
            "…/{}",
            target
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )
    }
}

/// A recorded path read back from a record in `record_dir`.
pub fn resolve(record_dir: &Path, recorded: &Path) -> PathBuf {
    if recorded.is_absolute() {
        recorded.to_path_buf()
    } else {
        normalize(&record_dir.join(recorded))
    }
}

/// `path` made absolute with symlinks resolved as far as it exists; the
/// rest (not yet created) appended as it is.
fn absolute(path: &Path) -> Option<PathBuf> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let path = normalize(&path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = std::fs::canonicalize(existing) {
            return Some(rest.iter().rev().fold(canonical, |p, c| p.join(c)));
        }
        rest.push(existing.file_name()?.to_os_string());
        existing = existing.parent()?;
    }
}

/// Removes `.` and folds `..` into the component before it, lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_path_is_relative_to_the_record_and_resolves_back() {
        let work = tempfile::tempdir().unwrap();
        let model = work.path().join("models/minilm");
        std::fs::create_dir_all(&model).unwrap();
        // The output does not exist yet (it is being staged).
        let out = work.path().join("runs/onnx/minilm-50");
        let recorded = relative_to(&out, &model);
        assert_eq!(recorded, Path::new("../../../models/minilm"));
        assert_eq!(
            std::fs::canonicalize(resolve(&out, &recorded)).ok(),
            std::fs::canonicalize(&model).ok()
        );
        // Beside each other, and the directory itself.
        assert_eq!(
            relative_to(&work.path().join("models/pruned"), &model),
            Path::new("../minilm")
        );
        assert_eq!(relative_to(&model, &model), Path::new("."));
        // Old records hold absolute paths: they read as they are.
        assert_eq!(resolve(&out, &model), model);
    }

    #[test]
    fn a_displayed_path_never_climbs_to_the_root() {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("runs/export");
        let model = work.path().join("models/minilm");
        assert_eq!(display_from(&out, &model), "../../models/minilm");
        // Sharing only `/`: as typed when relative, else its name.
        assert_eq!(display_from(&out, Path::new("/proc/self")), "…/self",);
        let cwd = std::env::current_dir().unwrap();
        if cwd.components().nth(1) != work.path().components().nth(1) {
            assert_eq!(display_from(&out, Path::new("Cargo.toml")), "Cargo.toml");
        }
    }
}
