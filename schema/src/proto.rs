//! The handshake, requests, responses and the frames that carry them.
use crate::error::WireError;
use crate::job::{Event, JobId, JobRecord, JobSpec, JobState, MetricPoint};
use crate::settings::TrainSettings;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The first frame each way. The client sends `hello`; the daemon answers `welcome` or `error` and closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Handshake {
    /// Client -> daemon.
    Hello {
        /// Protocol version the client speaks.
        protocol: u32,
        /// Client name, for logs.
        client: String,
    },
    /// Daemon -> client: accepted.
    Welcome {
        /// Protocol version of the daemon.
        protocol: u32,
        /// The daemon's version string.
        daemon_version: String,
        /// Optional features the daemon has.
        features: Vec<String>,
    },
    /// Daemon -> client: refused (e.g. unsupported protocol version); the daemon closes after it.
    Error {
        /// Why.
        code: crate::ErrorCode,
        /// Detail naming both versions.
        message: String,
    },
}

/// A request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the reply.
    pub id: u64,
    /// The request.
    pub req: Request,
}

/// What a client can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Daemon version, uptime, devices, queue.
    Status,
    /// The templates and their settings.
    Templates,
    /// Queue a new job. The spec's fields sit beside `type`.
    Submit(JobSpec),
    /// Jobs, newest last.
    List {
        /// Only jobs in this state.
        #[serde(default)]
        state: Option<JobState>,
        /// Admin only: every user's jobs, not just the caller's.
        #[serde(default)]
        all: bool,
        /// Paging: only jobs with ids above this one (the `next` of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<JobId>,
    },
    /// One job's record.
    Get {
        /// The job.
        job: JobId,
    },
    /// Stop a queued, initializing, running or paused job.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Hold a queued job, or stop an initializing/running one after a checkpoint; `resume` continues it.
    Pause {
        /// The job.
        job: JobId,
    },
    /// Put a paused job back in the queue.
    Resume {
        /// The job.
        job: JobId,
        /// Continue from this checkpoint (a `step-N` name from `checkpoints`); None = the newest.
        #[serde(default)]
        checkpoint: Option<String>,
    },
    /// Put a failed or cancelled job back in the queue; it resumes from its newest checkpoint.
    Retry {
        /// The job.
        job: JobId,
    },
    /// Change a job's priority (higher runs first); any job that has not ended.
    SetPriority {
        /// The job.
        job: JobId,
        /// The new priority.
        priority: i32,
    },
    /// A job's complete checkpoints, oldest first.
    Checkpoints {
        /// The job.
        job: JobId,
    },
    /// Export a job's adapter (final, or a checkpoint) with an exporter plugin. The reply comes when the
    /// export is done; meanwhile the job's event stream carries `export` events with its progress.
    Export {
        /// The job.
        job: JobId,
        /// Export format, as an exporter plugin names it (`peft`, `merged`, `zip`).
        format: String,
        /// Absolute path to write (a directory or a file, by format). It must not exist; its parent must.
        out: String,
        /// A checkpoint name (`step-N`) to export instead of the final adapter.
        #[serde(default)]
        checkpoint: Option<String>,
    },
    /// A job's metric points in step order.
    Metrics {
        /// The job.
        job: JobId,
        /// Only points with `step > since_step`.
        #[serde(default)]
        since_step: Option<u64>,
    },
    /// A slice of the job's log.
    Logs {
        /// The job.
        job: JobId,
        /// Byte offset to read from.
        #[serde(default)]
        offset: u64,
        /// Most bytes to return (the daemon caps it).
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    /// Replay events after `since_seq`, then stream new ones as pushes.
    Subscribe {
        /// Only this job's events.
        #[serde(default)]
        job: Option<JobId>,
        /// Replay events with `seq > since_seq` (0 = everything).
        #[serde(default)]
        since_seq: u64,
    },
    /// Stop a subscription.
    Unsubscribe {
        /// The subscription id from `subscribed`.
        sub: u64,
    },
    /// Keep a queued job from starting (it becomes `paused` with the reason "held"); `release` lets it go.
    /// Unlike `pause`, refused for a job that has started.
    Hold {
        /// The job.
        job: JobId,
    },
    /// Put a held (paused) job back in the queue; the same as `resume` without a checkpoint.
    Release {
        /// The job.
        job: JobId,
    },
    /// Remove a completed, failed or cancelled job: its directory under the state directory (log,
    /// checkpoints, the adapter if it is there) and its journal record, metrics and events. An
    /// `output_dir` the user chose is the user's and stays. Refused for a job that has not ended.
    Delete {
        /// The job.
        job: JobId,
        /// Keep the job's record, metrics and events (the history row); remove only its files.
        #[serde(default)]
        keep_record: bool,
    },
    /// Admin only: stop the daemon.
    Shutdown,
    /// Admin only: write a consistent copy of the journal into `<state_dir>/backups/` (taken from one
    /// read transaction while the daemon goes on writing).
    Backup,
}

