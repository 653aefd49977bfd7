//! The daemon's shared state: config, journal, the live event bus and the supervisor's handle.
use crate::config::Config;
use crate::journal::{Journal, JournalError};
use crate::plugins::Registry;
use lorad_schema::{Event, JobId, JobRecord, JobState};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

/// A running worker as the rest of the daemon sees it.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    /// The worker's pid.
    pub pid: u32,
    /// Cancelled to make the supervisor stop the worker.
    pub stop: CancellationToken,
    /// Where it runs.
    pub slot: crate::scheduler::Slot,
}

/// State shared by every task of the daemon.
pub struct Core {
    /// Configuration.
    pub config: Config,
    journal: Journal,
    /// Serialises journal writes with the publication of their events, so live subscribers see events
    /// in seq order.
    write_lock: Arc<Mutex<()>>,
    events: broadcast::Sender<Event>,
    /// Wakes the supervisor when the queue may have changed.
    pub kick: Notify,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
    /// Workers by job.
    pub workers: Mutex<HashMap<JobId, WorkerHandle>>,
    started: Instant,
    next_sub: AtomicU64,
    plugins: RwLock<Arc<Registry>>,
    /// Submit-time checks in flight.
    pub checks: crate::supervisor::check::Checks,
    /// Space held back so the journal can still record a full disk.
    pub reserve: crate::reserve::Reserve,
    /// When the journal was last reopened: failures in a burst reopen it once.
    last_reopen: Mutex<Option<Instant>>,
    /// The CPU and the GPUs found at start.
    pub devices: crate::devices::Devices,
}

