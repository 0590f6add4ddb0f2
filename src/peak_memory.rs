//! The process's peak resident memory, which the stages that can stream
//! print when they finish (`make scale-7b` and the memory tests read it).

/// `VmHWM` of `/proc/self/status` in bytes (Linux); `None` elsewhere.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Prints `STAGE: peak resident memory N bytes (X GB)` to stderr.
pub fn report(stage: &str) {
    if let Some(bytes) = peak_resident_bytes() {
        eprintln!(
            "{stage}: peak resident memory {bytes} bytes ({:.2} GB)",
            bytes as f64 / 1e9
        );
    }
}
