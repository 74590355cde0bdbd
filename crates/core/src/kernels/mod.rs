//! The CPU kernels, in one place (and with them every `unsafe` block of the crate but the
//! memory maps of `io`/`gguf`): what the models call when tensors are f32/f64 on the CPU.
//!
//! - [`simd`]: run-time CPU-feature dispatch (`dispatch` runs a closure compiled a second time
//!   with AVX2 + FMA), the vector primitives (`exp_f32`, sums, bf16), the AVX2 decode-attention
//!   and packed-projection kernels for serving, and `PackedWeight`.
//! - [`gemm`]: the one bounds-checked wrapper over the `gemm` crate.
//! - [`ops`]: fused ops with hand-written backward passes for training (linear, attention,
//!   LayerNorm, RMSNorm, softmax, GELU/SiLU, masked cross-entropy).
//! - [`threads`]: the thread policy (`in_pool`, `on_one_thread`, `may_spread`).
//! - [`attention`]: the serving attention over per-sequence KV caches (`packed_attention`).
//! - [`quant`]: quantized (GGUF) matrix products and the weight arena.
//!
//! Dependencies inside point one way: `ops`, `attention` and `quant` use `simd`, `gemm` and
//! `threads`, which use nothing else in the crate.

pub mod attention;
pub mod gemm;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod threads;