impl Request {
    /// The request's `type` name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Templates => "templates",
            Request::Submit(_) => "submit",
            Request::List { .. } => "list",
            Request::Get { .. } => "get",
            Request::Cancel { .. } => "cancel",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Retry { .. } => "retry",
            Request::SetPriority { .. } => "set_priority",
            Request::Checkpoints { .. } => "checkpoints",
            Request::Export { .. } => "export",
            Request::Metrics { .. } => "metrics",
            Request::Logs { .. } => "logs",
            Request::Subscribe { .. } => "subscribe",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::Hold { .. } => "hold",
            Request::Release { .. } => "release",
            Request::Delete { .. } => "delete",
            Request::Shutdown => "shutdown",
            Request::Backup => "backup",
        }
    }
}

/// A template: a named, described set of settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// Name used with `--template`.
    pub name: String,
    /// One line on what it is for.
    pub description: String,
    /// Every setting's value.
    pub settings: TrainSettings,
}

/// A compute device the daemon can schedule on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub name: String,
    /// Human description.
    pub description: String,
    /// The job running on it, if any (the first, on a device with several slots).
    #[serde(default)]
    pub job: Option<JobId>,
    /// Every job running on it.
    #[serde(default)]
    pub jobs: Vec<JobId>,
    /// Installed memory, MiB (GPUs).
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

/// One complete checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its name, `step-N`; pass it to `resume --checkpoint`.
    pub name: String,
    /// The optimizer step it was taken after.
    pub step: u64,
    /// Its directory on the daemon's host.
    pub path: String,
    /// When it was written (ms since the epoch; the directory's modification time).
    pub created_at_ms: u64,
    /// Kept by pruning until the job is deleted: the checkpoint a stop (pause) wrote, or one a
    /// user resumed from by name.
    #[serde(default)]
    pub pinned: bool,
}

/// The daemon's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Daemon version.
    pub daemon_version: String,
    /// Protocol version.
    pub protocol: u32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// The daemon's pid.
    pub pid: u32,
    /// State directory.
    pub state_dir: String,
    /// Devices and what runs on them.
    pub devices: Vec<DeviceInfo>,
    /// Jobs waiting.
    pub queued: u64,
    /// Jobs with a worker.
    pub running: u64,
    /// Jobs known in total.
    pub jobs: u64,
    /// Last event seq in the journal.
    pub last_seq: u64,
    /// Plugins loaded and rejected at the last scan (start or SIGHUP).
    #[serde(default)]
    pub plugins: PluginsStatus,
}

/// The plugin registry as `status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginsStatus {
    /// Plugins in use, in load order.
    pub loaded: Vec<PluginInfo>,
    /// Libraries that were skipped, with why.
    pub rejected: Vec<RejectedPlugin>,
    /// The directories searched, in order.
    pub dirs: Vec<String>,
}

/// What a plugin can provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// Training templates.
    Templates,
    /// Export formats.
    Export,
    /// Dataset formats.
    Dataloader,
}

/// A loaded plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// The name it declares.
    pub name: String,
    /// Its library file.
    pub path: String,
    /// What it provides.
    pub kinds: Vec<PluginKind>,
    /// The templates, export formats and dataset formats it provides, by name.
    #[serde(default)]
    pub provides: Vec<String>,
}

/// A plugin library that was not loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedPlugin {
    /// The library file.
    pub path: String,
    /// Why (wrong ABI version, missing symbol, a failing call, a duplicate name).
    pub reason: String,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The format.
    pub format: String,
    /// The path written (directory or file).
    pub out: String,
    /// The checkpoint exported, or None for the final adapter.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The files the exporter wrote.
    pub files: Vec<String>,
    /// Wall time of the export, seconds.
    pub elapsed_s: f64,
}

/// What a `submit` with `dry_run` found: the checks passed, and the job would need this much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Predicted peak memory, bytes.
    pub memory_estimate: u64,
    /// The estimate in words, with its parts.
    pub memory: String,
    /// Examples in the dataset (None: a dataloader plugin reads it).
    #[serde(default)]
    pub examples: Option<u64>,
    /// The devices the job may use, with their memory.
    pub devices: String,
}

