//! Errors of the training engine.
//!
//! Every variant names what the user has to look at: the file (and line, field or tensor), so that a
//! failed job's message is actionable without reading the worker's log.
use std::path::PathBuf;

/// Why the engine could not load, train or save.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The base model directory is unusable (config, architecture, missing or malformed tensor).
    #[error("model {}: {detail}", path.display())]
    Model {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong, naming the field or tensor.
        detail: String,
    },
    /// The dataset is unusable; `line` is 1-based when one line is at fault.
    #[error("dataset {}{}: {detail}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number, when one line is at fault.
        line: Option<usize>,
        /// What is wrong.
        detail: String,
    },
    /// The tokenizer could not be loaded, trained or applied.
    #[error("tokenizer {}: {detail}", path.display())]
    Tokenizer {
        /// tokenizer.json (or the directory it should be in).
        path: PathBuf,
        /// The tokenizers crate's message.
        detail: String,
    },
    /// An adapter directory could not be read or is malformed.
    #[error("adapter {}: {detail}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong, naming the key or field.
        detail: String,
    },
    /// The settings cannot be used with this model or machine.
    #[error("setting '{field}': {detail}")]
    Setting {
        /// The settings field.
        field: String,
        /// Why.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (shape mismatch, device error, out of memory).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A checkpoint file is missing, unreadable or inconsistent; `path` is the file at fault.
    #[error("checkpoint file {}: {detail}", path.display())]
    Checkpoint {
        /// The file (or checkpoint directory) at fault.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A resume was refused because something that affects the math differs from the checkpoint's run.
    #[error("cannot resume from {}: {}", checkpoint.display(), changes.join("; "))]
    ResumeMismatch {
        /// The checkpoint directory.
        checkpoint: PathBuf,
        /// One line per difference, naming the setting, dataset or model.
        changes: Vec<String>,
    },
    /// The data pipeline's threads failed (could not start, or one panicked on some input).
    #[error("data pipeline: {0}")]
    Pipeline(String),
    /// The supervisor asked the worker to stop (pause, cancel, daemon shutdown); a checkpoint of
    /// `step` is on disk.
    #[error("stopped at step {step}; checkpoint written")]
    Stopped {
        /// The last step done and checkpointed.
        step: u64,
    },
    /// Training diverged: the loss is no longer a finite number. The job stops rather than train on.
    #[error("loss became {} at step {step}; {}; lower lr or enable grad_clip", if loss.is_nan() { "NaN".to_string() } else { loss.to_string() }, match last_checkpoint { Some(s) => format!("last good checkpoint step-{s}"), None => "no checkpoint before it".to_string() })]
    Diverged {
        /// The optimizer step.
        step: u64,
        /// The loss seen.
        loss: f64,
        /// The newest checkpoint on disk, from before the loss went bad.
        last_checkpoint: Option<u64>,
    },
}

impl EngineError {
    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    /// The directory a write failed in for lack of space (ENOSPC or a quota), if that is what
    /// this error is: a condition to pause on, not a reason to fail the job.
    pub fn no_space(&self) -> Option<&std::path::Path> {
        match self {
            EngineError::Io { path, source }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                ) =>
            {
                // The first ancestor that is not one of lorad's hidden temporary files or dirs.
                path.ancestors().skip(1).find(|p| {
                    p.file_name()
                        .is_none_or(|n| !n.to_string_lossy().starts_with('.'))
                })
            }
            _ => None,
        }
    }

    /// A `Model` error for `path`.
    pub fn model(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        EngineError::Model {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// A `Checkpoint` error for the file `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        EngineError::Checkpoint {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// A `Dataset` error for `path`, at 1-based `line` when given.
    pub fn dataset(
        path: impl Into<PathBuf>,
        line: Option<usize>,
        detail: impl Into<String>,
    ) -> Self {
        EngineError::Dataset {
            path: path.into(),
            line,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_file_and_line() {
        let e = EngineError::dataset("/x/d.jsonl", Some(7), "not valid JSON: oops");
        assert_eq!(
            e.to_string(),
            "dataset /x/d.jsonl line 7: not valid JSON: oops"
        );
        let e = EngineError::dataset("/x/d.jsonl", None, "no examples");
        assert_eq!(e.to_string(), "dataset /x/d.jsonl: no examples");
    }
}
