//! Job logs: one `jobs/<id>/job.log` per job across every attempt, with a separator line per attempt.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest slice one `logs` request returns.
pub const MAX_LOG_CHUNK: u64 = 1024 * 1024;

/// `<job_dir>/job.log`
pub fn log_path(job_dir: &Path) -> PathBuf {
    lorad_schema::layout::JobDir::new(job_dir).log()
}

/// Makes the job directory (0700) and gives it to its owner `ids` (uid, gid), so that the owner's
/// worker writes its checkpoints and adapter there and no one else reads them. A directory an older
/// lorad left owned by the daemon is handed over with its contents (safe: its owner could not have
/// changed it). Blocking.
pub fn prepare_job_dir(dir: &Path, ids: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if let Some((uid, gid)) = ids {
        if meta.uid() != uid {
            if meta.uid() != nix::unistd::geteuid().as_raw() {
                return Err(std::io::Error::other(format!(
                    "{} belongs to uid {}, not to the job's owner {uid}",
                    dir.display(),
                    meta.uid()
                )));
            }
            chown_tree(dir, uid, gid)?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// lchown of `dir` and everything under it, never following a link.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let own = |p: &Path| {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            p,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(std::io::Error::from)
    };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), uid, gid)?;
        } else {
            own(&entry.path())?;
        }
    }
    own(dir)
}

/// Opens `path` without following a link and only if it is a regular file with one name: job
/// directories belong to their users, who must not be able to point the daemon's reads or writes
/// elsewhere, by a symbolic link, a FIFO or a hard link to someone else's file. With `owner`, the
/// file must also belong to that uid.
fn open_checked(
    path: &Path,
    options: &mut std::fs::OpenOptions,
    owner: Option<u32>,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o600)
        .open(path)?;
    let meta = f.metadata()?;
    let refuse = |why: String| Err(std::io::Error::other(format!("{}: {why}", path.display())));
    if !meta.is_file() {
        return refuse("not a regular file".into());
    }
    if meta.nlink() != 1 {
        return refuse(format!(
            "has {} hard links; a job log has one",
            meta.nlink()
        ));
    }
    if let Some(uid) = owner {
        if meta.uid() != uid {
            return refuse(format!(
                "belongs to uid {}, not to the job's owner {uid}",
                meta.uid()
            ));
        }
    }
    Ok(f)
}

/// Opens the log for appending, owned by `ids` (uid, gid) when given. A new log is created (0600)
/// and given to its owner; an existing one must already be theirs, and is never chowned (it could be
/// a file the owner planted there). Blocking.
pub fn open_append(path: &Path, ids: Option<(u32, u32)>) -> std::io::Result<std::fs::File> {
    let created = open_checked(
        path,
        std::fs::OpenOptions::new().create_new(true).append(true),
        None,
    );
    match created {
        Ok(f) => {
            if let Some((uid, gid)) = ids {
                nix::unistd::fchown(
                    &f,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )?;
            }
            Ok(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let owner = ids.map(|(uid, _)| uid);
            open_checked(path, std::fs::OpenOptions::new().append(true), owner)
        }
        Err(e) => Err(e),
    }
}

/// Appends `text` to the log, creating it (and its directory) if needed. Blocking: call it from a
/// blocking context.
pub fn append(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = open_checked(
        path,
        std::fs::OpenOptions::new().create(true).append(true),
        None,
    )?;
    f.write_all(text)
}

/// The separator written before each attempt's output: when, and why (fresh start, paused, crashed,
/// daemon restarted) with the checkpoint it resumes from.
pub fn separator(why: &str) -> String {
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    format!("\n===== lorad: worker started {when}: {why} =====\n")
}

/// The separator written before an export's output.
pub fn export_separator(format: &str, what: &str) -> String {
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    format!("\n===== lorad: export {format} started {when}: {what} =====\n")
}

/// Reads up to `max` bytes at `offset`: (text, next_offset, size). A missing log reads as empty.
pub fn read_chunk(path: &Path, offset: u64, max: u64) -> std::io::Result<(String, u64, u64)> {
    let mut f = match open_checked(path, std::fs::OpenOptions::new().read(true), None) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0, 0)),
        Err(e) => return Err(e),
    };
    let size = f.metadata()?.len();
    let start = offset.min(size);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max.min(MAX_LOG_CHUNK)).read_to_end(&mut buf)?;
    let next = start + buf.len() as u64;
    Ok((String::from_utf8_lossy(&buf).into_owned(), next, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = log_path(&dir.path().join("jobs/1"));
        assert_eq!(read_chunk(&p, 0, 10).unwrap().2, 0);
        append(&p, b"hello ").unwrap();
        append(&p, b"world").unwrap();
        let (t, next, size) = read_chunk(&p, 0, 6).unwrap();
        assert_eq!((t.as_str(), next, size), ("hello ", 6, 11));
        let (t, next, _) = read_chunk(&p, next, 100).unwrap();
        assert_eq!((t.as_str(), next), ("world", 11));
        assert_eq!(read_chunk(&p, 500, 10).unwrap().0, "");
    }

    #[test]
    fn a_log_replaced_by_a_link_or_a_fifo_is_neither_read_nor_written() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        let p = dir.path().join("job.log");
        std::os::unix::fs::symlink(&secret, &p).unwrap();
        assert!(read_chunk(&p, 0, 100).is_err());
        assert!(append(&p, b"x").is_err());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_chunk(&p, 0, 100).is_err());
        std::fs::remove_file(&p).unwrap();
        std::fs::hard_link(&secret, &p).unwrap();
        assert!(read_chunk(&p, 0, 100).is_err());
        assert!(append(&p, b"x").is_err());
        assert!(open_append(&p, None).is_err());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
    }

    #[test]
    fn an_existing_log_of_someone_else_is_neither_opened_nor_given_away() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.log");
        let me = nix::unistd::geteuid().as_raw();
        // New: created and (here, to ourselves) given to the owner.
        open_append(&p, Some((me, nix::unistd::getegid().as_raw()))).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // Existing and ours: opened. Claimed for another uid: refused, and not chowned.
        open_append(&p, Some((me, 0))).unwrap();
        let e = open_append(&p, Some((me + 1, 0))).unwrap_err();
        assert!(e.to_string().contains("not to the job's owner"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), me);
    }
}
