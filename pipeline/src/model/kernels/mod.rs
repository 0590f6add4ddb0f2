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

/// A matrix in memory: its first element and its (row, column) strides.
pub(crate) type Strided<P> = (P, usize, usize);

/// Whether a matrix product runs on one thread (inside a parallel task) or
/// on all of rayon's threads when it is large enough to pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    One,
    All,
}

/// `dst (m, n) = [dst +] scale · lhs (m, k) · rhs (k, n)` on the `gemm`
/// crate (candle's own matrix kernels), each matrix given by its start and
/// its strides, so transposed and head-strided operands are read in place.
/// (`gemm` calls the factor of `dst` alpha and that of the product beta.)
///
/// # Safety
/// Every stride and size must stay inside the buffers behind the pointers.
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    threads: Threads,
) {
    let available = rayon::current_num_threads();
    let parallelism = if threads == Threads::All && available > 1 && m * n * k > 1 << 16 {
        gemm::Parallelism::Rayon(available)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

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
