//! A journal that is missing, empty or damaged: refuse to start over beside existing job directories
//! (their ids would be handed out again, and a new job would resume someone else's checkpoints), and
//! rebuild the job records from the copies kept in the job directories (`jobs/<id>/job.json`).
use super::tables::{meta, META};
use super::{append_event, write_job, Journal, JournalError};
use lorad_schema::{EventBody, JobId, JobRecord, JobState};
use redb::ReadableTable;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The copy of a job's record kept in its directory, written at every transition.
pub const JOB_FILE: &str = lorad_schema::layout::JobDir::RECORD;

/// The largest job.json read back.
const MAX_RECORD: u64 = 1 << 20;

/// The job directories under `jobs_dir` (names that are job ids), in id order.
pub fn job_dirs(jobs_dir: &Path) -> Vec<(JobId, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(JobId, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let id = e.file_name().to_str()?.parse::<u64>().ok()?;
            Some((JobId(id), e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

/// redb's file magic: a journal file that does not start with it was never completely created.
const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Whether `journal` holds no journal: missing, empty, or cut short while redb first created it (a
/// crash between writing the header and the magic number leaves a file redb refuses for good).
fn holds_nothing(journal: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(journal) else {
        return !journal.exists();
    };
    let mut head = [0u8; MAGIC.len()];
    match f.read_exact(&mut head) {
        Ok(()) => head != MAGIC,
        Err(_) => true,
    }
}

/// Refuses a journal that holds nothing beside existing job directories. Without job directories,
/// a half-created journal file is moved aside (`journal.redb.broken-<time>`) so a new one can be made.
pub fn guard(journal: &Path, jobs_dir: &Path) -> Result<(), JournalError> {
    if !holds_nothing(journal) {
        return Ok(());
    }
    let dirs = job_dirs(jobs_dir);
    if dirs.is_empty() {
        if std::fs::metadata(journal).is_ok_and(|m| m.len() > 0) {
            let aside = move_aside(journal)?;
            tracing::warn!(journal = %journal.display(), aside = %aside.display(), "a journal file without redb's header (its creation was cut short) was moved aside");
        }
        return Ok(());
    }
    Err(JournalError::Orphaned {
        journal: journal.to_path_buf(),
        jobs_dir: jobs_dir.to_path_buf(),
        count: dirs.len(),
    })
}

/// What a rebuild did.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Jobs restored from their `job.json`.
    pub restored: Vec<JobId>,
    /// Job directories without a readable record, with why; their ids are still never reused.
    pub skipped: Vec<(JobId, String)>,
    /// Where the old journal file was moved, if there was one.
    pub old_journal: Option<PathBuf>,
}

/// Builds a new journal at `journal` from the job directories in `jobs_dir`. An existing journal file
/// (empty or damaged) is moved aside first, never deleted. Each job keeps its id; its owner is the
/// owner of its directory (not what the file says); a job that was active is queued again and resumes
/// from its newest checkpoint. Job ids continue after the highest directory. Metric points and events
/// are not in the job directories and start afresh.
pub fn rebuild(journal: &Path, jobs_dir: &Path) -> Result<Rebuilt, JournalError> {
    let mut report = Rebuilt::default();
    if journal.exists() {
        report.old_journal = Some(move_aside(journal)?);
    }
    let j = Journal::open(journal)?;
    let dirs = job_dirs(jobs_dir);
    let next = dirs.last().map(|(id, _)| id.0 + 1).unwrap_or(1);
    for (id, dir) in dirs {
        match read_record(id, &dir) {
            Ok(job) => {
                j.insert_recovered(job)?;
                report.restored.push(id);
            }
            Err(why) => report.skipped.push((id, why)),
        }
    }
    j.reserve_ids(next)?;
    Ok(report)
}

/// Renames `journal` to `journal.redb.broken-<time>` (never deleted: it may still hold something).
fn move_aside(journal: &Path) -> Result<PathBuf, JournalError> {
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let aside = journal.with_extension(format!("redb.broken-{when}"));
    std::fs::rename(journal, &aside).map_err(|e| JournalError::Io {
        path: journal.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(aside)
}

/// The record in `dir/job.json`, with the id of the directory and the owner of the directory.
fn read_record(id: JobId, dir: &Path) -> Result<JobRecord, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(JOB_FILE);
    let owner = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .uid();
    // The directory is its owner's: open no link and no FIFO, only a small regular file of theirs.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.uid() != owner || meta.len() > MAX_RECORD {
        return Err(format!(
            "{}: not a regular file of the directory's owner under {MAX_RECORD} bytes",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_RECORD)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut job: JobRecord =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    job.id = id;
    job.owner_uid = owner;
    job.worker_pid = None;
    job.resume_checkpoint = None;
    if job.state.is_active() {
        job.state = JobState::Queued;
        job.requeued = true;
        job.reason = Some("journal rebuilt; resumes from its newest checkpoint".into());
    }
    Ok(job)
}

impl Journal {
    /// Stores a recovered job under its own id, with a notice event (rebuild only).
    fn insert_recovered(&self, job: JobRecord) -> Result<(), JournalError> {
        let txn = self.db.begin_write()?;
        write_job(&txn, &job)?;
        append_event(
            &txn,
            Some(job.id),
            EventBody::Notice {
                level: "warn".into(),
                text: format!("job {} restored from its directory: {}", job.id, job.name),
            },
        )?;
        txn.commit()?;
        Ok(())
    }

    /// Makes the next job id at least `next`.
    fn reserve_ids(&self, next: u64) -> Result<(), JournalError> {
        let txn = self.db.begin_write()?;
        {
            let mut m = txn.open_table(META)?;
            let current = m.get(meta::NEXT_JOB)?.map(|v| v.value()).unwrap_or(1);
            m.insert(meta::NEXT_JOB, current.max(next))?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Writes `job` as `dir/job.json` through a new temporary file renamed into place: the directory
/// belongs to the job's owner, so nothing in it is opened for writing by name. The file is given to
/// the directory's owner.
pub fn save_record(dir: &Path, job: &JobRecord) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".job.json-")
        .tempfile_in(dir)?;
    // The job's owner's, like everything in the job directory (their worker lists and syncs it).
    let owner = std::fs::symlink_metadata(dir)?;
    nix::unistd::fchown(
        tmp.as_file(),
        Some(nix::unistd::Uid::from_raw(owner.uid())),
        Some(nix::unistd::Gid::from_raw(owner.gid())),
    )?;
    tmp.write_all(&text)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(JOB_FILE)).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, state: JobState) -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("job{id}"), "state": state, "owner_uid": 4242, "priority": 0,
            "template": "t", "base_model": "/m", "dataset": "/d", "output_dir": "/o",
            "settings": lorad_schema::TrainSettings::default(), "overrides": {},
            "progress": {"step": 3, "total_steps": 9, "epoch": 0.5}, "created_at_ms": 0,
            "worker_pid": 77
        }))
        .unwrap()
    }

    #[test]
    fn an_empty_journal_beside_job_dirs_is_refused_and_rebuilt_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, jobs) = (dir.path().join("journal.redb"), dir.path().join("jobs"));
        std::fs::create_dir_all(&jobs).unwrap();
        // No job dirs: a new journal is fine, missing or empty.
        guard(&journal, &jobs).unwrap();
        for (id, state) in [(2, JobState::Completed), (5, JobState::Running)] {
            let d = jobs.join(id.to_string());
            std::fs::create_dir(&d).unwrap();
            save_record(&d, &record(id, state)).unwrap();
        }
        std::fs::create_dir(jobs.join("7")).unwrap(); // no job.json
        std::fs::write(&journal, b"").unwrap();
        let e = guard(&journal, &jobs).unwrap_err().to_string();
        assert!(
            e.contains("3 job directories") && e.contains("recover-journal"),
            "{e}"
        );

        let report = rebuild(&journal, &jobs).unwrap();
        assert_eq!(report.restored, [JobId(2), JobId(5)]);
        assert_eq!(report.skipped.len(), 1);
        assert!(report.old_journal.as_ref().is_some_and(|p| p.exists()));
        guard(&journal, &jobs).unwrap();
        let j = Journal::open(&journal).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // A journal cut short while being created holds nothing either.
        let half = dir.path().join("half.redb");
        std::fs::write(&half, [0u8; 4096]).unwrap();
        assert!(guard(&half, &jobs).is_err());
        guard(&half, &dir.path().join("no-jobs")).unwrap();
        assert!(!half.exists(), "moved aside");
        let five = j.job(JobId(5)).unwrap();
        assert_eq!(
            (five.state, five.owner_uid, five.worker_pid),
            (JobState::Queued, me, None)
        );
        assert!(five.requeued);
        assert_eq!(j.job(JobId(2)).unwrap().state, JobState::Completed);
        // Ids go on after the highest directory, even the one without a record.
        let (new, _) = j.insert_job(|id| record(id.0, JobState::Queued)).unwrap();
        assert_eq!(new.id, JobId(8));
    }
}
