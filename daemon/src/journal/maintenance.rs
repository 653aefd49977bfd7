//! What an admin runs on a journal: `lorad check` (redb's integrity check, then every record decoded,
//! table by table) and `lorad backup` (a consistent copy, made from one read transaction, so it can be
//! taken while the daemon writes).
use super::tables::{EVENTS, JOBS, META, METRICS};
use super::{Journal, JournalError};
use lorad_schema::{frame, Event, JobRecord, MetricPoint};
use redb::{Database, ReadableTable};
use std::path::Path;

/// Records of one table: how many decode, and the keys of those that do not.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TableCount {
    /// The table.
    pub table: &'static str,
    /// Records that decode.
    pub readable: u64,
    /// Keys of records that do not, as text.
    pub damaged: Vec<String>,
}

/// What `lorad check` found.
#[derive(Debug)]
pub struct CheckReport {
    /// redb's integrity check: Ok(true) clean, Ok(false) repaired on open, Err what failed.
    pub integrity: Result<bool, String>,
    /// Jobs, events, metric points.
    pub tables: Vec<TableCount>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn clean(&self) -> bool {
        matches!(self.integrity, Ok(true)) && self.tables.iter().all(|t| t.damaged.is_empty())
    }
}

/// Opens the journal at `path` (it must exist; nothing else may have it open), runs redb's
/// integrity check and decodes every record. A file redb cannot open is `Damaged`.
pub fn check(path: &Path) -> Result<CheckReport, JournalError> {
    if !path.exists() {
        return Err(JournalError::Io {
            path: path.to_path_buf(),
            detail: "does not exist".into(),
        });
    }
    let damaged = |detail: String| JournalError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    // redb repairs a file when it opens it: check a copy, never the journal itself. A daemon that has
    // it open holds its lock.
    let original = std::fs::File::open(path).map_err(|e| JournalError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if original.try_lock().is_err() {
        return Err(JournalError::Io {
            path: path.to_path_buf(),
            detail: "is open in another process: stop the daemon, or take a copy with `lorad backup` and check that".into(),
        });
    }
    let copy = tempfile::Builder::new()
        .prefix("lorad-check-")
        .tempfile()
        .map_err(|e| JournalError::Io {
            path: path.to_path_buf(),
            detail: format!("cannot make a copy to check: {e}"),
        })?;
    std::fs::copy(path, copy.path()).map_err(|e| JournalError::Io {
        path: path.to_path_buf(),
        detail: format!("cannot copy it to check: {e}"),
    })?;
    drop(original);
    let opened = super::without_panicking(|| Database::open(copy.path())).map_err(|at| {
        damaged(format!(
            "redb found an inconsistent page while opening it (its check at {at})"
        ))
    })?;
    let mut db = match opened {
        Ok(db) => db,
        Err(e) => return Err(damaged(e.to_string())),
    };
    let integrity = super::without_panicking(|| db.check_integrity())
        .map_err(|at| format!("redb found an inconsistent page (its check at {at})"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    let journal = Journal {
        db: std::sync::Arc::new(super::Db::new(db, None)),
    };
    let tables = journal.decode_all()?;
    Ok(CheckReport { integrity, tables })
}

impl Journal {
    /// Decodes every job, event and metric point; counts what decodes and lists what does not.
    fn decode_all(&self) -> Result<Vec<TableCount>, JournalError> {
        let txn = self.db.begin_read()?;
        let mut tables = Vec::new();
        let jobs = txn.open_table(JOBS)?;
        let mut t = TableCount {
            table: "jobs",
            ..TableCount::default()
        };
        for row in jobs.iter()? {
            let (k, v) = row?;
            match frame::decode::<JobRecord>(v.value()) {
                Ok(_) => t.readable += 1,
                Err(_) => t.damaged.push(format!("job {}", k.value())),
            }
        }
        tables.push(t);
        let events = txn.open_table(EVENTS)?;
        let mut t = TableCount {
            table: "events",
            ..TableCount::default()
        };
        for row in events.iter()? {
            let (k, v) = row?;
            match frame::decode::<Event>(v.value()) {
                Ok(_) => t.readable += 1,
                Err(_) => t.damaged.push(format!("event {}", k.value())),
            }
        }
        tables.push(t);
        let metrics = txn.open_table(METRICS)?;
        let mut t = TableCount {
            table: "metrics",
            ..TableCount::default()
        };
        for row in metrics.iter()? {
            let (k, v) = row?;
            match frame::decode::<MetricPoint>(v.value()) {
                Ok(_) => t.readable += 1,
                Err(_) => {
                    let (job, step) = k.value();
                    t.damaged.push(format!("job {job} step {step}"))
                }
            }
        }
        tables.push(t);
        Ok(tables)
    }

    /// Writes a consistent copy of the journal to the new file `dest` (one read transaction: what was
    /// committed when it began, whatever is written meanwhile). Returns the records copied per table.
    pub fn copy_to(&self, dest: &Path) -> Result<Vec<(&'static str, u64)>, JournalError> {
        if dest.exists() {
            return Err(JournalError::Io {
                path: dest.to_path_buf(),
                detail: "already exists; a backup never replaces a file".into(),
            });
        }
        let copied = self.copy_into(dest);
        if copied.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        copied
    }

    fn copy_into(&self, dest: &Path) -> Result<Vec<(&'static str, u64)>, JournalError> {
        let src = self.db.begin_read()?;
        let out = Database::create(dest)?;
        let txn = out.begin_write()?;
        let mut copied = Vec::new();
        {
            let from = src.open_table(META)?;
            let mut to = txn.open_table(META)?;
            let mut n = 0;
            for row in from.iter()? {
                let (k, v) = row?;
                to.insert(k.value(), v.value())?;
                n += 1;
            }
            copied.push(("meta", n));
        }
        for (name, def) in [("jobs", JOBS), ("events", EVENTS)] {
            let from = src.open_table(def)?;
            let mut to = txn.open_table(def)?;
            let mut n = 0;
            for row in from.iter()? {
                let (k, v) = row?;
                to.insert(k.value(), v.value())?;
                n += 1;
            }
            copied.push((name, n));
        }
        {
            let from = src.open_table(METRICS)?;
            let mut to = txn.open_table(METRICS)?;
            let mut n = 0;
            for row in from.iter()? {
                let (k, v) = row?;
                to.insert(k.value(), v.value())?;
                n += 1;
            }
            copied.push(("metrics", n));
        }
        txn.commit()?;
        Ok(copied)
    }
}
