//! The CLI's error type: every failure carries what went wrong and where.

use moe_router::npy::NpyError;
use moe_router::{ConfigError, RouteError};

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A config could not be built or imported.
    #[error("{context}: {source}")]
    Config {
        /// Which input.
        context: String,
        /// The cause.
        source: ConfigError,
    },
    /// Routing failed.
    #[error("routing failed: {0}")]
    Route(#[from] RouteError),
    /// A `.npy` input or output failed.
    #[error("{context}: {source}")]
    Npy {
        /// Which file.
        context: String,
        /// The cause.
        source: NpyError,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The path.
        path: String,
        /// The OS message.
        message: String,
    },
    /// Inputs are inconsistent with each other.
    #[error("{0}")]
    Input(String),
}

impl CliError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &std::path::Path, e: &std::io::Error) -> Self {
        CliError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
    /// Wraps an npy error with the file it came from.
    pub fn npy(path: &std::path::Path, e: NpyError) -> Self {
        CliError::Npy {
            context: path.display().to_string(),
            source: e,
        }
    }
}
