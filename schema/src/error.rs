//! The closed set of error codes a request can fail with.
use serde::{Deserialize, Serialize};

/// Why a request failed. The set is closed: clients can match on it exhaustively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job (or subscription, template, checkpoint) does not exist.
    NotFound,
    /// The request is malformed or names a bad value; the message says which field.
    InvalidArgument,
    /// The request is not allowed in the job's current state (e.g. cancel of a completed job).
    InvalidState,
    /// The peer may not see or change this job.
    PermissionDenied,
    /// The daemon does not support this request or protocol version.
    Unsupported,
    /// A frame or a value exceeds a limit.
    TooLarge,
    /// The daemon cannot take the request now; retry later.
    Busy,
    /// A bug or an I/O failure inside the daemon.
    Internal,
    /// The work ran and failed (e.g. an exporter plugin reported an error); the message says why.
    Failed,
    /// A per-user limit set by the admin (queued jobs, running jobs, highest priority) would be
    /// exceeded; the message names the limit.
    QuotaExceeded,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Failed => "failed",
            ErrorCode::QuotaExceeded => "quota_exceeded",
        };
        f.write_str(s)
    }
}

/// An error answer: a code to branch on and a message for people that names the file, line or field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}
