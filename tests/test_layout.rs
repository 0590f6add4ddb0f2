//! The code's shape, as the structure issue set it:
//! - `pipeline/src` holds `lib.rs`, `error.rs` and folders;
//! - no tensor name of any architecture is spelled outside the checkpoint
//!   map (`pipeline/src/model/arch/checkpoint_map.rs`);
//! - no two modules of a library import each other, directly or in a loop.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use effir_pipeline::model::arch::REGISTRY;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    common::files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect()
}

#[test]
fn the_pipeline_top_level_holds_lib_error_and_folders() {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root().join("pipeline/src")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    files.sort();
    assert_eq!(files, ["error.rs", "lib.rs"]);
}

/// The checkpoint names of every registered architecture that are specific
/// enough to find by text: dotted paths and names with an underscore
/// (`mlp.down_proj`, `down_proj`, `post_feedforward_layernorm`), not
/// words such as `query` or `norm`.
fn checkpoint_fragments() -> BTreeSet<String> {
    let mut names: Vec<&str> = Vec::new();
    for r in &REGISTRY {
        let m = r.checkpoint;
        let e = &m.embeddings;
        names.extend(
            [
                Some(e.tokens),
                e.positions,
                e.token_types,
                e.norm,
                m.final_norm,
            ]
            .into_iter()
            .flatten(),
        );
        names.push(m.layers);
        let a = &m.attention;
        names.extend([a.query, a.key, a.value, a.output]);
        names.extend([a.query_norm, a.key_norm].into_iter().flatten());
        names.extend(m.mlp.gate);
        names.extend([m.mlp.up, m.mlp.down]);
        for norms in [a.norms, m.mlp.norms] {
            names.extend(norms.all().map(|(_, n)| n));
        }
    }
    let mut fragments = BTreeSet::new();
    for name in names {
        if name.contains('.') || name.contains('_') {
            fragments.insert(name.to_string());
        }
        for part in name.split('.') {
            if part.contains('_') {
                fragments.insert(part.to_string());
            }
        }
    }
    fragments
}

#[test]
fn no_tensor_name_is_spelled_outside_the_checkpoint_map() {
    let fragments = checkpoint_fragments();
    assert!(fragments.contains("down_proj") && fragments.contains("intermediate.dense"));
    let map = root().join("pipeline/src/model/arch/checkpoint_map.rs");
    let mut found = Vec::new();
    for dir in ["pipeline/src", "onnx/src", "src", "examples"] {
        for file in rust_files(&root().join(dir)) {
            if file == map {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for fragment in &fragments {
                // As a name of its own: `max_position_embeddings` is a config
                // key, not the `position_embeddings` table.
                let standalone = text.match_indices(fragment.as_str()).any(|(i, _)| {
                    !text[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if standalone {
                    found.push(format!("{}: {fragment}", file.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "tensor names outside the map:\n{}",
        found.join("\n")
    );
}

/// Module paths (`model::arch::bert`) of a crate's source files.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    rust_files(src)
        .into_iter()
        .map(|file| {
            let rel = file.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            (parts.join("::"), file)
        })
        .collect()
}

/// The module a path such as `model::arch::Backbone` resolves to: its
/// longest prefix that is a module.
fn resolve(path: &str, modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|k| parts[..k].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Paths a file names: `crate::a::b`, `super::a` and, for a module with
/// children, `child::item`; in `use` groups, each item. Unit tests
/// (`#[cfg(test)]` to the end of the file) and comments are left out.
fn imports(module: &str, text: &str, modules: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let join = |base: &str, rest: &str| {
        if base.is_empty() {
            rest.to_string()
        } else {
            format!("{base}::{rest}")
        }
    };
    let mut paths = Vec::new();
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut expand = |base: &str, rest: &str| {
        // `base::{a::b, c}` names base::a::b and base::c; `base::x` names base::x.
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let item: String = item
                    .trim()
                    .chars()
                    .take_while(|c| is_path_char(*c))
                    .collect();
                paths.push(join(base, &item));
            }
            paths.push(base.to_string());
        } else {
            let item: String = rest.chars().take_while(|c| is_path_char(*c)).collect();
            paths.push(join(base, &item));
        }
    };
    for (i, _) in code.match_indices("::") {
        let before = &code[..i];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        if start > 0 && code[..start].ends_with("::") {
            continue; // the middle of a longer path
        }
        let head = &before[start..];
        let rest = &code[i + 2..];
        match head {
            "crate" => expand("", rest),
            "super" => expand(parent, rest),
            "self" => expand(module, rest),
            child if modules.contains_key(&join(module, child)) => {
                expand(&join(module, child), rest)
            }
            _ => {}
        }
    }
    paths
        .iter()
        .filter_map(|p| resolve(p, modules))
        .filter(|m| m != module)
        .collect()
}

/// The module loops of a crate (each loop's modules, sorted).
fn module_loops(src: &Path) -> Vec<Vec<String>> {
    let modules = modules(src);
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(m, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            (m.clone(), imports(m, &text, &modules))
        })
        .collect();
    // A module is in a loop when it reaches itself.
    let reaches = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = graph[from].iter().cloned().collect();
        while let Some(m) = stack.pop() {
            if seen.insert(m.clone()) {
                stack.extend(graph[&m].iter().cloned());
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reaches(m))).collect();
    let mut loops: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, r) in &reach {
        if r.contains(*m) {
            let members: Vec<String> = reach
                .iter()
                .filter(|(o, ro)| r.contains(o.as_str()) && ro.contains(m.as_str()))
                .map(|(o, _)| (*o).clone())
                .collect();
            loops.insert(members);
        }
    }
    loops.into_iter().collect()
}

#[test]
fn no_two_modules_import_each_other() {
    for krate in ["pipeline/src", "onnx/src"] {
        let loops = module_loops(&root().join(krate));
        assert!(loops.is_empty(), "{krate}: module loops {loops:?}");
    }
}

#[test]
fn the_loop_check_finds_a_loop() {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(work.path().join("a")).unwrap();
    std::fs::write(work.path().join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(work.path().join("a/mod.rs"), "pub mod c;\nuse c::Thing;\n").unwrap();
    std::fs::write(work.path().join("a/c.rs"), "use super::{Other};\n").unwrap();
    std::fs::write(work.path().join("b.rs"), "use crate::a::c::Thing;\n").unwrap();
    assert_eq!(
        module_loops(work.path()),
        [vec!["a".to_string(), "a::c".to_string()]]
    );
}
