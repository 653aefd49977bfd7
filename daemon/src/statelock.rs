//! One daemon per state directory: `lorad.lock` is held with flock(2) for the daemon's lifetime and
//! holds its pid, so a second lorad on the same directory is refused with the owner named, before it
//! touches the journal. The kernel drops the lock when the process dies, however it dies.
use nix::fcntl::{Flock, FlockArg};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the state directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("another lorad{} owns the state directory {}; stop it first, or give this one another --state-dir", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .dir.display())]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The owner's pid, as its lock file says.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] Flock<std::fs::File>);

impl StateLock {
    /// Takes the lock of `state_dir` (which must exist) and writes this process's pid into it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = lorad_schema::layout::StateDir::new(state_dir).lock();
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: state_dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        locked.set_len(0).map_err(io)?;
        locked.rewind().map_err(io)?;
        writeln!(locked, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock(locked))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_owner_named() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same process
        // conflicts like another process would.
        let err = StateLock::acquire(dir.path()).unwrap_err().to_string();
        let me = std::process::id();
        assert!(
            err.contains(&format!(
                "another lorad (pid {me}) owns the state directory"
            )),
            "{err}"
        );
        drop(held);
        StateLock::acquire(dir.path()).unwrap();
    }
}
