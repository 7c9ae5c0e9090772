//! copyhold inference node: loads Llama-family checkpoints, runs them on a
//! paged-KV, continuously batched engine, serves an OpenAI-compatible API
//! and reports the energy of every request.
//!
//! The folders follow the layers (docs/architecture.md):
//! - `model`: config, weights, tokenizer, the architectures' description;
//!   below everything that computes;
//! - `engine`: the loop, scheduler, paged KV bookkeeping, sampling, and the
//!   `Backend` trait it calls, which names no device;
//! - `cpu` and `cuda`: the two backends, side by side, each implementing
//!   the trait; neither imports the other;
//! - `api`: the HTTP server, OpenAI types and chat templates;
//! - `load`: the one constructor that picks a backend.
//!
//! `unsafe` is denied crate-wide and allowed in a few places, each with its
//! reason: memory-mapping weight files (`model::weights`), the SIMD
//! intrinsics of the fused matmul kernel (`cpu::matmul::kernel`), the AMX
//! tile instructions (`cpu::matmul::amx`), and the CUDA driver/NVRTC/cuBLAS
//! calls (`cuda::nvrtc`, `cuda::backend`).
#![deny(unsafe_code)]

pub mod api;
pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod golden;
pub mod load;
pub mod metrics;
pub mod model;
pub mod power;
pub mod synth;

pub use error::{Error, Result};
