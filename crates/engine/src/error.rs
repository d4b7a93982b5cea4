//! The engine's one error type. Every variant names what is at fault (a file, a tensor,
//! a config field) so that a front end can print it as one line.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- files and parsing -------------------------------------------------------------
    // The underlying errors are part of the message, not `#[source]`s, so that a report of
    // the error chain prints them once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid JSON: {error}")]
    Json { path: PathBuf, error: serde_json::Error },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    // --- configuration ---------------------------------------------------------------
    #[error("{path}: field `{field}` is missing")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: field `{field}` is invalid: {message}")]
    InvalidField {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: unsupported model_type `{model_type}` (supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_next)")]
    UnknownModelType { path: PathBuf, model_type: String },

    // --- tensors -----------------------------------------------------------------------
    #[error("tensor `{name}` not found in the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` ({file}): expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` ({file}): unsupported dtype {dtype} ({message})")]
    TensorDtype {
        name: String,
        file: PathBuf,
        dtype: String,
        message: String,
    },
    #[error("tensor `{name}`: unsupported quantization: {message}")]
    Quantization { name: String, message: String },

    // --- inputs ------------------------------------------------------------------------
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("the prompt has {tokens} tokens and the context holds {limit}")]
    ContextLength { tokens: usize, limit: usize },

    // --- devices ---------------------------------------------------------------------
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("no room on the GPU for {what} ({} MiB), even with the expert cache emptied", bytes.div_ceil(1 << 20))]
    OutOfDeviceMemory { what: String, bytes: u64 },

    // --- experts -----------------------------------------------------------------------
    #[error("layer {layer}, expert {expert}: {error}")]
    Expert {
        layer: usize,
        expert: usize,
        error: Box<Error>,
    },
}

/// Shorthand used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}
