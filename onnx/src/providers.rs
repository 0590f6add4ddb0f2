//! ONNX Runtime execution providers: an ordered preference (`tensorrt`,
//! `cuda`, `cpu`) with fallback to the next, or a strict mode that fails
//! when a requested provider cannot be registered; TensorRT and CUDA options.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use ort::ep::{ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::SessionBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[serde(rename = "tensorrt")]
    TensorRt,
    Cuda,
    Cpu,
}

impl Provider {
    pub const NAMES: &'static str = "tensorrt, cuda, cpu";

    pub fn name(self) -> &'static str {
        match self {
            Self::TensorRt => "tensorrt",
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        }
    }

    /// Whether the loaded ONNX Runtime library was built with the provider.
    pub fn is_available(self) -> Result<bool> {
        crate::runtime::environment()?;
        let available = match self {
            Self::TensorRt => ort::ep::TensorRT::is_available(),
            Self::Cuda => ort::ep::CUDA::is_available(),
            Self::Cpu => Ok(true),
        };
        available.map_err(|e| Error::runtime("listing execution providers", e))
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            "cuda" => Ok(Self::Cuda),
            "cpu" => Ok(Self::Cpu),
            other => Err(Error::Provider(format!(
                "unknown execution provider `{other}`; expected one of {}",
                Self::NAMES
            ))),
        }
    }
}

/// Parses a comma-separated preference list such as `tensorrt,cuda,cpu`.
pub fn parse_order(list: &str) -> Result<Vec<Provider>> {
    let order: Vec<Provider> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Provider::from_str)
        .collect::<Result<_>>()?;
    if order.is_empty() {
        return Err(Error::Provider(format!(
            "empty execution provider list; expected some of {}",
            Provider::NAMES
        )));
    }
    for (i, p) in order.iter().enumerate() {
        if order[..i].contains(p) {
            return Err(Error::Provider(format!("`{p}` is listed twice")));
        }
    }
    Ok(order)
}

/// TensorRT options. Shape profiles are derived from the largest batch and
/// sequence length the engine must take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TensorRtOptions {
    pub device_id: i32,
    pub fp16: bool,
    /// Built engines are cached here (building takes minutes).
    pub engine_cache_dir: Option<PathBuf>,
    pub max_batch: usize,
    pub max_length: usize,
    /// The shape TensorRT optimises for (default: the maximum batch at half
    /// the maximum length).
    pub opt_batch: Option<usize>,
    pub opt_length: Option<usize>,
    pub max_workspace_bytes: Option<usize>,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        Self {
            device_id: 0,
            fp16: false,
            engine_cache_dir: None,
            max_batch: 32,
            max_length: 512,
            opt_batch: None,
            opt_length: None,
            max_workspace_bytes: None,
        }
    }
}

/// `trt_profile_{min,opt,max}_shapes` values for the graph's 2-D token
/// inputs, e.g. `input_ids:1x1,attention_mask:1x1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeProfiles {
    pub min: String,
    pub opt: String,
    pub max: String,
}

