//! Fused CPU kernels: the steps where candle's composed operations spend
//! more time allocating, copying and in scalar maths than in arithmetic (see
//! RESULTS.md, "Where a forward pass spends its time"). Each computes what
//! the composed form computes. Attention, the norms, the activations,
//! rotary embeddings and the linear layers are candle custom ops with
//! hand-written backward passes, so training runs them too. On other devices
//! and dtypes the models use the composed forms.

pub mod activation;
pub mod attention;
pub mod exp;
pub mod linear;
pub mod norm;
pub mod rotary;
pub mod softmax;
#[cfg(test)]
pub(crate) mod test_support;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Whether a kernel may take `t`: on the CPU, f32 (tracked for gradients or not).
pub(crate) fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The values of a contiguous CPU f32 tensor whose storage is `storage`.
pub(crate) fn f32_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(storage) => cpu_f32_values(storage, layout),
        _ => candle_core::bail!("kernel: expected a CPU tensor"),
    }
}

/// The values of a contiguous f32 CPU storage (a custom op's argument).
pub(crate) fn cpu_f32_values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("kernel: expected a contiguous CPU f32 tensor"),
    }
}

/// `f(values)` of a contiguous CPU f32 tensor.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(f32_values(&storage, layout)?)
}
