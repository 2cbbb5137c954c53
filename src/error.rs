//! The one error type of the engine. Every message names what is wrong: the file, the tensor,
//! the shape, the coordinate.

use std::path::PathBuf;

/// Errors of every layer of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model bundle that is malformed or does not match its own plans and config.
    #[error("bundle {origin}: {message}")]
    Bundle { origin: String, message: String },
    /// nnU-Net plans, dataset.json or the TIS config describe something the engine cannot build.
    #[error("plans: {0}")]
    Plans(String),
    /// Inputs of the wrong shape reaching the model or a backend op.
    #[error("shape: {0}")]
    Shape(String),
    /// A click that cannot be used (outside the grid, unknown class).
    #[error("click: {0}")]
    Click(String),
    /// An image file that cannot be read or written as the engine needs it.
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    /// A backend that cannot run (no GPU, no driver, out of memory).
    #[error("backend {backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    /// A request that does not fit the state of a session (nothing to undo, no refinement head).
    #[error("session: {0}")]
    Session(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// A byte count for messages: "3.2 GiB", "120.5 MiB".
pub fn bytes_in_words(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}
