//! Files on disk: atomic writes, JSON, npy, text input, safetensors weights
//! and copying a model directory's files.

pub mod atomic_file;
pub mod json_file;
pub mod model_files;
pub mod npy;
pub mod text_input;
pub mod weights;
