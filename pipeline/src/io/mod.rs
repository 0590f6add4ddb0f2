//! Files on disk: atomic writes, JSON, npy, text input, safetensors weights,
//! copying a model directory's files and the paths records hold.

pub mod atomic_file;
pub mod input_limits;
pub mod json_file;
pub mod model_card;
pub mod model_files;
pub mod npy;
pub mod recorded_path;
pub mod safetensors_shards;
pub mod text_input;
pub mod transformers_loading;
pub mod weight_store;
pub mod weights;
pub mod yaml_file;
