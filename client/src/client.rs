//! The async client: connection, handshake and the typed calls.
use crate::error::ClientError;
use crate::router::{self, Shared};
use crate::subscription::Subscription;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use lorad_schema::frame::{self, FrameError};
use lorad_schema::{
    CheckpointInfo, DaemonStatus, ErrorCode, Estimate, ExportInfo, Handshake, JobId, JobRecord,
    JobSpec, JobState, MetricPoint, Request, Response, Template, MAX_FRAME, PROTOCOL_VERSION,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long the daemon has to answer `hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name sent in `hello` by [`Client::connect`].
pub const DEFAULT_CLIENT_NAME: &str = concat!("lorad-client/", env!("CARGO_PKG_VERSION"));

/// What the daemon said about itself in its `welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Protocol version the daemon speaks.
    pub protocol: u32,
    /// The daemon's version string.
    pub daemon_version: String,
    /// Optional features the daemon announced.
    pub features: Vec<String>,
}

/// A slice of a job's log, as returned by [`Client::logs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Byte offset of `text` in the log.
    pub offset: u64,
    /// The bytes read, decoded as UTF-8 (invalid sequences replaced).
    pub text: String,
    /// Offset just past `text`: pass it as the next `offset`.
    pub next_offset: u64,
    /// The log's size when it was read; `next_offset == size` means caught up.
    pub size: u64,
}

/// A connection to lorad.
///
/// Cheap to clone: clones share one connection, and calls from several tasks run concurrently over it
/// (replies are matched to callers by request id). The connection closes when the last clone and the
/// last [`Subscription`] are dropped. Must be used inside a tokio runtime; see [`crate::blocking`]
/// otherwise.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

