//! Errors of the ZIP exporter; each message names the file at fault.
use lorad_plugin::staging::StagingError;
use lorad_plugin::PluginError;
use std::path::PathBuf;

/// Why a ZIP export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZipExportError {
    /// A file that must go into the archive is not there.
    #[error("{what} {} does not exist", path.display())]
    Missing {
        /// What the file is (`adapter file`, `trainer state`).
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// An adapter file is malformed.
    #[error("invalid adapter file {}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The archive could not be written.
    #[error("{}: {source}", path.display())]
    Zip {
        /// The archive (its temporary path).
        path: PathBuf,
        /// The zip crate's error.
        #[source]
        source: zip::result::ZipError,
    },
    /// Preparing or publishing the output failed.
    #[error(transparent)]
    Output(#[from] StagingError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ZipExportError {
    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ZipExportError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<ZipExportError> for PluginError {
    fn from(e: ZipExportError) -> Self {
        PluginError::Failed(format!("zip export: {e}"))
    }
}
