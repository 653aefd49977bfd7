//! The one error type of the client library.
use lorad_schema::{ErrorCode, FrameError, WireError};
use std::path::PathBuf;

/// Why a call to the daemon failed.
///
/// Daemon-side failures arrive as [`ClientError::Server`] and keep their [`ErrorCode`], so callers can
/// branch on the closed set of codes; everything else is a local or transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be opened.
    #[error("cannot connect to lorad at {}: {source} (is the daemon running? set --socket or LORAD_SOCKET)", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The daemon refused the handshake or answered it with something else.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The daemon answered the request with an error.
    #[error("{0}")]
    Server(WireError),
    /// A frame could not be written, read or decoded.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The connection is closed; the request may or may not have been carried out.
    #[error("connection to lorad closed")]
    Closed,
    /// The daemon answered with a response of the wrong kind.
    #[error("unexpected response: expected {expected}, got {got}")]
    Unexpected {
        /// The response type expected (`job`, `jobs`, ...).
        expected: &'static str,
        /// The response type received.
        got: String,
    },
}

impl ClientError {
    /// The daemon's error code, when the daemon answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// True when the connection is gone (closed, reset or broken mid-frame), so reconnecting may help.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            ClientError::Closed
                | ClientError::Connect { .. }
                | ClientError::Frame(
                    FrameError::Closed | FrameError::Truncated | FrameError::Io(_)
                )
        )
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Server(e)
    }
}
