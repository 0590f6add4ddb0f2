//! Fused CPU kernels for inference: the steps where candle's composed
//! operations spend more time allocating, copying and in scalar maths than in
//! arithmetic (see RESULTS.md, "Where a forward pass spends its time"). Each
//! computes what the composed form computes; the models fall back to the
//! composed form when a gradient is needed.

pub mod activation;
pub mod attention;
pub mod exp;
pub mod linear;
pub mod softmax;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Whether a kernel may take `t`: on the CPU, f32, and needing no gradient.
pub(crate) fn plain(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// The values of a contiguous CPU f32 tensor whose storage is `storage`.
pub(crate) fn f32_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("kernel: expected a contiguous CPU f32 tensor"),
    }
}
