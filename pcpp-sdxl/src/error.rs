//! The error type of pcpp-sdxl: each variant names the file, tensor or key at fault.

use std::path::PathBuf;

use pcpp_core::CoreError;
use pcpp_kernels::KernelError;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SdxlError>;

/// Errors from loading or running an SDXL component.
#[derive(Debug, thiserror::Error)]
pub enum SdxlError {
    /// A config file is missing, not JSON, or holds a value we cannot use.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weight is missing, unexpected or mis-shaped.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Weight {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A model folder or file is missing or unreadable.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// Invalid inputs to a forward pass (shapes, sizes).
    #[error("{0}")]
    Input(String),
    /// A tensor op failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A parallel layer failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A stage produced NaN or infinite values (fp16 overflow, broken weights).
    #[error("non-finite values (NaN or infinity) in {stage}{at}{hint}")]
    NonFinite {
        /// What held them (`the prompt embeddings`, `the latents`, `the decoded image`).
        stage: String,
        /// Where, e.g. ` after denoising step 3 of 50` (may be empty).
        at: String,
        /// What to try, starting with `; ` (may be empty).
        hint: String,
    },
}

impl SdxlError {
    /// A config error for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        SdxlError::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
