//! The socket server: binds the Unix socket, accepts connections, one task per connection.
mod connection;
mod handlers;

use crate::core::Core;
use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Binds the daemon's socket at `path` with `mode` permissions, replacing a stale socket file left by a
/// dead daemon (but not a live one: binding fails if something answers there).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<Listener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let name = path.to_fs_name::<GenericFilePath>()?;
    ListenerOptions::new()
        .name(name)
        .mode(mode as libc::mode_t)
        .create_tokio()
}

/// Accepts connections until shutdown, then waits for open connections to close.
pub async fn serve(core: Arc<Core>, listener: Listener) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = core.shutdown.cancelled() => break,
        };
        match accepted {
            Ok(stream) => {
                let core = core.clone();
                tracker.spawn(connection::handle(core, stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}
