//! copyhold inference node: loads Llama-family checkpoints, runs them on a
//! paged-KV, continuously batched engine, serves an OpenAI-compatible API
//! and reports the energy of every request.
//!
//! `unsafe` is denied crate-wide and allowed in a few places, each with its
//! reason: memory-mapping weight files (`weights`), the SIMD intrinsics of
//! the fused matmul kernel (`matmul::kernel`), the AMX tile
//! instructions (`matmul::amx`), and the CUDA driver/NVRTC/cuBLAS calls (`cuda::nvrtc`,
//! `cuda::backend`).
#![deny(unsafe_code)]

pub mod api;
pub mod attention;
pub mod bench;
pub mod chat;
pub mod config;
pub mod constrained;
pub mod cuda;
pub mod detok;
pub mod engine;
pub mod error;
pub mod golden;
pub mod http_body;
pub mod kv_cache;
pub mod layers;
pub mod matmul;
pub mod metrics;
pub mod models;
pub mod power;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod synth;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use error::{Error, Result};
