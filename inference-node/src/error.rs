//! One error enum for the node; every variant names the file (and tensor)
//! at fault so an operator can fix the model directory without a debugger.

use std::path::PathBuf;

/// Errors raised while loading a model or serving it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: unsupported architecture {arch:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: not a valid safetensors file (truncated or corrupt): {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: tensor {tensor:?} is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: tensor {tensor:?} has dtype {found}, expected one of F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K"
    )]
    TensorDtype {
        path: PathBuf,
        tensor: String,
        found: String,
    },
    #[error("{path}: invalid tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("golden check: {0}")]
    Golden(String),
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}

/// Crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Error::Config { .. } => "config",
            Error::Safetensors { .. } => "safetensors",
            Error::Gguf { .. } => "gguf",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::TensorShape { .. } => "tensor_shape",
            Error::TensorDtype { .. } => "tensor_dtype",
            Error::Tokenizer { .. } => "tokenizer",
            Error::Template(_) => "template",
            Error::Unsupported(_) => "unsupported",
            Error::Golden(_) => "golden",
            Error::Cuda(e) => e.metric_label(),
        }
    }
}

/// Reads a file, mapping the error to one that names it.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses a JSON file, naming it on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
