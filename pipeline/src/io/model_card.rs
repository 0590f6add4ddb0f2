//! The `README.md` of a directory effir writes (pruned, fine-tuned,
//! exported): a model card of its own, saying what the directory holds and
//! how it was made, instead of the source's card with the source's claims
//! and scores. The source's card is kept as `SOURCE_README.md` (through a
//! chain of effir stages, the original one), and its licence is carried
//! into the new card's front matter, with attribution.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::recorded_path::relative_to;

/// The file name of a model card.
pub const CARD_FILE: &str = "README.md";
/// Where the source's own card is kept.
pub const SOURCE_CARD_FILE: &str = "SOURCE_README.md";
/// The first line of the body of a card effir wrote.
const MARKER: &str = "<!-- effir model card -->";

/// A card being written: a title and sections of Markdown.
#[derive(Debug, Clone, Default)]
pub struct ModelCard {
    pub title: String,
    pub sections: Vec<(String, String)>,
}

impl ModelCard {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            sections: Vec::new(),
        }
    }

    pub fn section(mut self, heading: impl Into<String>, body: impl Into<String>) -> Self {
        self.sections.push((heading.into(), body.into()));
        self
    }

    /// Writes the card into `dir` (which holds a copy of `source`'s files):
    /// the copied card, if it is the source's own, becomes
    /// `SOURCE_README.md`; a card effir wrote earlier in the chain is
    /// replaced (its `SOURCE_README.md` was copied along). `out` is where
    /// `dir` will end up, for the relative path to `source`.
    pub fn write(&self, dir: &Path, source: &Path, out: &Path) -> Result<()> {
        let copied = dir.join(CARD_FILE);
        let previous = match std::fs::read_to_string(&copied) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&copied, e)),
        };
        let original = match &previous {
            Some(text) if !text.contains(MARKER) => {
                let kept = dir.join(SOURCE_CARD_FILE);
                std::fs::write(&kept, text).map_err(|e| Error::io(&kept, e))?;
                Some(text.clone())
            }
            _ => std::fs::read_to_string(dir.join(SOURCE_CARD_FILE)).ok(),
        };
        let licence = original.as_deref().and_then(front_matter_licence);
        let source_name = source
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| source.display().to_string());
        let mut text = String::from("---\n");
        if let Some(licence) = &licence {
            text += &format!("license: {licence}\n");
        }
        text += &format!("base_model: {source_name}\ntags:\n- effir\n---\n{MARKER}\n\n");
        text += &format!("# {}\n\n", self.title);
        text += &format!(
            "Made by effir {} from `{}` (`{}` relative to this directory){}.\n",
            env!("CARGO_PKG_VERSION"),
            source_name,
            relative_to(out, source).display(),
            match (&original, &licence) {
                (Some(_), Some(l)) => format!(
                    "; the source model's card is `{SOURCE_CARD_FILE}`, and its licence ({l}) applies"
                ),
                (Some(_), None) => format!("; the source model's card is `{SOURCE_CARD_FILE}`"),
                (None, _) => String::new(),
            }
        );
        for (heading, body) in &self.sections {
            text += &format!("\n## {heading}\n\n{}\n", body.trim_end());
        }
        std::fs::write(&copied, text).map_err(|e| Error::io(&copied, e))
    }
}

/// Sets the section `heading` of the effir card in `dir` to `body`
/// (replacing that section if the card has it, else appending it), written
/// atomically. Returns `false`, changing nothing, when `dir` has no card
/// effir wrote (a source model's own card is never edited).
pub fn update_section(dir: &Path, heading: &str, body: &str) -> Result<bool> {
    let path = dir.join(CARD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) if text.contains(MARKER) => text,
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let section = format!("\n## {heading}\n\n{}\n", body.trim_end());
    let start_marker = format!("\n## {heading}\n");
    let updated = match text.find(&start_marker) {
        Some(start) => {
            let after = start + start_marker.len();
            let end = text[after..]
                .find("\n## ")
                .map_or(text.len(), |i| after + i);
            format!("{}{section}{}", &text[..start], &text[end..])
        }
        None => format!(
            "{}{section}",
            text.trim_end_matches('\n').to_string() + "\n"
        ),
    };
    crate::io::atomic_file::write_bytes_atomically(&path, updated.as_bytes())?;
    Ok(true)
}

