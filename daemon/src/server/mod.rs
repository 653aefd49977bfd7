//! The socket server: binds the Unix socket, accepts connections, one task per connection.
mod connection;
mod handlers;
mod handshake;
pub mod session;
mod writer;

use crate::core::Core;
use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// File descriptors kept for everything but client connections: workers' control channels and logs,
/// the journal, plugins, the checks at submit.
pub const RESERVED_FDS: u64 = 256;

/// Raises the soft limit on open files to the hard limit, and lowers `max_connections` so that clients
/// can never take the descriptors a job start needs.
pub fn raise_fd_limit(limits: &mut crate::config::Limits) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    };
    let room = soft.saturating_sub(RESERVED_FDS).max(16) as usize;
    if limits.max_connections > room {
        tracing::info!(
            fd_limit = soft,
            max_connections = room,
            "max_connections lowered to what the open-file limit allows"
        );
        limits.max_connections = room;
    }
}

/// Binds the daemon's socket at `path`, replacing a stale socket file left by a dead daemon (but not a
/// live one: binding fails if something answers there). The socket gets exactly `mode` and, with
/// `gid`, that group, whatever the umask: it is created under the daemon's umask (0077 at most), then
/// given its group, then its mode, so it is never more open than asked.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> std::io::Result<Listener> {
    if let Some(dir) = path.parent() {
        // Clients must reach the socket: its directory is made traversable whatever the umask (the
        // socket's own mode and group decide who may connect).
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
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
    // SAFETY: umask only sets the file-creation mask; this runs before any worker is started.
    let old = unsafe { libc::umask(0o177) };
    let listener = ListenerOptions::new().name(name).create_tokio();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(std::io::Error::from)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The listener for a socket systemd passed (socket activation): bound, listening, its mode and group
/// set by the socket unit. Needs the runtime (it registers with the reactor).
pub fn from_activation(fd: std::os::fd::OwnedFd) -> std::io::Result<Listener> {
    use interprocess::os::unix::uds_local_socket::tokio::Listener as UdsListener;
    Ok(Listener::from(UdsListener::try_from(fd)?))
}

/// Accepts connections until shutdown, then waits for open connections to close.
pub async fn serve(core: Arc<Core>, listener: Listener) {
    let tracker = TaskTracker::new();
    let admission = Arc::new(session::Admission::default());
    let budget = Arc::new(session::FrameBudget::new(
        core.config.limits.max_pending_frame_bytes,
    ));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = core.shutdown.cancelled() => break,
        };
        match accepted {
            Ok(stream) => {
                let (core, admission, budget) = (core.clone(), admission.clone(), budget.clone());
                tracker.spawn(async move {
                    if let Some((peer, slot)) = connection::admit(&core, &admission, &stream).await
                    {
                        connection::handle(core, stream, peer, budget).await;
                        drop(slot);
                    }
                });
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