/// Successful answers.
// Replies are short-lived and mostly job records; boxing would only complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// To `status`.
    Status(DaemonStatus),
    /// To `templates`.
    Templates {
        /// All templates.
        templates: Vec<Template>,
    },
    /// To `submit`, `get`, `cancel`, `pause`, `resume`, `retry`, `set_priority`, `hold`, `release`: the job's record after
    /// the request.
    Job(JobRecord),
    /// To a `submit` with `dry_run`: what the job would be; nothing was queued.
    Estimate(Estimate),
    /// To `list`.
    Jobs {
        /// Matching jobs in id order.
        jobs: Vec<JobRecord>,
        /// More jobs follow: ask again with `after` set to this id. A page stays well under the frame
        /// limit, whatever the number of jobs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<JobId>,
    },
    /// To `checkpoints`.
    Checkpoints {
        /// Complete checkpoints, oldest (lowest step) first.
        checkpoints: Vec<CheckpointInfo>,
    },
    /// To `export`.
    Exported(ExportInfo),
    /// To `metrics`.
    Metrics {
        /// Points in step order.
        points: Vec<MetricPoint>,
        /// More points follow: ask again with `since_step` set to this step. Pages hold at most
        /// 10,000 points, so a long job's reply stays well under the frame limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
    },
    /// To `logs`.
    Logs {
        /// Offset of `text` in job.log.
        offset: u64,
        /// The bytes read (lossily decoded as UTF-8).
        text: String,
        /// Offset just past `text`; pass it as the next `offset`.
        next_offset: u64,
        /// The log's size when read.
        size: u64,
    },
    /// To `subscribe`: pushes will carry `sub`.
    Subscribed {
        /// Subscription id.
        sub: u64,
        /// The journal's last seq when the subscription started.
        last_seq: u64,
    },
    /// To `delete`.
    Deleted {
        /// The job.
        job: JobId,
        /// The paths removed: the job's directory (with the adapter when it was written there). Never
        /// an `output_dir` the user chose.
        removed: Vec<String>,
        /// The job's record, metrics and events were removed too (false with `keep_record`).
        record_removed: bool,
    },
    /// To requests with nothing to return.
    Done,
    /// To `backup`.
    Backup {
        /// The copy, in the daemon's state directory.
        path: String,
        /// Records copied, by table (`meta`, `jobs`, `events`, `metrics`).
        records: std::collections::BTreeMap<String, u64>,
    },
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The request's id.
    pub id: u64,
    /// Present on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Response>,
    /// Present on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<WireError>,
}

/// An event for a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    /// Subscription id.
    pub sub: u64,
    /// The event.
    pub event: Event,
}

/// Any frame the daemon sends after the handshake.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    /// A reply to a request.
    Reply(Reply),
    /// A subscription event.
    Push(Push),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode};

    #[test]
    fn requests_are_type_tagged_maps() {
        let bytes = encode(&ClientFrame {
            id: 7,
            req: Request::Get { job: JobId(42) },
        })
        .unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "req": {"type": "get", "job": 42}})
        );
    }

    #[test]
    fn submit_fields_sit_beside_type_and_unknown_fields_are_ignored() {
        let wire = serde_json::json!({"id": 1, "req": {"type": "submit", "template": "basic-fine-tune",
            "base_model": "/m", "dataset": "/d.jsonl", "future_field": [1, 2]}});
        let bytes = rmp_serde::to_vec_named(&wire).unwrap();
        let f: ClientFrame = decode(&bytes).unwrap();
        match f.req {
            Request::Submit(spec) => assert_eq!(spec.template, "basic-fine-tune"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_frames_decode_both_shapes() {
        let reply = ServerFrame::Reply(Reply {
            id: 3,
            ok: Some(Response::Done),
            err: None,
        });
        let back: ServerFrame = decode(&encode(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
        let push = ServerFrame::Push(Push {
            sub: 1,
            event: crate::Event {
                seq: 9,
                job: Some(JobId(2)),
                at_ms: 5,
                body: crate::EventBody::StateChanged {
                    from: JobState::Queued,
                    to: JobState::Running,
                    reason: None,
                },
            },
        });
        let back: ServerFrame = decode(&encode(&push).unwrap()).unwrap();
        assert_eq!(back, push);
    }

    #[test]
    fn hello_is_a_bare_map() {
        let bytes = encode(&Handshake::Hello {
            protocol: 1,
            client: "x".into(),
        })
        .unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "hello", "protocol": 1, "client": "x"})
        );
    }
}
