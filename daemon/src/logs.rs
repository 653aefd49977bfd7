//! Job logs: one `jobs/<id>/job.log` per job across every attempt, with a separator line per attempt.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest slice one `logs` request returns.
pub const MAX_LOG_CHUNK: u64 = 1024 * 1024;

/// `<job_dir>/job.log`
pub fn log_path(job_dir: &Path) -> PathBuf {
    job_dir.join("job.log")
}

/// Appends `text` to the log, creating it (and its directory) if needed. Blocking: call it from a
/// blocking context.
pub fn append(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
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
    let mut f = match std::fs::File::open(path) {
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
}
