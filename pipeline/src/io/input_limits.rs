//! Limits on what effir reads from files that come from elsewhere, so that
//! a hostile or broken input is refused with a message instead of taking
//! the machine's memory: the longest line of a text or JSONL file, the
//! largest (decompressed) data file, the largest `tokenizer.json`. The
//! defaults are far above real data (a SciFact abstract is ~2 KB, MS MARCO's
//! passage corpus ~3 GB, Gemma 3's 262k-token tokenizer.json 33 MB, so a 10-million-token vocabulary, 150 MB or more, is over the tokenizer limit); the
//! CLI's `--max-line-mb`, `--max-input-gb` and `--max-tokenizer-mb` raise
//! them for the whole process ([`set`]).

use std::sync::OnceLock;

/// Process-wide input limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// The longest line of a corpus, queries, qrels or text file.
    pub max_line_bytes: usize,
    /// The largest data file, after decompression.
    pub max_input_bytes: u64,
    /// The largest `tokenizer.json` (its vocabulary is held in memory
    /// several times over while it is parsed).
    pub max_tokenizer_bytes: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_line_bytes: 16 << 20,
            max_input_bytes: 16 << 30,
            max_tokenizer_bytes: 128 << 20,
        }
    }
}

static LIMITS: OnceLock<InputLimits> = OnceLock::new();

/// Sets the limits for this process; the first call wins (the CLI calls it
/// once, before any file is read).
pub fn set(limits: InputLimits) {
    let _ = LIMITS.set(limits);
}

/// The limits in force.
pub fn limits() -> InputLimits {
    LIMITS.get().copied().unwrap_or_default()
}

/// `n` bytes in the unit a message names, for the flag that raises it.
pub fn megabytes(n: u64) -> String {
    format!("{:.0} MB", n as f64 / (1u64 << 20) as f64)
}
