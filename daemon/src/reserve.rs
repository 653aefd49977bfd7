//! Space held back for the journal. The daemon keeps a file of a few MiB in its state directory;
//! when a write fails for lack of space it deletes the file, so that it can still record what
//! happened (the job paused, and why), and fills it again once the disk has room.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes held back.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// The reserve file of one state directory.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    held: AtomicBool,
}

impl Reserve {
    /// The reserve of `state_dir` (not yet filled).
    pub fn new(state_dir: &Path) -> Reserve {
        Reserve {
            path: state_dir.join(".lorad-reserve"),
            held: AtomicBool::new(false),
        }
    }

    /// Whether the space is held now.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Takes the space (blocks really allocated, not a sparse file) if the disk has room for it and
    /// as much again; true when held. Blocking.
    pub fn fill(&self) -> bool {
        if self.held() {
            return true;
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0);
        if free < 2 * RESERVE_BYTES {
            return false;
        }
        let taken = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|f| nix::fcntl::posix_fallocate(&f, 0, RESERVE_BYTES as i64));
        match taken {
            Ok(()) => {
                self.held.store(true, Ordering::SeqCst);
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot hold space for the journal");
                let _ = std::fs::remove_file(&self.path);
                false
            }
        }
    }

    /// Gives the space back to the disk; true if it was held. Blocking.
    pub fn release(&self) -> bool {
        let was = self.held.swap(false, Ordering::SeqCst);
        let removed = std::fs::remove_file(&self.path).is_ok();
        was || removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_real_space_and_is_given_back() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let r = Reserve::new(dir.path());
        assert!(r.fill());
        let meta = std::fs::metadata(dir.path().join(".lorad-reserve")).unwrap();
        assert!(
            meta.blocks() * 512 >= RESERVE_BYTES,
            "allocated, not sparse"
        );
        assert!(r.release());
        assert!(!dir.path().join(".lorad-reserve").exists());
        assert!(!r.release());
    }
}
