//! Errors of the merged exporter; each message names the file or tensor at fault.
use crate::writer::WriteError;
use lorad_engine::error::EngineError;
use lorad_plugin::staging::StagingError;
use lorad_plugin::PluginError;
use std::path::PathBuf;

/// Why a merged export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// A file the adapter needs is not there.
    #[error("adapter file {} does not exist", .0.display())]
    Missing(PathBuf),
    /// lorad could not read the adapter or the base model (its message names the file and field).
    #[error(transparent)]
    Engine(Box<EngineError>),
    /// The adapter does not fit the base model.
    #[error("adapter {} does not fit base model {}: {detail}", adapter.display(), base.display())]
    Mismatch {
        /// The adapter directory.
        adapter: PathBuf,
        /// The base model.
        base: PathBuf,
        /// Which module or tensor, and how.
        detail: String,
    },
    /// A tensor could not be read, merged or converted.
    #[error("tensor {name} of {}: {source}", file.display())]
    Tensor {
        /// HF name of the tensor.
        name: String,
        /// The file it comes from.
        file: PathBuf,
        /// candle's error (boxed: it is large).
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A base model file is malformed in a way lorad's loader does not check.
    #[error("{}: {detail}", path.display())]
    Base {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Writing a safetensors shard failed.
    #[error(transparent)]
    Write(#[from] WriteError),
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

impl From<EngineError> for MergeError {
    fn from(e: EngineError) -> Self {
        MergeError::Engine(Box::new(e))
    }
}

impl MergeError {
    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MergeError::Io {
            path: path.into(),
            source,
        }
    }

    /// A `Tensor` error for `name` read from `file`.
    pub fn tensor(name: &str, file: impl Into<PathBuf>, source: candle_core::Error) -> Self {
        MergeError::Tensor {
            name: name.to_owned(),
            file: file.into(),
            source: Box::new(source),
        }
    }
}

impl From<MergeError> for PluginError {
    fn from(e: MergeError) -> Self {
        PluginError::Failed(format!("merged export: {e}"))
    }
}
