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
        Ok(vec![
            count::<u64, JobRecord>(&txn, "jobs", JOBS, |id| format!("job {id}"))?,
            count::<u64, Event>(&txn, "events", EVENTS, |seq| format!("event {seq}"))?,
            count::<(u64, u64), MetricPoint>(&txn, "metrics", METRICS, |(job, step)| {
                format!("job {job} step {step}")
            })?,
        ])
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
        let copied = vec![
            ("meta", copy(&src, &txn, META)?),
            ("jobs", copy(&src, &txn, JOBS)?),
            ("events", copy(&src, &txn, EVENTS)?),
            ("metrics", copy(&src, &txn, METRICS)?),
        ];
        txn.commit()?;
        Ok(copied)
    }
}

/// Decodes every value of `def` as `T`: how many do, and the keys (named by `name`) of those that do
/// not.
fn count<K, T>(
    txn: &redb::ReadTransaction,
    table: &'static str,
    def: redb::TableDefinition<K, &'static [u8]>,
    name: impl Fn(K::SelfType<'_>) -> String,
) -> Result<TableCount, JournalError>
where
    K: redb::Key + 'static,
    T: serde::de::DeserializeOwned,
{
    let mut out = TableCount {
        table,
        ..TableCount::default()
    };
    for row in txn.open_table(def)?.iter()? {
        let (k, v) = row?;
        match frame::decode::<T>(v.value()) {
            Ok(_) => out.readable += 1,
            Err(_) => out.damaged.push(name(k.value())),
        }
    }
    Ok(out)
}

/// Copies every row of `def` from `src` into `dst`; the number copied.
fn copy<K, V>(
    src: &redb::ReadTransaction,
    dst: &redb::WriteTransaction,
    def: redb::TableDefinition<K, V>,
) -> Result<u64, JournalError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let from = src.open_table(def)?;
    let mut to = dst.open_table(def)?;
    let mut n = 0;
    for row in from.iter()? {
        let (k, v) = row?;
        to.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}