/// `license:` of a card's YAML front matter.
fn front_matter_licence(card: &str) -> Option<String> {
    let rest = card.strip_prefix("---")?;
    let end = rest.find("\n---")?;
    rest[..end]
        .lines()
        .find_map(|l| l.strip_prefix("license:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The command line that made an output, with every argument naming an
/// existing path written relative to `out` (see
/// [`crate::io::recorded_path::display_from`]), so the card holds no
/// machine path.
pub fn command_line(out: &Path) -> String {
    let mut args = std::env::args();
    let program = args.next().map_or_else(
        || "effir".to_string(),
        |p| {
            Path::new(&p)
                .file_name()
                .map_or(p.clone(), |n| n.to_string_lossy().into_owned())
        },
    );
    std::iter::once(program)
        .chain(args.map(|a| {
            let path = Path::new(&a);
            if path.is_absolute() || path.exists() {
                crate::io::recorded_path::display_from(out, path)
            } else {
                a
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_licence_comes_from_the_front_matter() {
        let card = "---\nlanguage: en\nlicense: apache-2.0\n---\n# all-MiniLM-L6-v2\n";
        assert_eq!(front_matter_licence(card).as_deref(), Some("apache-2.0"));
        assert_eq!(
            front_matter_licence("# no front matter\nlicense: x\n"),
            None
        );
    }

    #[test]
    fn a_section_is_replaced_in_place_and_a_source_card_never_edited() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        ModelCard::new("Exported")
            .section("Precision", "fp32")
            .section("Made with", "effir export")
            .write(dir.path(), &source, dir.path())
            .unwrap();
        assert!(update_section(dir.path(), "Validation", "PASS, first").unwrap());
        assert!(update_section(dir.path(), "Precision", "int8").unwrap());
        assert!(update_section(dir.path(), "Validation", "FAIL, latest").unwrap());
        let card = std::fs::read_to_string(dir.path().join(CARD_FILE)).unwrap();
        assert!(
            card.ends_with("## Precision\n\nint8\n\n## Made with\n\neffir export\n\n## Validation\n\nFAIL, latest\n"),
            "{card}"
        );
        assert!(!card.contains("first") && !card.contains("fp32"));
        // A card effir did not write is left alone.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join(CARD_FILE), "# Someone's model\n").unwrap();
        assert!(!update_section(other.path(), "Validation", "PASS").unwrap());
        assert_eq!(
            std::fs::read_to_string(other.path().join(CARD_FILE)).unwrap(),
            "# Someone's model\n"
        );
        assert!(!update_section(&dir.path().join("missing"), "Validation", "PASS").unwrap());
    }

    #[test]
    fn the_source_card_is_kept_once_through_a_chain() {
        let work = tempfile::tempdir().unwrap();
        let source = work.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        let original = "---\nlicense: mit\n---\n# The original\n";
        // Stage 1: the copied card is the source's.
        let first = work.path().join("first");
        std::fs::create_dir_all(&first).unwrap();
        std::fs::write(first.join(CARD_FILE), original).unwrap();
        ModelCard::new("Pruned")
            .section("Plan", "half")
            .write(&first, &source, &first)
            .unwrap();
        let card = std::fs::read_to_string(first.join(CARD_FILE)).unwrap();
        assert!(card.starts_with("---\nlicense: mit\n"), "{card}");
        assert!(card.contains("# Pruned") && card.contains("## Plan\n\nhalf"));
        assert!(
            card.contains("`../source` relative to this directory"),
            "{card}"
        );
        assert_eq!(
            std::fs::read_to_string(first.join(SOURCE_CARD_FILE)).unwrap(),
            original
        );
        // Stage 2 copies stage 1's files: its card is replaced, the
        // original stays the source card.
        let second = work.path().join("second");
        std::fs::create_dir_all(&second).unwrap();
        for f in [CARD_FILE, SOURCE_CARD_FILE] {
            std::fs::copy(first.join(f), second.join(f)).unwrap();
        }
        ModelCard::new("Exported")
            .write(&second, &first, &second)
            .unwrap();
        let card = std::fs::read_to_string(second.join(CARD_FILE)).unwrap();
        assert!(card.contains("# Exported") && !card.contains("# Pruned"));
        assert!(card.contains("license: mit"));
        assert_eq!(
            std::fs::read_to_string(second.join(SOURCE_CARD_FILE)).unwrap(),
            original
        );
    }
}
