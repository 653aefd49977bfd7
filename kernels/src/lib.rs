//! # lorad-kernels
//!
//! Fused CPU kernels for the LoRA training step, as candle `CustomOp`s with their own backward. Each
//! public function computes exactly what a composition of plain candle ops computes (the tests compare
//! values and gradients to 1e-5), but in fewer passes over memory and with fewer saved temporaries:
//!
//! - [`ce`]: LM head + cross-entropy over the vocabulary in row chunks: never holds all logits, and
//!   its backward never computes a gradient for the frozen head.
//! - [`norm`]: RMSNorm with a frozen weight.
//! - [`swiglu`]: `silu(gate) * up`.
//! - [`rope`]: rotary embeddings (non-interleaved halves, as transformers' Llama).
//! - [`attention`]: causal (optionally sliding-window) attention with grouped KV heads that never
//!   materialises the full score matrix for backward.
//!
//! On devices other than the CPU each function falls back to the composition of candle ops, so the
//! CUDA build (candle's CUDA backend) trains the same math.
#![deny(clippy::unwrap_used)]

pub mod attention;
pub mod ce;
mod cpu;
pub mod frozen;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod swiglu;
pub mod swiglu_linear;
#[cfg(test)]
mod testing;
