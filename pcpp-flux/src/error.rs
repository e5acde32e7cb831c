//! The error type of pcpp-flux: each variant names the file, tensor, key or input at fault.

use std::path::PathBuf;

use pcpp_kernels::KernelError;
use pcpp_sdxl::SdxlError;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, FluxError>;

/// Errors from loading or running a Flux component.
#[derive(Debug, thiserror::Error)]
pub enum FluxError {
    /// A config file is missing, not JSON, or holds a value we cannot use.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A model folder or file is missing or unreadable.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A tokenizer could not be loaded or could not encode a prompt.
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Invalid inputs to a forward pass or a generation (shapes, sizes, settings).
    #[error("{0}")]
    Input(String),
    /// A tensor op failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A shared component (weights, CLIP, VAE) failed.
    #[error(transparent)]
    Sdxl(#[from] SdxlError),
}

impl FluxError {
    /// A config error for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FluxError::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