impl TensorRtOptions {
    pub fn shape_profiles(&self, inputs: &[String]) -> Result<ShapeProfiles> {
        if self.max_batch == 0 || self.max_length == 0 {
            return Err(Error::Provider(
                "tensorrt max_batch and max_length must be at least 1".into(),
            ));
        }
        let opt_batch = self.opt_batch.unwrap_or(self.max_batch);
        let opt_length = self.opt_length.unwrap_or(self.max_length.div_ceil(2));
        if opt_batch > self.max_batch
            || opt_length > self.max_length
            || opt_batch == 0
            || opt_length == 0
        {
            return Err(Error::Provider(format!(
                "tensorrt optimisation shape {opt_batch}x{opt_length} is outside 1x1..{}x{}",
                self.max_batch, self.max_length
            )));
        }
        let profile = |b: usize, t: usize| {
            inputs
                .iter()
                .map(|name| format!("{name}:{b}x{t}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        Ok(ShapeProfiles {
            min: profile(1, 1),
            opt: profile(opt_batch, opt_length),
            max: profile(self.max_batch, self.max_length),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaOptions {
    pub device_id: i32,
    /// Bytes the CUDA arena may grow to.
    pub memory_limit: Option<usize>,
    /// TF32 matmuls on Ampere and later (faster, ~1e-3 relative error).
    pub tf32: bool,
}

/// Whether ONNX Runtime optimizes the graph when it opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphOptimization {
    /// Every optimization (ONNX Runtime's default): fusions, and constant
    /// folding, which turns half-precision weights and their casts into
    /// float32 weights on the CPU.
    #[default]
    All,
    /// The graph runs as stored: half-precision weights stay half precision
    /// in memory and are cast one product at a time (effir's graphs order
    /// the casts for that), at the cost of the fusions.
    None,
}

impl std::str::FromStr for GraphOptimization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "none" => Ok(Self::None),
            other => Err(format!("`{other}`: expected all or none")),
        }
    }
}

/// Which providers to try, in order, and how strictly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    pub order: Vec<Provider>,
    pub graph_optimization: GraphOptimization,
    /// Fail when any requested provider cannot be registered, instead of
    /// falling back to the next.
    pub strict: bool,
    pub tensorrt: TensorRtOptions,
    pub cuda: CudaOptions,
    /// Intra-op threads (0: ONNX Runtime's default, one per core).
    pub threads: usize,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            order: vec![Provider::Cpu],
            graph_optimization: GraphOptimization::All,
            strict: false,
            tensorrt: TensorRtOptions::default(),
            cuda: CudaOptions::default(),
            threads: 0,
        }
    }
}

/// The providers to register, given which ones the runtime has: requested
/// ones that are available, in order, then CPU (ONNX Runtime's own last
/// resort). In strict mode a missing provider is an error.
pub fn select(
    order: &[Provider],
    strict: bool,
    is_available: &dyn Fn(Provider) -> Result<bool>,
) -> Result<Vec<Provider>> {
    let mut chosen = Vec::new();
    for &provider in order {
        if is_available(provider)? {
            chosen.push(provider);
        } else if strict {
            return Err(Error::Provider(format!(
                "`{provider}` was requested in strict mode but this ONNX Runtime library does not \
                 provide it; point ORT_DYLIB_PATH at an onnxruntime-gpu library with CUDA, cuDNN \
                 and (for tensorrt) TensorRT installed, or drop strict mode to fall back"
            )));
        } else {
            tracing::warn!(%provider, "execution provider not available; falling back to the next");
        }
    }
    if !chosen.contains(&Provider::Cpu) {
        chosen.push(Provider::Cpu);
    }
    Ok(chosen)
}

