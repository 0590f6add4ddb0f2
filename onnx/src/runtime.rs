//! Finding and loading the ONNX Runtime shared library (`ort` with
//! `load-dynamic`): effir does not link ONNX Runtime, so the same binary
//! runs with the CPU library of the `onnxruntime` wheel or the GPU library
//! of `onnxruntime-gpu`.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::{Error, Result};

/// Environment variable naming the library file (`ort`'s own convention).
pub const LIBRARY_VARIABLE: &str = "ORT_DYLIB_PATH";

/// How to get the library, for error messages.
pub const INSTALL_HINT: &str = "install it with `scripts/install-onnxruntime.sh` (CPU library from the \
    `onnxruntime` PyPI wheel), or set ORT_DYLIB_PATH to a libonnxruntime.so (for GPUs, the one in the \
    `onnxruntime-gpu` wheel: site-packages/onnxruntime/capi/)";

/// Where `scripts/install-onnxruntime.sh` puts the library:
/// `$XDG_DATA_HOME/effir/onnxruntime/libonnxruntime.so` (default
/// `~/.local/share/...`).
pub fn default_library_path() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("effir/onnxruntime/libonnxruntime.so"))
}

/// The library to load: `ORT_DYLIB_PATH` if set, else the default path.
pub fn library_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(LIBRARY_VARIABLE) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::RuntimeLibrary(format!(
                "{LIBRARY_VARIABLE}={} does not exist; {INSTALL_HINT}",
                path.display()
            )));
        }
        return Ok(path);
    }
    match default_library_path() {
        Some(path) if path.is_file() => Ok(path),
        Some(path) => Err(Error::RuntimeLibrary(format!(
            "not found ({LIBRARY_VARIABLE} is not set and {} does not exist); {INSTALL_HINT}",
            path.display()
        ))),
        None => Err(Error::RuntimeLibrary(format!(
            "{LIBRARY_VARIABLE} is not set and there is no home directory; {INSTALL_HINT}"
        ))),
    }
}

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static Environment> {
    let loaded = ENVIRONMENT.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        tracing::info!(library = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(&path).map_err(|e| {
            format!(
                "ONNX Runtime library: cannot load {}: {e}; {INSTALL_HINT}",
                path.display()
            )
        })?;
        builder
            .with_name("effir")
            .build()
            .map_err(|e| format!("ONNX Runtime library {}: {e}", path.display()))
    });
    match loaded {
        Ok(env) => Ok(env),
        Err(message) => Err(Error::RuntimeLibrary(
            message
                .trim_start_matches("ONNX Runtime library: ")
                .to_string(),
        )),
    }
}