struct Conn {
    shared: Arc<Shared>,
    info: ServerInfo,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.shared.close();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.conn.info)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon's socket at `path` and performs the handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_as(path, DEFAULT_CLIENT_NAME).await
    }

    /// Connects to the default socket: `$LORAD_SOCKET`, else the user daemon's socket if it exists,
    /// else the system socket (see [`lorad_schema::paths::default_socket`]).
    pub async fn connect_default() -> Result<Client, ClientError> {
        Self::connect(lorad_schema::paths::default_socket()).await
    }

    /// Like [`Client::connect`], introducing itself as `client_name` (the daemon logs it).
    pub async fn connect_as(
        path: impl AsRef<Path>,
        client_name: &str,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let connect_err = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let name = path.to_fs_name::<GenericFilePath>().map_err(connect_err)?;
        let stream = Stream::connect(name).await.map_err(connect_err)?;
        // tokio's split: both halves own the stream, which closes once both tasks have ended.
        let (mut rd, mut wr) = tokio::io::split(stream);

        let hello = Handshake::Hello {
            protocol: PROTOCOL_VERSION,
            client: client_name.to_string(),
        };
        let handshake = async {
            // A daemon that turns the connection away (too many connections) answers and closes
            // without reading hello, so the write may fail: its answer is still there to read.
            let sent = frame::write_msg_async(&mut wr, &hello).await;
            match frame::read_msg_async::<Handshake, _>(&mut rd, MAX_FRAME).await {
                Err(e) => Err(sent.err().unwrap_or(e)),
                answer => answer,
            }
        };
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                ClientError::Handshake(format!(
                    "no answer to hello from {} within {}s (is it a lorad socket?)",
                    path.display(),
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            })?;
        let info = welcome(answer, path)?;

        let (out, out_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(out));
        let reader = tokio::spawn(router::read_loop(shared.clone(), rd));
        let writer = tokio::spawn(router::write_loop(shared.clone(), out_rx, wr));
        Ok(Client {
            conn: Arc::new(Conn {
                shared,
                info,
                reader,
                writer,
            }),
        })
    }

    /// What the daemon announced in its `welcome`.
    pub fn server_info(&self) -> &ServerInfo {
        &self.conn.info
    }

    /// Sends any request and returns the daemon's response. Prefer the typed methods; a `subscribe`
    /// sent this way gets its `subscribed` answer but no events (use [`Client::subscribe`]).
    pub async fn call(&self, req: Request) -> Result<Response, ClientError> {
        self.conn.shared.request(req).await.map(|(resp, _)| resp)
    }

    /// Daemon version, uptime, devices and queue.
    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected("status", &other)),
        }
    }

    /// Every template with its settings.
    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        match self.call(Request::Templates).await? {
            Response::Templates { templates } => Ok(templates),
            other => Err(unexpected("templates", &other)),
        }
    }

    /// Queues a new job; returns its record. Paths in `spec` are read by the daemon, so they should be
    /// absolute.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Submit(spec)).await
    }

    /// The caller's jobs (every user's with `all`, admin only), optionally only those in `state`, in
    /// id order.
    pub async fn list(
        &self,
        state: Option<JobState>,
        all: bool,
    ) -> Result<Vec<JobRecord>, ClientError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            match self.call(Request::List { state, all, after }).await? {
                Response::Jobs { jobs, next } => {
                    out.extend(jobs);
                    match next {
                        // A daemon must move forward; stop rather than loop if it does not.
                        Some(n) if after.is_none_or(|a: JobId| n > a) => after = Some(n),
                        _ => return Ok(out),
                    }
                }
                other => return Err(unexpected("jobs", &other)),
            }
        }
    }

    /// One job's record.
    pub async fn get(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Get { job }).await
    }

    /// Cancels a queued, initializing, running or paused job; returns its record afterwards.
    pub async fn cancel(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Cancel { job }).await
    }

    /// A job's metric points in step order, only those with `step > since_step` when given.
    pub async fn metrics(
        &self,
        job: JobId,
        since_step: Option<u64>,
    ) -> Result<Vec<MetricPoint>, ClientError> {
        let mut out = Vec::new();
        let mut since_step = since_step;
        loop {
            match self.call(Request::Metrics { job, since_step }).await? {
                Response::Metrics { points, next } => {
                    out.extend(points);
                    match next {
                        // A daemon must move forward; stop rather than loop if it does not.
                        Some(n) if since_step.is_none_or(|s| n > s) => since_step = Some(n),
                        _ => return Ok(out),
                    }
                }
                other => return Err(unexpected("metrics", &other)),
            }
        }
    }

    /// Up to `max_bytes` (the daemon caps it; `None` = the daemon's cap) of a job's log from byte
    /// `offset`.
    pub async fn logs(
        &self,
        job: JobId,
        offset: u64,
        max_bytes: Option<u64>,
    ) -> Result<LogChunk, ClientError> {
        match self
            .call(Request::Logs {
                job,
                offset,
                max_bytes,
            })
            .await?
        {
            Response::Logs {
                offset,
                text,
                next_offset,
                size,
            } => Ok(LogChunk {
                offset,
                text,
                next_offset,
                size,
            }),
            other => Err(unexpected("logs", &other)),
        }
    }

    /// Subscribes to one job's events (`job: None` = every job, admin only). Events with
    /// `seq > since_seq` are replayed first (0 = everything), then new ones stream as they happen.
    pub async fn subscribe(
        &self,
        job: Option<JobId>,
        since_seq: u64,
    ) -> Result<Subscription, ClientError> {
        match self
            .conn
            .shared
            .request(Request::Subscribe { job, since_seq })
            .await?
        {
            (Response::Subscribed { sub, last_seq }, Some(rx)) => Ok(Subscription::new(
                self.clone(),
                sub,
                since_seq,
                last_seq,
                rx,
            )),
            (other, _) => Err(unexpected("subscribed", &other)),
        }
    }

    /// Ends subscription `sub` on the daemon; its [`Subscription`] then yields no more events.
    pub async fn unsubscribe(&self, sub: u64) -> Result<(), ClientError> {
        self.conn.shared.forget_sub(sub);
        self.done_call(Request::Unsubscribe { sub }).await
    }

    /// Pauses a job: a queued one is held; an initializing or running one checkpoints and stops.
    /// Returns the record after the pause (state `paused`).
    pub async fn pause(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Pause { job }).await
    }

    /// Puts a paused job back in the queue, from `checkpoint` (a `step-N` name) or the newest one.
    pub async fn resume(
        &self,
        job: JobId,
        checkpoint: Option<String>,
    ) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Resume { job, checkpoint }).await
    }

    /// Puts a failed or cancelled job back in the queue; it resumes from its newest checkpoint.
    pub async fn retry(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Retry { job }).await
    }

    /// Changes the priority (higher runs first) of a job that has not ended.
    pub async fn set_priority(&self, job: JobId, priority: i32) -> Result<JobRecord, ClientError> {
        self.job_call(Request::SetPriority { job, priority }).await
    }

    /// A job's complete checkpoints, oldest first.
    pub async fn checkpoints(&self, job: JobId) -> Result<Vec<CheckpointInfo>, ClientError> {
        match self.call(Request::Checkpoints { job }).await? {
            Response::Checkpoints { checkpoints } => Ok(checkpoints),
            other => Err(unexpected("checkpoints", &other)),
        }
    }

    /// Exports a job's final adapter (or `checkpoint`) as `format` to `out`, an absolute path that must
    /// not exist. Returns when the export is written; the job's `export` events show its progress.
    pub async fn export(
        &self,
        job: JobId,
        format: &str,
        out: &str,
        checkpoint: Option<String>,
    ) -> Result<ExportInfo, ClientError> {
        let request = Request::Export {
            job,
            format: format.to_string(),
            out: out.to_string(),
            checkpoint,
        };
        match self.call(request).await? {
            Response::Exported(info) => Ok(info),
            other => Err(unexpected("exported", &other)),
        }
    }

    /// Holds a queued job (it becomes `paused`, reason "held") so it does not start; refused once
    /// the job has started (use [`Client::pause`] for that).
    pub async fn hold(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Hold { job }).await
    }

    /// Puts a held (paused) job back in the queue.
    pub async fn release(&self, job: JobId) -> Result<JobRecord, ClientError> {
        self.job_call(Request::Release { job }).await
    }

    /// Removes a job that has ended: its files under the state directory and, unless `keep_record`,
    /// its record, metrics and events. Returns the paths removed and whether the record went too.
    pub async fn delete(
        &self,
        job: JobId,
        keep_record: bool,
    ) -> Result<(Vec<String>, bool), ClientError> {
        match self.call(Request::Delete { job, keep_record }).await? {
            Response::Deleted {
                removed,
                record_removed,
                ..
            } => Ok((removed, record_removed)),
            other => Err(unexpected("deleted", &other)),
        }
    }

    /// Asks the daemon to stop (admin only).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.done_call(Request::Shutdown).await
    }

    /// Asks the daemon for a consistent copy of its journal (admin only): the copy's path in the
    /// daemon's state directory, and the records copied per table.
    pub async fn backup(&self) -> Result<(String, BTreeMap<String, u64>), ClientError> {
        match self.call(Request::Backup).await? {
            Response::Backup { path, records } => Ok((path, records)),
            other => Err(unexpected("backup", &other)),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.conn.shared
    }

    /// Checks `spec` as `submit` does and predicts its peak memory; queues nothing.
    pub async fn dry_run(&self, mut spec: JobSpec) -> Result<Estimate, ClientError> {
        spec.dry_run = true;
        match self.call(Request::Submit(spec)).await? {
            Response::Estimate(e) => Ok(e),
            other => Err(unexpected("estimate", &other)),
        }
    }

    async fn job_call(&self, req: Request) -> Result<JobRecord, ClientError> {
        match self.call(req).await? {
            Response::Job(record) => Ok(record),
            other => Err(unexpected("job", &other)),
        }
    }

    async fn done_call(&self, req: Request) -> Result<(), ClientError> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }
}

