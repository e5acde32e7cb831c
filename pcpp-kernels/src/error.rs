//! Errors of the tensor layer: every variant names the op and the shapes involved, and file errors
//! name the file and the tensor.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// An error raised by a tensor op or by tensor I/O.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Operand shapes do not fit the op.
    #[error("{op}: incompatible shapes {lhs:?} and {rhs:?}{detail}")]
    Shape {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
        detail: String,
    },
    /// An argument is out of range (axis, slice bounds, group count, ...).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// The requested device is not available in this build or on this machine.
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed or holds a tensor we cannot use.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

impl KernelError {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Invalid {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn shape(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Self {
        KernelError::Shape {
            op,
            lhs: lhs.to_vec(),
            rhs: rhs.to_vec(),
            detail: String::new(),
        }
    }
}
