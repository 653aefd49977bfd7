//! The crash-safe job journal in redb: jobs, events and metric points.
//!
//! Every state change is one write transaction that reads the job, checks the transition, writes the
//! job and appends its event; it is committed (fsynced) before the caller acknowledges anything. The
//! methods are synchronous: async code calls them through `Core::journal` (spawn_blocking).
#[cfg(test)]
mod crash_tests;
pub mod maintenance;
pub mod recover;
mod tables;

use crate::state::{self, InvalidTransition};
use lorad_schema::{frame, now_ms, Event, EventBody, JobId, JobRecord, JobState, MetricPoint};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use std::path::Path;
use std::sync::Arc;
use tables::*;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The database failed (I/O, corruption, ...).
    #[error("journal: {0}")]
    Db(#[from] redb::Error),
    /// A stored value does not decode.
    #[error("journal: corrupt record {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Decoder's message.
        detail: String,
    },
    /// The journal was written by a newer lorad.
    #[error("journal schema version {found} is newer than this lorad supports ({supported})")]
    TooNew {
        /// In the file.
        found: u64,
        /// Ours.
        supported: u64,
    },
    /// No such job.
    #[error("no job {0}")]
    NotFound(JobId),
    /// The blocking task running the operation panicked or was cancelled.
    #[error("journal task failed: {0}")]
    Task(String),
    /// The state machine refused.
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// The journal is missing or empty, but job directories exist.
    #[error("journal {} is missing or empty, but {count} job directories exist in {}: starting a new journal would hand their ids out again. Rebuild it from them with `lorad recover-journal` (docs/OPERATIONS.md), restore a backup, or move {} aside", journal.display(), jobs_dir.display(), jobs_dir.display())]
    Orphaned {
        /// The journal file.
        journal: std::path::PathBuf,
        /// The job directories' parent.
        jobs_dir: std::path::PathBuf,
        /// How many job directories.
        count: usize,
    },
    /// The journal file cannot be opened as a database.
    #[error("journal {} is damaged: {detail}. Run `lorad check` to see what can still be read; restore a backup (`lorad backup`) or rebuild it with `lorad recover-journal` (docs/OPERATIONS.md)", path.display())]
    Damaged {
        /// The journal file.
        path: std::path::PathBuf,
        /// What redb said.
        detail: String,
    },
    /// A file operation around the journal failed.
    #[error("{}: {detail}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// A request's own check, made under the write lock (a quota), refused; nothing was written.
    #[error(transparent)]
    Refused(lorad_schema::WireError),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for JournalError {
        fn from(e: $t) -> Self { JournalError::Db(e.into()) }
    })*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Db>,
}

/// The database behind a journal, which can be closed and opened again after an I/O error (redb
/// refuses every write after one until then: "Previous I/O error occurred").
pub(crate) struct Db {
    /// Where it lives (None: a test's own storage backend, which cannot be reopened).
    path: Option<std::path::PathBuf>,
    /// None while closed: after a reopen failed. Every transaction then fails as a storage error
    /// (never silently on something else), until a reopen succeeds.
    current: std::sync::RwLock<Option<Arc<Database>>>,
}

impl Db {
    fn new(db: Database, path: Option<&Path>) -> Db {
        Db {
            path: path.map(Path::to_path_buf),
            current: std::sync::RwLock::new(Some(Arc::new(db))),
        }
    }

    fn get(&self) -> Result<Arc<Database>, JournalError> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .clone()
            .ok_or(JournalError::Db(redb::Error::PreviousIo))
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, JournalError> {
        Ok(self.get()?.begin_read()?)
    }

    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, JournalError> {
        Ok(self.get()?.begin_write()?)
    }
}

