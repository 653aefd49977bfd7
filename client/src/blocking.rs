//! A blocking client for scripts and programs without an async runtime.
//!
//! [`Client`] owns a small tokio runtime (one worker thread, which runs the connection's reader and
//! writer) and blocks the calling thread on each call. Do not use it from inside an async context;
//! use [`crate::Client`] there.
//!
//! ```no_run
//! use lorad_client::blocking::Client;
//! use lorad_client::lorad_schema::JobId;
//!
//! let client = Client::connect_default()?;
//! let job = client.get(JobId(42))?;
//! println!("{} is {}", job.id, job.state);
//! # Ok::<(), lorad_client::ClientError>(())
//! ```
use crate::error::ClientError;
use crate::{LogChunk, ServerInfo};
use lorad_schema::{
    CheckpointInfo, DaemonStatus, Event, ExportInfo, JobId, JobRecord, JobSpec, JobState,
    MetricPoint, Request, Response, Template,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

/// A blocking connection to lorad. Each method blocks until the daemon answers.
#[derive(Debug)]
pub struct Client {
    // Declared before `rt` so the connection is torn down while the runtime still exists.
    inner: crate::Client,
    rt: Arc<Runtime>,
}

impl Client {
    /// Connects to the socket at `path` and performs the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_as(path, crate::client::DEFAULT_CLIENT_NAME)
    }

    /// Connects to the default socket (see [`crate::Client::connect_default`]).
    pub fn connect_default() -> Result<Client, ClientError> {
        Self::connect(lorad_schema::paths::default_socket())
    }

    /// Like [`Client::connect`], introducing itself as `client_name`.
    pub fn connect_as(path: impl AsRef<Path>, client_name: &str) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lorad-client")
            .enable_all()
            .build()
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let inner = rt.block_on(crate::Client::connect_as(path, client_name))?;
        Ok(Client {
            inner,
            rt: Arc::new(rt),
        })
    }

    /// What the daemon announced in its `welcome`.
    pub fn server_info(&self) -> &ServerInfo {
        self.inner.server_info()
    }

    /// The async client this one wraps.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// Sends any request; see [`crate::Client::call`].
    pub fn call(&self, req: Request) -> Result<Response, ClientError> {
        self.rt.block_on(self.inner.call(req))
    }

    /// See [`crate::Client::status`].
    pub fn status(&self) -> Result<DaemonStatus, ClientError> {
        self.rt.block_on(self.inner.status())
    }

    /// See [`crate::Client::templates`].
    pub fn templates(&self) -> Result<Vec<Template>, ClientError> {
        self.rt.block_on(self.inner.templates())
    }

    /// See [`crate::Client::submit`].
    pub fn submit(&self, spec: JobSpec) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.submit(spec))
    }

    /// See [`crate::Client::dry_run`].
    pub fn dry_run(&self, spec: JobSpec) -> Result<lorad_schema::Estimate, ClientError> {
        self.rt.block_on(self.inner.dry_run(spec))
    }

    /// See [`crate::Client::list`].
    pub fn list(&self, state: Option<JobState>, all: bool) -> Result<Vec<JobRecord>, ClientError> {
        self.rt.block_on(self.inner.list(state, all))
    }

    /// See [`crate::Client::get`].
    pub fn get(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.get(job))
    }

    /// See [`crate::Client::cancel`].
    pub fn cancel(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.cancel(job))
    }

    /// See [`crate::Client::pause`].
    pub fn pause(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.pause(job))
    }

    /// See [`crate::Client::resume`].
    pub fn resume(&self, job: JobId, checkpoint: Option<String>) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.resume(job, checkpoint))
    }

    /// See [`crate::Client::retry`].
    pub fn retry(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.retry(job))
    }

    /// See [`crate::Client::set_priority`].
    pub fn set_priority(&self, job: JobId, priority: i32) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.set_priority(job, priority))
    }

    /// See [`crate::Client::export`].
    pub fn export(
        &self,
        job: JobId,
        format: &str,
        out: &str,
        checkpoint: Option<String>,
    ) -> Result<ExportInfo, ClientError> {
        self.rt
            .block_on(self.inner.export(job, format, out, checkpoint))
    }

    /// See [`crate::Client::checkpoints`].
    pub fn checkpoints(&self, job: JobId) -> Result<Vec<CheckpointInfo>, ClientError> {
        self.rt.block_on(self.inner.checkpoints(job))
    }

    /// See [`crate::Client::metrics`].
    pub fn metrics(
        &self,
        job: JobId,
        since_step: Option<u64>,
    ) -> Result<Vec<MetricPoint>, ClientError> {
        self.rt.block_on(self.inner.metrics(job, since_step))
    }

    /// See [`crate::Client::logs`].
    pub fn logs(
        &self,
        job: JobId,
        offset: u64,
        max_bytes: Option<u64>,
    ) -> Result<LogChunk, ClientError> {
        self.rt.block_on(self.inner.logs(job, offset, max_bytes))
    }

    /// See [`crate::Client::subscribe`].
    pub fn subscribe(
        &self,
        job: Option<JobId>,
        since_seq: u64,
    ) -> Result<Subscription, ClientError> {
        let inner = self.rt.block_on(self.inner.subscribe(job, since_seq))?;
        Ok(Subscription {
            inner,
            rt: self.rt.clone(),
        })
    }

    /// See [`crate::Client::unsubscribe`].
    pub fn unsubscribe(&self, sub: u64) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.unsubscribe(sub))
    }

    /// See [`crate::Client::hold`].
    pub fn hold(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.hold(job))
    }

    /// See [`crate::Client::release`].
    pub fn release(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.rt.block_on(self.inner.release(job))
    }

    /// See [`crate::Client::delete`].
    pub fn delete(
        &self,
        job: JobId,
        keep_record: bool,
    ) -> Result<(Vec<String>, bool), ClientError> {
        self.rt.block_on(self.inner.delete(job, keep_record))
    }

    /// See [`crate::Client::shutdown`].
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.shutdown())
    }

    /// Asks the daemon for a consistent copy of its journal (admin only); see
    /// [`crate::Client::backup`].
    pub fn backup(&self) -> Result<(String, std::collections::BTreeMap<String, u64>), ClientError> {
        self.rt.block_on(self.inner.backup())
    }
}

/// The time given to [`Subscription::next_timeout`] passed without an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no event within the timeout")]
pub struct TimedOut;

/// A blocking view of a [`crate::Subscription`].
#[derive(Debug)]
pub struct Subscription {
    inner: crate::Subscription,
    rt: Arc<Runtime>,
}

impl Subscription {
    /// Like [`Iterator::next`] (which blocks for the next event), giving up after `timeout`.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, TimedOut> {
        let inner = &mut self.inner;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, inner.next())
                .await
                .map_err(|_| TimedOut)
        })
    }

    /// See [`crate::Subscription::id`].
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// See [`crate::Subscription::last_seq`].
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq()
    }

    /// See [`crate::Subscription::replay_until`].
    pub fn replay_until(&self) -> u64 {
        self.inner.replay_until()
    }

    /// Ends the subscription and waits for the daemon to confirm.
    pub fn unsubscribe(self) -> Result<(), ClientError> {
        let Subscription { inner, rt } = self;
        rt.block_on(inner.unsubscribe())
    }
}

/// Blocks for each next event; ends once the subscription or its connection has ended.
impl Iterator for Subscription {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.rt.block_on(self.inner.next())
    }
}
