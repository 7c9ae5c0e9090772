//! The CUDA backend: our own kernels (`inference-node/kernels/*.cu`),
//! compiled by NVRTC at start for the device's exact architecture, with
//! cuBLAS for batched GEMMs. Everything CUDA (driver, NVRTC, cuBLAS, NVML)
//! is loaded at run time, so the binary builds and runs without it.
//!
//! - [`nvrtc`]: compiling, the CUBIN cache.
//! - [`kernels`]: the programs and their entry points.
//! - [`check`]: `cuda-check`, every kernel for every architecture, no GPU.
//! - [`convert`]: weights in the device dtype without an f32 copy on the host.
//! - [`libs`]: finding the CUDA libraries and headers; the GPUs NVML reads.
//! - [`plan`]: pure decisions: per-architecture paths, layer split across
//!   GPUs, KV pool size.
//! - [`scratch`]: per-step buffers kept between steps.
//! - [`graph_plan`]: which decode steps replay a captured CUDA graph, and
//!   their padded layout.
//! - [`backend`]: the forward pass on the GPU.
//!
//! See `docs/cuda.md`.

pub mod backend;
pub mod check;
pub mod convert;
pub mod graph_plan;
pub mod kernels;
pub mod libs;
pub mod nvrtc;
pub mod plan;
pub mod scratch;

/// Errors of the CUDA backend; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("--device cuda: {lib} was not found ({hint})")]
    LibraryMissing { lib: &'static str, hint: String },
    #[error(
        "--device cuda: the NVIDIA driver supports CUDA {found}; copyhold's kernels need CUDA {need} or newer (update the driver)"
    )]
    DriverTooOld { found: String, need: String },
    #[error(
        "--device cuda: the driver sees no CUDA device (check CUDA_VISIBLE_DEVICES and the device plugin)"
    )]
    NoDevice,
    #[error("CUDA driver: {what}: {message}")]
    Driver { what: String, message: String },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error(
        "cuda_fp16.h not found (NVRTC needs the CUDA headers: pip install nvidia-cuda-runtime-cu12 and pass its nvidia/cuda_runtime/include with --cuda-include or COPYHOLD_CUDA_INCLUDE); searched: {searched:?}"
    )]
    HeadersMissing { searched: Vec<std::path::PathBuf> },
    #[error("kernel program {program}.cu does not compile for sm_{arch}:\n{log}")]
    CompileFailed {
        program: String,
        arch: u32,
        log: String,
    },
    #[error(
        "out of GPU memory {what}: needs {needed} bytes ({needed_mib} MiB), {free} bytes ({free_mib} MiB) free",
        needed_mib = needed >> 20,
        free_mib = free >> 20
    )]
    OutOfMemory {
        what: String,
        needed: u64,
        free: u64,
    },
    #[error("cuBLAS: {what}: {message}")]
    Cublas { what: String, message: String },
    #[error("--device cuda: {0}")]
    Unsupported(String),
}

impl CudaError {
    pub(crate) fn driver(what: impl Into<String>, e: cudarc::driver::DriverError) -> CudaError {
        CudaError::Driver {
            what: what.into(),
            message: e.to_string(),
        }
    }

    /// Whether the device is unusable after this error (the context is
    /// poisoned: an illegal address, a launch failure). Out of memory and
    /// configuration errors are not.
    pub fn is_fatal(&self) -> bool {
        match self {
            CudaError::Driver { message, .. } => !message.contains("OUT_OF_MEMORY"),
            CudaError::Cublas { message, .. } => !message.contains("ALLOC_FAILED"),
            _ => false,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaError::LibraryMissing { .. } => "library_missing",
            CudaError::DriverTooOld { .. } => "driver_too_old",
            CudaError::NoDevice => "no_device",
            CudaError::Driver { .. } => "driver",
            CudaError::Nvrtc(_) => "nvrtc",
            CudaError::HeadersMissing { .. } => "headers_missing",
            CudaError::CompileFailed { .. } => "compile_failed",
            CudaError::OutOfMemory { .. } => "out_of_memory",
            CudaError::Cublas { .. } => "cublas",
            CudaError::Unsupported(_) => "unsupported",
        }
    }
}
