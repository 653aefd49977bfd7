//! The worker channel that works across nodes: files in a directory on storage the daemon and the
//! nodes share (the Slurm executor's; see docs/DESIGN-CHANGES.md "Slurm executor").
//!
//! - `task.msgpack`: the task, one frame (`ToWorker`), written by the daemon before the worker starts.
//! - `events`: the worker's reports (`FromWorker`), appended as frames (the socket channel's framing:
//!   a 4-byte big-endian length, then MessagePack). Every report is written with one `write(2)` and
//!   flushed; the ones recovery relies on (a checkpoint, the end) are also fsynced. A run of the same
//!   task (Slurm requeued it) appends to the same file after cutting off a frame its killed
//!   predecessor left half-written.
//! - `exit`: the worker's exit status, written by the batch script when it returns.
//!
//! The daemon follows `events` by offset ([`Reader`]): it consumes only whole frames and reads the
//! rest again next time, so it keeps no state but the offset, and a daemon restarted mid-run can
//! follow the same file again from the start.
use crate::channel::FromWorker;
use crate::worker::TrainEvent;
use lorad_schema::frame::{self, FrameError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The task, one frame.
pub const TASK_FILE: &str = "task.msgpack";
/// The worker's reports, frames appended.
pub const EVENTS_FILE: &str = "events";
/// The worker's exit status, as text, written by the batch script.
pub const EXIT_FILE: &str = "exit";

/// Writes the task for a worker that will run in `dir`, through a temporary file renamed into place.
pub fn write_task(dir: &Path, task: &crate::channel::ToWorker) -> Result<(), FrameError> {
    let bytes = frame::frame_bytes(&frame::encode(task)?)?;
    let tmp = dir.join(format!(".{TASK_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(TASK_FILE))?;
    Ok(())
}

/// The worker's end of `events`.
pub struct Writer {
    file: Mutex<File>,
}

impl Writer {
    /// Opens `dir/events` for appending, first cutting off a trailing partial frame.
    pub fn open(dir: &Path) -> std::io::Result<Writer> {
        let path = dir.join(EVENTS_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let whole = whole_frames_len(&bytes);
        if whole < bytes.len() {
            tracing::warn!(path = %path.display(), cut = bytes.len() - whole, "cutting off a half-written report");
            file.set_len(whole as u64)?;
        }
        file.seek(SeekFrom::Start(whole as u64))?;
        Ok(Writer {
            file: Mutex::new(file),
        })
    }

    /// Appends one report; fsyncs the ones recovery relies on.
    pub fn send(&self, msg: &FromWorker) -> Result<(), FrameError> {
        let bytes = frame::frame_bytes(&frame::encode(msg)?)?;
        let durable = matches!(
            msg,
            FromWorker::Train {
                event: TrainEvent::Checkpoint { .. }
            } | FromWorker::Finished { .. }
                | FromWorker::Stopped { .. }
                | FromWorker::Failed { .. }
                | FromWorker::NoSpace { .. }
        );
        let mut file = self
            .file
            .lock()
            .map_err(|_| FrameError::Io(std::io::Error::other("events file lock poisoned")))?;
        file.write_all(&bytes)?;
        if durable {
            file.sync_data()?;
        }
        Ok(())
    }
}

/// The length of the whole frames at the start of `bytes`.
fn whole_frames_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = bytes
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(|b| u32::from_be_bytes(b) as usize)
    {
        if at + 4 + len > bytes.len() {
            break;
        }
        at += 4 + len;
    }
    at
}

/// The daemon's end of `events`: whole frames from an offset.
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
    offset: u64,
    max_frame: usize,
}

impl Reader {
    /// A reader of `dir/events` from its start.
    pub fn new(dir: &Path) -> Reader {
        Reader {
            path: dir.join(EVENTS_FILE),
            offset: 0,
            max_frame: frame::MAX_FRAME,
        }
    }

    /// The reports appended since the last call, whole frames only (a missing file is none yet).
    /// A frame that does not decode is an error; the reader stays before it.
    pub fn poll(&mut self) -> Result<Vec<FromWorker>, FrameError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Cut back past what was read: a frame the reader consumed cannot be half-written, so
            // this is not the writer's repair. Start again rather than skip reports.
            tracing::warn!(path = %self.path.display(), "events file shrank; reading it again");
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.take(len - self.offset).read_to_end(&mut bytes)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while let Some(n) = bytes
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_be_bytes(b) as usize)
        {
            if n > self.max_frame {
                return Err(FrameError::TooLarge {
                    len: n,
                    max: self.max_frame,
                });
            }
            let Some(body) = bytes.get(at + 4..at + 4 + n) else {
                break;
            };
            out.push(frame::decode::<FromWorker>(body)?);
            at += 4 + n;
            self.offset += 4 + n as u64;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stopped(step: u64) -> FromWorker {
        FromWorker::Stopped { step }
    }

    #[test]
    fn the_reader_gets_whole_frames_once_and_waits_for_a_partial_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Reader::new(dir.path());
        assert!(r.poll().unwrap().is_empty(), "no file yet");
        let w = Writer::open(dir.path()).unwrap();
        w.send(&FromWorker::Ready { pid: 7 }).unwrap();
        w.send(&stopped(3)).unwrap();
        assert_eq!(
            r.poll().unwrap(),
            vec![FromWorker::Ready { pid: 7 }, stopped(3)]
        );
        assert!(r.poll().unwrap().is_empty(), "nothing twice");
        // Half a frame: not yet.
        let whole = frame::frame_bytes(&frame::encode(&stopped(9)).unwrap()).unwrap();
        let path = dir.path().join(EVENTS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&whole[..whole.len() - 2]).unwrap();
        assert!(r.poll().unwrap().is_empty());
        f.write_all(&whole[whole.len() - 2..]).unwrap();
        assert_eq!(r.poll().unwrap(), vec![stopped(9)]);
    }

    #[test]
    fn a_new_writer_cuts_off_what_a_killed_one_left_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(dir.path()).unwrap();
        w.send(&stopped(1)).unwrap();
        drop(w);
        let whole = frame::frame_bytes(&frame::encode(&stopped(2)).unwrap()).unwrap();
        let path = dir.path().join(EVENTS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&whole[..5]).unwrap();
        let mut r = Reader::new(dir.path());
        assert_eq!(r.poll().unwrap(), vec![stopped(1)]);
        // The requeued run appends after the repair; the reader, waiting at the partial frame,
        // reads on from there.
        let w = Writer::open(dir.path()).unwrap();
        w.send(&stopped(3)).unwrap();
        assert_eq!(r.poll().unwrap(), vec![stopped(3)]);
        assert_eq!(
            Reader::new(dir.path()).poll().unwrap(),
            vec![stopped(1), stopped(3)]
        );
    }

    #[test]
    fn a_frame_that_does_not_decode_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = frame::frame_bytes(&[0xc1, 0xc1]).unwrap();
        std::fs::write(dir.path().join(EVENTS_FILE), junk).unwrap();
        assert!(Reader::new(dir.path()).poll().is_err());
    }

    #[test]
    fn the_task_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let task = crate::channel::ToWorker::CheckExportOut {
            out: PathBuf::from("/x"),
        };
        write_task(dir.path(), &task).unwrap();
        let mut f = File::open(dir.path().join(TASK_FILE)).unwrap();
        let back: crate::channel::ToWorker = frame::read_msg(&mut f, frame::MAX_FRAME).unwrap();
        assert_eq!(back, task);
    }
}
