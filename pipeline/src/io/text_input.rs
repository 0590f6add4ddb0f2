//! Reading texts to embed: JSONL (`{"text": ...}` per line) or plain lines.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// How an input file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// One JSON object per line with a string field `text`; blank lines are skipped.
    Jsonl,
    /// One text per line (an empty line is an empty text).
    Lines,
}

impl InputFormat {
    /// `.jsonl` / `.json` / `.ndjson` files (optionally `.gz`) are JSONL,
    /// anything else plain lines.
    pub fn from_extension(path: &Path) -> Self {
        let name = path.to_string_lossy();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json" | "ndjson") => Self::Jsonl,
            _ => Self::Lines,
        }
    }
}

#[derive(Deserialize)]
struct TextRecord {
    text: String,
}

/// Reads the texts of `path`. Invalid UTF-8, malformed JSON and a missing
/// `text` field are errors naming the line; a file with no text is an error.
pub fn read_texts(path: &Path, format: InputFormat) -> Result<Vec<String>> {
    let bytes = read_maybe_gzip(path)?;
    let mut texts = Vec::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if !bytes.is_empty() {
        for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                line: line_no,
                message: format!("not valid UTF-8 ({e})"),
            })?;
            match format {
                InputFormat::Lines => texts.push(line.to_string()),
                InputFormat::Jsonl => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let record: TextRecord =
                        serde_json::from_str(line).map_err(|e| Error::Input {
                            path: path.to_path_buf(),
                            line: line_no,
                            message: format!("expected a JSON object with a string `text`: {e}"),
                        })?;
                    texts.push(record.text);
                }
            }
        }
    }
    if texts.is_empty() {
        return Err(Error::EmptyInput {
            path: path.to_path_buf(),
            message: "no text to embed".into(),
        });
    }
    Ok(texts)
}

/// The bytes of `path`, decompressed when its name ends in `.gz`. More
/// than the input limit ([`crate::io::input_limits`]) after decompression
/// (a gzip bomb) is refused before it is held in memory.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn std::io::Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let limit = crate::io::input_limits::limits().max_input_bytes;
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Input {
            path: path.to_path_buf(),
            line: 0,
            message: format!(
                "more than {} of data (raise the limit with --max-input-gb)",
                crate::io::input_limits::megabytes(limit)
            ),
        });
    }
    check_line_lengths(path, &bytes)?;
    Ok(bytes)
}

/// Refuses a line longer than the line limit, naming it.
fn check_line_lengths(path: &Path, bytes: &[u8]) -> Result<()> {
    let limit = crate::io::input_limits::limits().max_line_bytes;
    if bytes.len() <= limit {
        return Ok(());
    }
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.len() > limit {
            return Err(Error::Input {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!(
                    "a line of {} bytes, over the {} limit (raise it with --max-line-mb)",
                    line.len(),
                    crate::io::input_limits::megabytes(limit as u64)
                ),
            });
        }
    }
    Ok(())
}
