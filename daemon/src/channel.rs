//! The private control channel between the supervisor and a worker process.
//!
//! The supervisor creates a Unix socketpair and hands one end to the worker as file descriptor
//! [`CONTROL_FD`]; both sides use the wire framing of `lorad_schema::frame` with these messages. The
//! worker's stderr is its log; this channel carries only structured messages.
use crate::plugins::PluginRef;
use crate::worker::{TrainEvent, TrainTask};
use serde::{Deserialize, Serialize};

/// The descriptor number of the control socket in the worker.
pub const CONTROL_FD: i32 = 3;

/// Supervisor -> worker. One message per worker process, so the size difference of the variants
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Train this task (`lorad worker`).
    Train {
        /// The task.
        task: TrainTask,
        /// The dataloader plugin that reads the dataset; None: lorad reads it as JSONL.
        #[serde(default)]
        dataloader: Option<PluginRef>,
    },
    /// Run an exporter plugin (`lorad worker --export`).
    Export {
        /// The task.
        task: ExportTask,
    },
    /// Check a job's files at submit, as their owner (`lorad worker --check`).
    Check {
        /// The task.
        task: crate::worker::preflight::CheckTask,
    },
    /// Check an export's target before the export starts, as the job's owner (`lorad worker --check`).
    CheckExportOut {
        /// The path the export would write.
        out: std::path::PathBuf,
    },
}

/// One export: the exporter plugin to open and the request to call it with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportTask {
    /// The exporter.
    pub plugin: PluginRef,
    /// Its `export.run` request, every path resolved and checked by the daemon.
    pub request: lorad_plugin::ExportRequest,
}

/// Worker -> supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// The worker is up and read its task.
    Ready {
        /// Its pid.
        pid: u32,
    },
    /// Progress from the engine.
    Train {
        /// What happened.
        event: TrainEvent,
    },
    /// Training finished and the adapter is written.
    Finished {
        /// Where.
        adapter_dir: String,
        /// Optimizer steps done.
        steps: u64,
    },
    /// The worker stopped on request after writing a checkpoint of `step`.
    Stopped {
        /// The step checkpointed.
        step: u64,
    },
    /// The export is written.
    Exported {
        /// The files the exporter wrote.
        files: Vec<String>,
    },
    /// The submit-time check passed.
    Checked {
        /// Examples in the dataset (None: a plugin reads it).
        examples: Option<usize>,
        /// The predicted peak memory, bytes.
        #[serde(default)]
        memory_estimate: Option<u64>,
        /// The estimate in words.
        #[serde(default)]
        memory: Option<String>,
        /// The template's max_seq_len, lowered to the model's context.
        #[serde(default)]
        lowered_max_seq_len: Option<u32>,
    },
    /// The submit-time check refused the job.
    Refused {
        /// The error as the client gets it.
        error: lorad_schema::WireError,
    },
    /// A write failed for lack of space in `dir`; nothing incomplete is left to be used (checkpoints
    /// are renamed into place only when whole). The job pauses until space returns.
    NoSpace {
        /// The directory that is full.
        dir: String,
        /// The error as it happened.
        message: String,
    },
    /// Training or the export failed; the worker exits non-zero after this.
    Failed {
        /// The error, naming the file, line, field or tensor at fault.
        message: String,
    },
}
