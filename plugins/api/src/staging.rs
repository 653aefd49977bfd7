//! Writing an export atomically: everything goes into a hidden temporary sibling of `out`, which is
//! renamed to `out` only when complete. Dropping an uncommitted [`Staging`] removes the temporary, so a
//! failed export leaves nothing behind, neither at `out` nor beside it.
//!
//! For exporters: `Staging::new(out, Kind::Dir)`, write into `staging.path()`, then `commit()`.
use std::path::{Path, PathBuf};

/// Why the output could not be prepared or published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StagingError {
    /// `out` exists already; exports never overwrite.
    #[error("output {} already exists", .0.display())]
    Exists(PathBuf),
    /// The directory `out` should be created in does not exist.
    #[error("output {}: parent directory {} does not exist", .out.display(), .parent.display())]
    NoParent {
        /// The requested output.
        out: PathBuf,
        /// Its parent.
        parent: PathBuf,
    },
    /// `out` has no file name (`/`, `..`).
    #[error("output {}: not a file or directory name", .0.display())]
    BadName(PathBuf),
    /// Creating, syncing or renaming failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |source| StagingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the staged output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory (created empty; the exporter fills it).
    Dir,
    /// A single file (not created; the exporter creates it at [`Staging::path`]).
    File,
}

/// A temporary sibling of the output, removed on drop unless [`Staging::commit`]ted.
#[derive(Debug)]
pub struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    kind: Kind,
    committed: bool,
}

impl Staging {
    /// Checks that `out` does not exist and its parent does, and prepares `.<name>.export-tmp-<pid>`
    /// beside it (a leftover of that name from a crashed run is removed first).
    pub fn new(out: &Path, kind: Kind) -> Result<Self, StagingError> {
        let Some(name) = out.file_name() else {
            return Err(StagingError::BadName(out.to_path_buf()));
        };
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(StagingError::NoParent {
                out: out.to_path_buf(),
                parent,
            });
        }
        if out.symlink_metadata().is_ok() {
            return Err(StagingError::Exists(out.to_path_buf()));
        }
        let tmp = parent.join(format!(
            ".{}.export-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        remove(&tmp).map_err(io(&tmp))?;
        if kind == Kind::Dir {
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        }
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
            kind,
            committed: false,
        })
    }

    /// Where to write: the temporary directory, or the temporary file's path.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the staged data and renames it to `out`. Fails (and cleans up) if `out` appeared in the
    /// meantime.
    pub fn commit(mut self) -> Result<PathBuf, StagingError> {
        sync(&self.tmp, self.kind)?;
        if self.out.symlink_metadata().is_ok() {
            return Err(StagingError::Exists(self.out.clone()));
        }
        std::fs::rename(&self.tmp, &self.out).map_err(io(&self.out))?;
        self.committed = true;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Best effort: the rename itself is durable on most filesystems without it.
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(self.out.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove(&self.tmp);
        }
    }
}

/// Removes a file or directory tree; a missing path is fine.
fn remove(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// fsyncs a file, or a directory's files and the directory itself.
fn sync(path: &Path, kind: Kind) -> Result<(), StagingError> {
    if kind == Kind::Dir {
        for entry in std::fs::read_dir(path).map_err(io(path))? {
            let file = entry.map_err(io(path))?.path();
            if file.is_file() {
                sync_file(&file)?;
            }
        }
    }
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<(), StagingError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        {
            let s = Staging::new(&out, Kind::Dir).unwrap();
            std::fs::write(s.path().join("f"), b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let s = Staging::new(&out, Kind::Dir).unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        assert_eq!(s.commit().unwrap(), out);
        assert_eq!(std::fs::read(out.join("f")).unwrap(), b"x");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_existing_output_and_missing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let e = Staging::new(dir.path(), Kind::Dir).unwrap_err();
        assert!(matches!(e, StagingError::Exists(_)), "{e}");
        let e = Staging::new(&dir.path().join("no/out"), Kind::File).unwrap_err();
        assert!(e.to_string().contains("parent directory"), "{e}");
    }
}
