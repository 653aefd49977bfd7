//! Wire types of lorad: the framing, the handshake, requests, responses, events, jobs, settings and the
//! closed set of error codes. The daemon, the client library and `loractl` all build on this crate, and
//! docs/PROTOCOL.md describes the same messages for authors of clients in other languages.
//!
//! Encoding rules (see docs/PROTOCOL.md): each frame is a 4-byte big-endian length followed by that many
//! bytes of MessagePack; structs are maps with named fields; enums are maps tagged by `"type"` in
//! snake_case; unknown fields are ignored.
#![deny(clippy::unwrap_used)]

pub mod error;
pub mod frame;
pub mod job;
pub mod layout;
pub mod paths;
pub mod proto;
pub mod settings;
pub mod trend;

pub use error::{ErrorCode, WireError};
pub use frame::{FrameError, MAX_FRAME};
pub use job::{
    CpuSample, Event, EventBody, GpuSample, JobId, JobRecord, JobSpec, JobState, MetricPoint,
    Progress, SlurmAttempt,
};
pub use proto::{
    CheckpointInfo, ClientFrame, DaemonStatus, DeviceInfo, Estimate, ExportInfo, Handshake,
    PluginInfo, PluginKind, PluginsStatus, Push, RejectedPlugin, Reply, Request, Response,
    ServerFrame, Template, PROTOCOL_VERSION,
};
pub use settings::{
    valid_slurm_option, BaseWeights, DType, ExecutorChoice, GradientCheckpointing, Schedule,
    SettingError, TrainSettings, GRADIENT_CHECKPOINTING_AUTO_PARAMS, MAX_SLURM_OPTION,
    TARGET_MODULES,
};

/// Milliseconds since the Unix epoch, the time unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