fn dispatch(
    provider: Provider,
    settings: &ProviderSettings,
    inputs: &[String],
) -> Result<ExecutionProviderDispatch> {
    Ok(match provider {
        Provider::TensorRt => {
            let t = &settings.tensorrt;
            let shapes = t.shape_profiles(inputs)?;
            let mut ep = ort::ep::TensorRT::default()
                .with_device_id(t.device_id)
                .with_fp16(t.fp16)
                .with_profile_min_shapes(shapes.min)
                .with_profile_opt_shapes(shapes.opt)
                .with_profile_max_shapes(shapes.max);
            if let Some(dir) = &t.engine_cache_dir {
                ep = ep
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            if let Some(bytes) = t.max_workspace_bytes {
                ep = ep.with_max_workspace_size(bytes);
            }
            ep.build()
        }
        Provider::Cuda => {
            let c = &settings.cuda;
            let mut ep = ort::ep::CUDA::default()
                .with_device_id(c.device_id)
                .with_tf32(c.tf32);
            if let Some(limit) = c.memory_limit {
                ep = ep.with_memory_limit(limit);
            }
            ep.build()
        }
        // With its arena, as ONNX Runtime's own default (Python's, Triton's)
        // has it; the `ort` crate's default leaves it out, which cost memory
        // here (RESULTS.md, the 3B validation).
        Provider::Cpu => ort::ep::CPU::default().with_arena_allocator(true).build(),
    }
    .error_on_failure())
}

/// Registers the providers [`select`] chooses on `builder`, each with its
/// options; a provider that is available but fails to register (missing
/// CUDA libraries, say) falls back too, or fails in strict mode. Returns
/// the builder and the providers registered, in order.
pub fn register(
    mut builder: SessionBuilder,
    settings: &ProviderSettings,
    inputs: &[String],
) -> Result<(SessionBuilder, Vec<Provider>)> {
    let chosen = select(&settings.order, settings.strict, &|p| p.is_available())?;
    let mut registered = Vec::new();
    for provider in chosen {
        let ep = dispatch(provider, settings, inputs)?;
        match builder.with_execution_providers([ep]) {
            Ok(b) => {
                builder = b;
                registered.push(provider);
            }
            Err(error) => {
                let message = error.to_string();
                if settings.strict || provider == Provider::Cpu {
                    return Err(Error::Provider(format!(
                        "`{provider}` could not be registered: {message}"
                    )));
                }
                tracing::warn!(%provider, error = %message, "execution provider failed to register; falling back");
                builder = error.recover();
            }
        }
    }
    Ok((builder, registered))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_cpu(p: Provider) -> Result<bool> {
        Ok(p == Provider::Cpu)
    }

    fn all(_: Provider) -> Result<bool> {
        Ok(true)
    }

    #[test]
    fn provider_lists_parse_in_order_and_reject_unknown_names() {
        assert_eq!(
            parse_order("tensorrt, cuda,cpu").unwrap(),
            vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        let err = parse_order("cuda,tpu").unwrap_err().to_string();
        assert!(err.contains("unknown execution provider `tpu`"), "{err}");
        assert!(err.contains("tensorrt, cuda, cpu"), "{err}");
        assert!(parse_order("cuda,cuda").is_err());
        assert!(parse_order(" , ").is_err());
    }

    #[test]
    fn unavailable_providers_fall_back_to_the_next_and_cpu_comes_last() {
        let order = [Provider::TensorRt, Provider::Cuda];
        assert_eq!(
            select(&order, false, &only_cpu).unwrap(),
            vec![Provider::Cpu]
        );
        assert_eq!(
            select(&order, false, &all).unwrap(),
            vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        let cuda_only = |p: Provider| Ok(p != Provider::TensorRt);
        assert_eq!(
            select(&order, false, &cuda_only).unwrap(),
            vec![Provider::Cuda, Provider::Cpu]
        );
    }

    #[test]
    fn strict_mode_fails_naming_the_missing_provider() {
        let err = select(&[Provider::Cuda, Provider::Cpu], true, &only_cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`cuda` was requested in strict mode"), "{err}");
        assert!(err.contains("onnxruntime-gpu"), "{err}");
        assert_eq!(
            select(&[Provider::Cpu], true, &only_cpu).unwrap(),
            vec![Provider::Cpu]
        );
    }

    #[test]
    fn tensorrt_shape_profiles_span_one_token_to_the_maximum() {
        let options = TensorRtOptions {
            max_batch: 32,
            max_length: 256,
            ..Default::default()
        };
        let inputs = ["input_ids".to_string(), "attention_mask".to_string()];
        let shapes = options.shape_profiles(&inputs).unwrap();
        assert_eq!(shapes.min, "input_ids:1x1,attention_mask:1x1");
        assert_eq!(shapes.opt, "input_ids:32x128,attention_mask:32x128");
        assert_eq!(shapes.max, "input_ids:32x256,attention_mask:32x256");
        let bad = TensorRtOptions {
            opt_batch: Some(64),
            ..options
        };
        assert!(bad.shape_profiles(&inputs).is_err());
    }
}
