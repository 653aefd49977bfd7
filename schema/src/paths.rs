//! Default locations shared by the daemon and its clients.
use std::path::PathBuf;

/// The environment variable that overrides the socket path for every tool.
pub const SOCKET_ENV: &str = "LORAD_SOCKET";

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/lorad/lorad.sock";

/// The socket a client should use when none is given: `$LORAD_SOCKET`, then the user daemon's
/// `$XDG_RUNTIME_DIR/lorad.sock` if it exists, then the system socket.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        let user = PathBuf::from(dir).join("lorad.sock");
        if user.exists() {
            return user;
        }
    }
    PathBuf::from(SYSTEM_SOCKET)
}
