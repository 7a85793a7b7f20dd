//! The CLI's error type: every failure carries what went wrong and where.

use moe_router::npy::NpyError;
use moe_router::{ConfigError, RouteError};
use std::path::Path;

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
    /// A malformed argument (a value no input could make valid, a flag that needs another):
    /// exit code 2, like the usage errors clap reports.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        CliError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
    /// Wraps an npy error with the file it came from (an I/O error, which names the path
    /// itself, becomes [`CliError::Io`], so the path is said once).
    pub fn npy(path: &Path, e: NpyError) -> Self {
        match e {
            NpyError::Io { path, message } => CliError::Io { path, message },
            source => CliError::Npy {
                context: path.display().to_string(),
                source,
            },
        }
    }
    /// The process exit code of this error: [`crate::EXIT_USAGE`] for malformed arguments
    /// (including an unknown `--preset`), else [`crate::EXIT_FAILED`].
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_)
            | CliError::Config {
                source: ConfigError::UnknownPreset { .. },
                ..
            } => crate::EXIT_USAGE,
            _ => crate::EXIT_FAILED,
        }
    }
}

/// `PATH: message`, unless the message already names the path (I/O errors of the trace and
/// npy readers do), so that a message never repeats it.
pub fn at_path(path: &Path, message: impl std::fmt::Display) -> String {
    let p = path.display().to_string();
    let m = message.to_string();
    if m.contains(&p) { m } else { format!("{p}: {m}") }
}