/// Whether `e` came from the storage (a full disk, a failed write or sync), as opposed to a refused
/// request or a record that does not decode.
pub fn is_storage_error(e: &JournalError) -> bool {
    match e {
        JournalError::Db(redb::Error::Io(_))
        | JournalError::Db(redb::Error::PreviousIo)
        | JournalError::Db(redb::Error::DatabaseAlreadyOpen) => true,
        JournalError::Db(other) => {
            let text = other.to_string();
            text.contains("I/O") || text.contains("Previous I/O")
        }
        _ => false,
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, JournalError> {
    frame::encode(v).map_err(|e| JournalError::Corrupt {
        what: "encode".into(),
        detail: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(
    what: impl Fn() -> String,
    bytes: &[u8],
) -> Result<T, JournalError> {
    frame::decode(bytes).map_err(|e| JournalError::Corrupt {
        what: what(),
        detail: e.to_string(),
    })
}

/// Runs `f`, turning a panic into `Err(its message and place)` without the panic hook printing it:
/// redb panics on some kinds of damage, and a damaged journal is an error to report, not a crash.
/// The hook is replaced while `f` runs (opening the journal happens before anything else runs).
pub(crate) fn without_panicking<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    use std::sync::Mutex;
    static MESSAGE: Mutex<Option<String>> = Mutex::new(None);
    let previous = std::panic::take_hook();
    // Where, not what: redb's own messages for damage ("entered unreachable code") say nothing a
    // reader can act on.
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut m) = MESSAGE.lock() {
            *m = info.location().map(|l| {
                let file = l.file();
                let short = file.find("redb-").map(|i| &file[i..]).unwrap_or(file);
                format!("{short}:{}", l.line())
            });
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|_| {
        MESSAGE
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "unknown place".into())
    })
}

/// In a listing, a record that does not decode is left out (and logged) rather than failing the whole
/// listing: one damaged metric point must not hide a job's curve. Asked for by itself (`job`), it is
/// an error.
fn skip_damaged<T>(decoded: Result<T, JournalError>) -> Option<T> {
    match decoded {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "journal record left out of a listing: run `lorad check`");
            None
        }
    }
}

fn next_counter(txn: &WriteTransaction, key: &str, first: u64) -> Result<u64, JournalError> {
    let mut meta = txn.open_table(META)?;
    let value = meta.get(key)?.map(|v| v.value()).unwrap_or(first);
    meta.insert(key, value + 1)?;
    Ok(value)
}

fn append_event(
    txn: &WriteTransaction,
    job: Option<JobId>,
    body: EventBody,
) -> Result<Event, JournalError> {
    let seq = next_counter(txn, meta::NEXT_SEQ, 1)?;
    let event = Event {
        seq,
        job,
        at_ms: now_ms(),
        body,
    };
    txn.open_table(EVENTS)?
        .insert(seq, encode(&event)?.as_slice())?;
    Ok(event)
}

fn read_job(txn: &WriteTransaction, id: JobId) -> Result<JobRecord, JournalError> {
    let jobs = txn.open_table(JOBS)?;
    let bytes = jobs.get(id.0)?.ok_or(JournalError::NotFound(id))?;
    decode(|| format!("job {id}"), bytes.value())
}

fn write_job(txn: &WriteTransaction, job: &JobRecord) -> Result<(), JournalError> {
    txn.open_table(JOBS)?
        .insert(job.id.0, encode(job)?.as_slice())?;
    Ok(())
}

