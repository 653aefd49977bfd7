//! Errors of the PEFT exporter; each message names the file at fault.
use lorad_engine::error::EngineError;
use lorad_plugin::staging::StagingError;
use lorad_plugin::PluginError;
use std::path::PathBuf;

/// Why a PEFT export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// A file the adapter needs is not there.
    #[error("adapter file {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The adapter does not load (corrupt weights, malformed config, mismatched A/B).
    #[error("invalid adapter: {0}")]
    Invalid(#[from] EngineError),
    /// The adapter has no LoRA weights at all.
    #[error("adapter {}: no lora_A/lora_B weights", .0.display())]
    Empty(PathBuf),
    /// Preparing or publishing the output failed.
    #[error(transparent)]
    Output(#[from] StagingError),
    /// Copying or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl PeftError {
    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PeftError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<PeftError> for PluginError {
    fn from(e: PeftError) -> Self {
        PluginError::Failed(format!("peft export: {e}"))
    }
}
