//! The built-in JSONL `DataSource`: one pass to check every line and index where the records are, then
//! positional reads, so the file is never held in memory as parsed examples.
use super::format::{Example, FileFormat};
use super::source::{DataSource, RawExample, NO_EXAMPLES};
use crate::error::EngineError;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The default longest line (the `max_line_bytes` setting's default, 8 MiB).
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// Opens `path` for reading only if it is a regular file: FIFOs, devices and directories are refused by
/// what they are, without blocking on them (the file is opened non-blocking, checked, then switched
/// back).
pub fn open_regular(path: &Path) -> Result<File, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| EngineError::io(path, e))?;
    let meta = file.metadata().map_err(|e| EngineError::io(path, e))?;
    if !meta.is_file() {
        return Err(EngineError::dataset(
            path,
            None,
            format!(
                "is {}, not a regular file",
                crate::preflight::kind_of(meta.file_type())
            ),
        ));
    }
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| EngineError::io(path, e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| EngineError::io(path, e.into()))?;
    Ok(file)
}

/// Where one record's line is in the file (16 bytes per record).
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
    line: u32,
}

/// A checked and indexed JSONL dataset. The file stays open, so replacing it on disk (a rename) during
/// training does not change what is read; rewriting it in place is detected when a read comes up short
/// or no longer parses.
#[derive(Debug)]
pub struct JsonlSource {
    path: PathBuf,
    file: File,
    entries: Vec<Entry>,
    format: FileFormat,
}

impl JsonlSource {
    /// Reads `path` once: every non-blank line must be a JSON object in the file's format (taken from
    /// the first one), with its fields of the right types. Errors name the 1-based line. Needs no
    /// tokenizer, so the daemon runs it at submit.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        Self::open_limited(path, MAX_LINE_BYTES)
    }

    /// [`JsonlSource::open`] with lines of at most `max_line` bytes (the `max_line_bytes` setting).
    pub fn open_limited(path: &Path, max_line: usize) -> Result<Self, EngineError> {
        let file = open_regular(path)?;
        let mut reader = BufReader::with_capacity(1 << 16, &file);
        let mut entries = Vec::new();
        let mut format: Option<FileFormat> = None;
        let (mut buf, mut offset, mut line) = (Vec::new(), 0u64, 0usize);
        loop {
            buf.clear();
            // One byte past the limit (its newline, or one too many) tells a line that is too long
            // from one that just fits.
            let n = (&mut reader)
                .take(max_line as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| EngineError::io(path, e))?;
            if n == 0 {
                break;
            }
            line += 1;
            if n > max_line && buf.last() != Some(&b'\n') {
                return Err(EngineError::dataset(
                    path,
                    Some(line),
                    format!(
                        "the line is longer than {}, the most lorad reads as one example (setting max_line_bytes)",
                        human_bytes(max_line)
                    ),
                ));
            }
            let start = offset;
            offset += n as u64;
            let bad = |detail: String| EngineError::dataset(path, Some(line), detail);
            let mut text = std::str::from_utf8(&buf).map_err(|_| bad("not valid UTF-8".into()))?;
            if line == 1 {
                // Windows editors write a byte-order mark; it is not part of the JSON.
                text = text.strip_prefix('\u{feff}').unwrap_or(text);
            }
            if text.trim().is_empty() {
                continue;
            }
            let value = parse_json(text).map_err(bad)?;
            let example = Example::parse(&value, format).map_err(bad)?;
            format.get_or_insert(FileFormat {
                format: example.format(),
                line,
            });
            let len = u32::try_from(n).map_err(|_| bad("line is longer than 4 GiB".into()))?;
            let line32 = u32::try_from(line).map_err(|_| bad("more than 2^32 lines".into()))?;
            entries.push(Entry {
                offset: start,
                len,
                line: line32,
            });
        }
        let Some(format) = format else {
            return Err(EngineError::dataset(path, None, NO_EXAMPLES));
        };
        Ok(JsonlSource {
            path: path.to_path_buf(),
            file,
            entries,
            format,
        })
    }

    /// The file's format and the line it was detected from.
    pub fn format(&self) -> FileFormat {
        self.format
    }
}

/// `8 MiB`, `1536 KiB`, `100 bytes`.
fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

impl DataSource for JsonlSource {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// One positional read covering the range (pread: no shared cursor, so threads need no lock).
    fn read(&self, range: Range<usize>) -> Result<Vec<RawExample>, EngineError> {
        let Some(entries) = self.entries.get(range.clone()) else {
            return Err(EngineError::dataset(
                &self.path,
                None,
                format!("records {range:?} asked for, the file has {}", self.len()),
            ));
        };
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        let start = first.offset;
        let mut buf = vec![0u8; (last.offset + last.len as u64 - start) as usize];
        self.file.read_exact_at(&mut buf, start).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                changed(&self.path, last.line)
            } else {
                EngineError::io(&self.path, e)
            }
        })?;
        entries
            .iter()
            .map(|e| {
                let at = (e.offset - start) as usize;
                let bytes = &buf[at..at + e.len as usize];
                let value = std::str::from_utf8(bytes)
                    .map_err(|_| "not valid UTF-8".to_string())
                    .map(|t| t.strip_prefix('\u{feff}').unwrap_or(t))
                    .and_then(parse_json)
                    .map_err(|_| changed(&self.path, e.line))?;
                Ok(RawExample {
                    line: e.line as usize,
                    value,
                })
            })
            .collect()
    }
}

fn changed(path: &Path, line: u32) -> EngineError {
    EngineError::dataset(
        path,
        Some(line as usize),
        "no longer what it was when the dataset was checked: the file was modified in place during \
         training (replace it with a new file instead)",
    )
}
