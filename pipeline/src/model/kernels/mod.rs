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