impl Core {
    /// Wraps an opened journal.
    pub fn new(config: Config, journal: Journal, shutdown: CancellationToken) -> Arc<Core> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Core {
            journal,
            write_lock: Arc::new(Mutex::new(())),
            events,
            kick: Notify::new(),
            shutdown,
            workers: Mutex::new(HashMap::new()),
            started: Instant::now(),
            next_sub: AtomicU64::new(1),
            plugins: RwLock::new(Arc::new(Registry::default())),
            checks: crate::supervisor::check::Checks::new(config.limits.max_checks),
            reserve: crate::reserve::Reserve::new(&config.state_dir),
            last_reopen: Mutex::new(None),
            devices: crate::devices::Devices::discover(),
            config,
        })
    }

    /// The plugins of the last scan.
    pub fn plugins(&self) -> Arc<Registry> {
        self.plugins
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Scans the plugin directories again (off the runtime: dlopen and plugin calls block) and swaps
    /// the registry in. Libraries already loaded stay loaded; jobs and exports already started keep the
    /// plugin they were given.
    pub async fn rescan_plugins(&self) {
        let dirs = self.config.plugin_dirs.clone();
        let strict = self.config.system;
        match tokio::task::spawn_blocking(move || Registry::scan(&dirs, strict)).await {
            Ok(registry) => {
                let status = registry.status();
                tracing::info!(
                    loaded = status.loaded.len(),
                    rejected = status.rejected.len(),
                    "plugins scanned"
                );
                let mut slot = self.plugins.write().unwrap_or_else(|p| p.into_inner());
                *slot = Arc::new(registry);
            }
            Err(e) => tracing::error!(error = %e, "plugin scan failed"),
        }
    }

    /// Runs a read of the journal on the blocking pool.
    pub async fn read<R, F>(&self, f: F) -> Result<R, JournalError>
    where
        F: FnOnce(&Journal) -> Result<R, JournalError> + Send + 'static,
        R: Send + 'static,
    {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || f(&journal))
            .await
            .map_err(join_error)?
    }

    /// Runs a journal write on the blocking pool; the events it returns are published to live
    /// subscribers after the commit, in seq order.
    pub async fn write<R, F>(&self, f: F) -> Result<R, JournalError>
    where
        F: FnOnce(&Journal) -> Result<(R, Vec<Event>), JournalError> + Send + 'static,
        R: Send + 'static,
    {
        let journal = self.journal.clone();
        let lock = self.write_lock.clone();
        let events = self.events.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let (out, published) = f(&journal)?;
            for e in published {
                // No receivers is fine: nobody is watching.
                let _ = events.send(e);
            }
            Ok(out)
        })
        .await
        .map_err(join_error)?;
        if let Err(e) = &result {
            if crate::journal::is_storage_error(e) {
                self.storage_failed(e).await;
            }
        }
        result
    }

    /// A journal write failed in the storage (a full disk): give back the reserved space, so that
    /// what happened can be recorded, and reopen the database (redb refuses every write after an
    /// I/O error until then). The write that failed is not retried here; its caller decides.
    pub async fn storage_failed(&self, e: &JournalError) {
        tracing::error!(error = %e, state_dir = %self.config.state_dir.display(), "the journal cannot write; releasing the reserve and reopening it");
        let released = self.reserve.release();
        self.reopen_journal(released).await;
    }

    /// Whether the journal is open (false while a reopen after an I/O error has not succeeded).
    pub fn journal_open(&self) -> bool {
        self.journal.is_open()
    }

    /// Reopens the journal, at most once a second (a burst of failed writes reopens it once).
    pub async fn reopen_journal(&self, released: bool) {
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            if self.journal.is_open() && last.is_some_and(|t| t.elapsed().as_secs_f64() < 1.0) {
                return;
            }
            *last = Some(Instant::now());
        }
        let journal = self.journal.clone();
        let lock = self.write_lock.clone();
        let reopened = tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            journal.reopen()
        })
        .await;
        match reopened {
            Ok(Ok(())) => tracing::warn!(released, "journal reopened"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reopen the journal"),
            Err(e) => tracing::error!(error = %e, "cannot reopen the journal"),
        }
    }

    /// Moves a job to `to` (checked and committed) and publishes the event.
    pub async fn transition(
        &self,
        id: JobId,
        to: JobState,
        reason: Option<String>,
        edit: impl FnOnce(&mut JobRecord) + Send + 'static,
    ) -> Result<JobRecord, JournalError> {
        let job = self
            .write(move |j| {
                let (job, event) = j.transition(id, to, reason, edit)?;
                Ok((job, vec![event]))
            })
            .await?;
        tracing::info!(job = %id, state = %job.state, reason = job.reason.as_deref().unwrap_or(""), "job state");
        self.keep_record(&job).await;
        Ok(job)
    }

    /// Keeps a copy of `job`'s record in its directory (if it has one yet), from which `lorad
    /// recover-journal` can rebuild a lost journal. The record is read again from the journal when
    /// written, so of two transitions in quick succession the copy ends as the later one. A failure
    /// is logged: the journal is the record; this is its spare.
    pub async fn keep_record(&self, job: &JobRecord) {
        let (id, dir) = (job.id, self.config.job_dir(job.id));
        let journal = self.journal.clone();
        let lock = self.write_lock.clone();
        let saved = tokio::task::spawn_blocking(move || {
            // Under the write lock: no transition commits between the read and the write.
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let current = journal.job(id).map_err(std::io::Error::other)?;
            if dir.is_dir() {
                crate::journal::recover::save_record(&dir, &current)
            } else {
                Ok(())
            }
        })
        .await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::warn!(job = %id, "cannot keep a copy of the job's record in its directory");
        }
    }

    /// A receiver of live events (subscribe before replaying the journal, so nothing falls between).
    pub fn live_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A fresh subscription id.
    pub fn next_sub_id(&self) -> u64 {
        self.next_sub.fetch_add(1, Ordering::Relaxed)
    }

    /// Seconds since the daemon started.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The handle of the worker running `job`, if any.
    pub fn worker(&self, job: JobId) -> Option<WorkerHandle> {
        self.workers.lock().ok().and_then(|w| w.get(&job).cloned())
    }
}

fn join_error(e: tokio::task::JoinError) -> JournalError {
    JournalError::Task(e.to_string())
}
