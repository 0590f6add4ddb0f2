//! The progress bar every long-running command shows on stderr.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps drawn with `template` (indicatif syntax), or a
/// hidden one when `quiet`.
pub fn progress_bar(quiet: bool, len: u64, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("valid progress template"));
    bar
}

/// `{msg} {pos}/{len}` with elapsed time and estimate.
pub const PHASE_TEMPLATE: &str = "{spinner} {msg} {pos}/{len} [{elapsed_precise}<{eta_precise}]";