fn unexpected(expected: &'static str, got: &Response) -> ClientError {
    ClientError::Unexpected {
        expected,
        got: response_kind(got).to_string(),
    }
}

/// The `type` name of a response.
pub(crate) fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Status(_) => "status",
        Response::Templates { .. } => "templates",
        Response::Job(_) => "job",
        Response::Jobs { .. } => "jobs",
        Response::Metrics { .. } => "metrics",
        Response::Checkpoints { .. } => "checkpoints",
        Response::Exported(_) => "exported",
        Response::Logs { .. } => "logs",
        Response::Subscribed { .. } => "subscribed",
        Response::Done => "done",
        Response::Backup { .. } => "backup",
        Response::Estimate(_) => "estimate",
        Response::Deleted { .. } => "deleted",
    }
}

/// What the daemon answered to hello: its welcome, or why there is none.
fn welcome(answer: Result<Handshake, FrameError>, path: &Path) -> Result<ServerInfo, ClientError> {
    match answer {
        Ok(Handshake::Welcome {
            protocol,
            daemon_version,
            features,
        }) => Ok(ServerInfo {
            protocol,
            daemon_version,
            features,
        }),
        Ok(Handshake::Error { code, message }) => Err(ClientError::Handshake(match code {
            ErrorCode::Unsupported | ErrorCode::InvalidArgument => format!(
                "lorad refused this client (protocol {PROTOCOL_VERSION}): {code}: {message}"
            ),
            _ => format!("lorad refused the connection: {code}: {message}"),
        })),
        Ok(Handshake::Hello { .. }) => Err(ClientError::Handshake(
            "the peer answered hello with hello; is it lorad?".into(),
        )),
        // A transport failure (e.g. a daemon shutting down) is a disconnect, worth a retry.
        Err(e @ (FrameError::Closed | FrameError::Truncated | FrameError::Io(_))) => {
            Err(ClientError::Frame(e))
        }
        Err(e) => Err(ClientError::Handshake(format!(
            "no welcome from {}: {e}",
            path.display()
        ))),
    }
}
