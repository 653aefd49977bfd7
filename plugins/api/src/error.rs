//! Errors on the plugin side and the error reply that crosses the boundary.
use serde::{Deserialize, Serialize};

/// Error codes in an [`ErrorReply`].
pub mod codes {
    /// The plugin has no such method (or does not provide that kind).
    pub const UNKNOWN_METHOD: &str = "unknown_method";
    /// The request could not be decoded or is invalid.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The method ran and failed (missing file, unsupported model, ...).
    pub const FAILED: &str = "failed";
    /// A bug in the plugin, including a caught panic.
    pub const INTERNAL: &str = "internal";
}

/// What `call` writes to `out` when it returns nonzero, MessagePack-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// One of [`codes`]; hosts treat an unknown code like [`codes::FAILED`].
    pub code: String,
    /// Human-readable message naming the file, field or method concerned.
    pub message: String,
}

/// An error a plugin method returns; the SDK turns it into an [`ErrorReply`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// No such method, or a method of a kind the plugin does not provide.
    #[error("unknown method {0:?}")]
    UnknownMethod(String),
    /// The request was malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The method failed; the message says why.
    #[error("{0}")]
    Failed(String),
    /// A bug in the plugin (a caught panic among them).
    #[error("{0}")]
    Internal(String),
}

impl PluginError {
    /// The wire code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            PluginError::UnknownMethod(_) => codes::UNKNOWN_METHOD,
            PluginError::BadRequest(_) => codes::BAD_REQUEST,
            PluginError::Failed(_) => codes::FAILED,
            PluginError::Internal(_) => codes::INTERNAL,
        }
    }

    /// The reply sent across the boundary.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            code: self.code().to_owned(),
            message: self.to_string(),
        }
    }
}