impl Journal {
    /// Opens (or creates) the journal at `path`. A file redb cannot open, or that makes it panic (it
    /// does on some damage), is `Damaged`, naming the file.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let damaged = |detail: String| JournalError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
        let opened =
            without_panicking(|| Database::create(path).map(|db| Self::init_at(db, Some(path))));
        match opened {
            Ok(Ok(journal)) => journal.map_err(|e| match e {
                ref io if is_storage_error(io) => JournalError::Io {
                    path: path.to_path_buf(),
                    detail: io.to_string(),
                },
                JournalError::Db(e) => damaged(e.to_string()),
                other => other,
            }),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(JournalError::Io {
                path: path.to_path_buf(),
                detail: "is open in another process (is a lorad already running on this state directory?)".into(),
            }),
            Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))) => {
                Err(JournalError::Io {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })
            }
            Ok(Err(e)) => Err(damaged(e.to_string())),
            Err(at) => Err(damaged(format!(
                "redb found an inconsistent page while opening it (its check at {at})"
            ))),
        }
    }

    /// Checks the schema version of an opened database (creating the tables of a new one) and wraps
    /// it. Tests open databases on their own storage backends through this.
    #[cfg(test)]
    pub(crate) fn init(db: Database) -> Result<Journal, JournalError> {
        Self::init_at(db, None)
    }

    /// [`Journal::init`] for the file at `path` (which [`Journal::reopen`] opens again).
    fn init_at(db: Database, path: Option<&Path>) -> Result<Journal, JournalError> {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get(meta::SCHEMA_VERSION)?.map(|v| v.value());
            match version {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(JournalError::TooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(meta::SCHEMA_VERSION, SCHEMA_VERSION)?;
                }
            }
            txn.open_table(JOBS)?;
            txn.open_table(EVENTS)?;
            txn.open_table(METRICS)?;
        }
        txn.commit()?;
        Ok(Journal {
            db: Arc::new(Db::new(db, path)),
        })
    }

    /// Closes the database and opens it again: after an I/O error (a full disk) redb refuses every
    /// write until then. redb checks and repairs the file on open; what was committed stays. Waits
    /// (up to 5 s) for transactions still using the old handle. Blocking.
    pub fn reopen(&self) -> Result<(), JournalError> {
        let Some(path) = self.db.path.clone() else {
            return Ok(());
        };
        let mut current = self.db.current.write().unwrap_or_else(|p| p.into_inner());
        // Close the old handle. A transaction still open holds the file (and its lock): opening it
        // again then fails as already open, and the journal stays closed until a later reopen.
        drop(current.take());
        let mut last = None;
        for _ in 0..50 {
            match without_panicking(|| Database::open(&path)) {
                Ok(Ok(db)) => {
                    *current = Some(Arc::new(db));
                    return Ok(());
                }
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(at) => {
                    last = Some(format!(
                        "redb found an inconsistent page (its check at {at})"
                    ))
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(JournalError::Damaged {
            path,
            detail: format!(
                "cannot be opened again after an I/O error: {}",
                last.unwrap_or_default()
            ),
        })
    }

    /// Whether the database is open (false after a reopen failed; the next reopen may succeed).
    pub fn is_open(&self) -> bool {
        self.db.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Allocates the next id, stores the job `make(id)` returns, and logs a notice event.
    pub fn insert_job(
        &self,
        make: impl FnOnce(JobId) -> JobRecord,
    ) -> Result<(JobRecord, Event), JournalError> {
        let txn = self.db.begin_write()?;
        let id = JobId(next_counter(&txn, meta::NEXT_JOB, 1)?);
        let job = make(id);
        write_job(&txn, &job)?;
        let event = append_event(
            &txn,
            Some(id),
            EventBody::Notice {
                level: "info".into(),
                text: format!("job {id} submitted: {}", job.name),
            },
        )?;
        txn.commit()?;
        Ok((job, event))
    }

    /// Moves job `id` to `to`, checked by the state machine, with `edit` applied to the record in the
    /// same transaction. Returns the new record and the `state_changed` event.
    pub fn transition(
        &self,
        id: JobId,
        to: JobState,
        reason: Option<String>,
        edit: impl FnOnce(&mut JobRecord),
    ) -> Result<(JobRecord, Event), JournalError> {
        let txn = self.db.begin_write()?;
        let mut job = read_job(&txn, id)?;
        let from = job.state;
        state::check(from, to)?;
        let now = now_ms();
        job.state = to;
        job.reason = reason.clone();
        match to {
            JobState::Initializing => {
                job.started_at_ms = Some(now);
                job.first_started_at_ms.get_or_insert(now);
            }
            s if s.is_terminal() => job.finished_at_ms = Some(now),
            _ => {}
        }
        if let Some(first) = job.first_started_at_ms {
            if from.is_active() || to.is_terminal() {
                job.progress.wall_s = now.saturating_sub(first) as f64 / 1000.0;
            }
        }
        edit(&mut job);
        write_job(&txn, &job)?;
        let event = append_event(&txn, Some(id), EventBody::StateChanged { from, to, reason })?;
        txn.commit()?;
        Ok((job, event))
    }

    /// Changes a job's record without a state change (progress totals and the like).
    pub fn update_job(
        &self,
        id: JobId,
        edit: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, JournalError> {
        let txn = self.db.begin_write()?;
        let mut job = read_job(&txn, id)?;
        edit(&mut job);
        write_job(&txn, &job)?;
        txn.commit()?;
        Ok(job)
    }

    /// Stores a metric point once per (job, step), updates the job's progress, and logs a metrics event.
    /// A point for a step already stored, or for a job that ended, is ignored (returns None),
    /// so a replayed step never counts twice.
    pub fn record_metric(
        &self,
        id: JobId,
        point: MetricPoint,
    ) -> Result<Option<(JobRecord, Event)>, JournalError> {
        self.record_metric_and(id, point, |_| {})
    }

    /// [`Journal::record_metric`], and `also` on the job's record in the same transaction (the
    /// energy and cost that go with the step), after its progress is updated.
    pub fn record_metric_and(
        &self,
        id: JobId,
        point: MetricPoint,
        also: impl FnOnce(&mut JobRecord),
    ) -> Result<Option<(JobRecord, Event)>, JournalError> {
        let txn = self.db.begin_write()?;
        let mut job = read_job(&txn, id)?;
        // A worker being stopped (pause) finishes its step and checkpoints it, and its last reports may be
        // read after the job moved on (paused, even resumed): that step is part of the job's history.
        // A cancelled or ended job's history is closed.
        if job.state.is_terminal() {
            return Ok(None);
        }
        let prev = {
            let mut metrics = txn.open_table(METRICS)?;
            if metrics.get((id.0, point.step))?.is_some() {
                return Ok(None);
            }
            metrics.insert((id.0, point.step), encode(&point)?.as_slice())?;
            // The step before, if stored: the gap since it is active time when the same attempt
            // reported both (it ended after this attempt started).
            let before = match point.step.checked_sub(1) {
                Some(s) => metrics.get((id.0, s))?.map(|b| b.value().to_vec()),
                None => None,
            };
            match before {
                Some(bytes) => {
                    let q: MetricPoint = decode(|| format!("job {id} metric"), &bytes)?;
                    Some(crate::progress::Previous {
                        step: q.step,
                        at_ms: q.at_ms,
                        same_attempt: job.started_at_ms.is_some_and(|t| q.at_ms >= t),
                    })
                }
                None => None,
            }
        };
        crate::progress::advance(
            &mut job.progress,
            &point,
            prev,
            job.settings.checkpoint_every,
            job.first_started_at_ms,
        );
        also(&mut job);
        write_job(&txn, &job)?;
        let event = append_event(&txn, Some(id), EventBody::Metrics { point })?;
        txn.commit()?;
        Ok(Some((job, event)))
    }

    /// Appends an event (checkpoint, log text, notice) on its own.
    pub fn append_event(&self, job: Option<JobId>, body: EventBody) -> Result<Event, JournalError> {
        let txn = self.db.begin_write()?;
        let event = append_event(&txn, job, body)?;
        txn.commit()?;
        Ok(event)
    }

    /// One job.
    pub fn job(&self, id: JobId) -> Result<JobRecord, JournalError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let bytes = jobs.get(id.0)?.ok_or(JournalError::NotFound(id))?;
        decode(|| format!("job {id}"), bytes.value())
    }

    /// Removes a job that has ended: its record, its metric points and its events. Returns how many
    /// events went. Refused (invalid state) for a job that has not ended.
    pub fn delete_job(&self, id: JobId) -> Result<u64, JournalError> {
        let txn = self.db.begin_write()?;
        let job = read_job(&txn, id)?;
        if !job.state.is_terminal() {
            return Err(JournalError::Refused(lorad_schema::WireError::new(
                lorad_schema::ErrorCode::InvalidState,
                format!(
                    "job {id} is {}; only completed, failed or cancelled jobs can be deleted",
                    job.state
                ),
            )));
        }
        txn.open_table(JOBS)?.remove(id.0)?;
        {
            let mut metrics = txn.open_table(METRICS)?;
            metrics.retain_in((id.0, 0)..=(id.0, u64::MAX), |_, _| false)?;
        }
        let mut removed = 0u64;
        {
            let mut events = txn.open_table(EVENTS)?;
            // The events of one job are scattered among everyone's: one pass over the table. Deletes
            // are rare and the table holds what the journal holds, so this stays a short write.
            // Only the `job` field is read off each event (the other fields are skipped, not built).
            #[derive(serde::Deserialize)]
            struct Whose {
                #[serde(default)]
                job: Option<JobId>,
            }
            events.retain(|_, bytes| {
                let mine = frame::decode::<Whose>(bytes).is_ok_and(|e| e.job == Some(id));
                removed += u64::from(mine);
                !mine
            })?;
        }
        txn.commit()?;
        Ok(removed)
    }

    /// All jobs in id order.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, JournalError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            if let Some(job) = skip_damaged(decode(|| format!("job {}", k.value()), v.value())) {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// A job's metric points with `step > since`, in step order.
    pub fn metrics(&self, id: JobId, since: Option<u64>) -> Result<Vec<MetricPoint>, JournalError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(METRICS)?;
        let start = since.map(|s| s.saturating_add(1)).unwrap_or(0);
        let mut out = Vec::new();
        for row in table.range((id.0, start)..=(id.0, u64::MAX))? {
            let (k, v) = row?;
            if let Some(point) =
                skip_damaged(decode(|| format!("metric {:?}", k.value()), v.value()))
            {
                out.push(point);
            }
        }
        Ok(out)
    }

    /// Up to `limit` events with `seq > since`, optionally of one job, in seq order.
    pub fn events_since(
        &self,
        since: u64,
        job: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<Event>, JournalError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.range(since.saturating_add(1)..)? {
            let (k, v) = row?;
            let Some(event) =
                skip_damaged::<Event>(decode(|| format!("event {}", k.value()), v.value()))
            else {
                continue;
            };
            if job.is_none() || event.job == job {
                out.push(event);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The seq of the newest event (0 if none).
    pub fn last_seq(&self) -> Result<u64, JournalError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta
            .get(meta::NEXT_SEQ)?
            .map(|v| v.value().saturating_sub(1))
            .unwrap_or(0))
    }

    /// Number of jobs.
    pub fn job_count(&self) -> Result<u64, JournalError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(JOBS)?.len()?)
    }
}

#[cfg(test)]
mod tests;
