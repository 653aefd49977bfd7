//! Jobs: ids, states, specs, records, metric points and journal events.
use crate::settings::TrainSettings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A job's id: sequential, never reused. On the wire it is a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a job is in its life. See DESIGN.md section 4 for the allowed transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a device.
    Queued,
    /// A worker is loading the model and data.
    Initializing,
    /// A worker is training.
    Running,
    /// Held by the user; `resume` puts it back in the queue.
    Paused,
    /// Finished; the adapter is written.
    Completed,
    /// Ended with an error (the record's `reason` says which).
    Failed,
    /// Stopped by the user.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Initializing,
        JobState::Running,
        JobState::Paused,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The snake_case name used on the wire and by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Initializing => "initializing",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True for states a job never leaves by itself (completed, failed, cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// True while a worker process may exist for the job.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Initializing | JobState::Running)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state '{s}' (expected one of queued, initializing, running, paused, completed, failed, cancelled)"))
    }
}

/// What a client submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobSpec {
    /// A label for people; defaults to the dataset's file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Template name (`loractl templates` lists them).
    pub template: String,
    /// Path to an HF model directory.
    pub base_model: String,
    /// Path to a JSONL dataset.
    pub dataset: String,
    /// Where to write the final adapter; defaults to `<state_dir>/jobs/<id>/adapter`.
    #[serde(default)]
    pub output_dir: Option<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// `key -> value` overrides of the template's settings, type-checked at submit.
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
    /// Check everything and predict the job's peak memory, but queue nothing: the answer is an
    /// `estimate` instead of the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Start only once these jobs have completed; if one of them fails or is cancelled, this job is
    /// cancelled with that reason. They must be the submitter's own jobs and not have failed already.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// Do not start before this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// A shell command run (as the job's owner) when the job completes, fails or is cancelled, with the
    /// job's id, name, state, reason and adapter path in `LORAD_*` environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_finish: Option<String>,
}

/// The Slurm job that runs one attempt of a job (executor=slurm).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmAttempt {
    /// Slurm's job id (`squeue -j`).
    pub job_id: u64,
    /// The attempt's directory on the shared storage: its task, the worker's reports (`events`)
    /// and its exit status (`exit`).
    pub dir: String,
}

/// How far a job got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps planned (0 until the worker has counted the data).
    pub total_steps: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Loss of the last step.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Estimated seconds to completion when the last step ended, from the smoothed step and
    /// checkpoint times over active time (pauses, restarts and loading left out).
    #[serde(default)]
    pub eta_s: Option<f64>,
    /// Seconds the job spent training: the time between its steps within each attempt (checkpoints and
    /// data waits included; queued, paused, restart and model-loading time excluded).
    #[serde(default)]
    pub active_s: f64,
    /// Seconds from the job's first start to its last step (or its end): `active_s` plus everything else.
    #[serde(default)]
    pub wall_s: f64,
    /// Smoothed seconds per step over active time, checkpoints left out (an EMA over ~20 steps).
    #[serde(default)]
    pub step_time_s: Option<f64>,
    /// Smoothed seconds a periodic checkpoint adds to the step it follows (None: none written yet).
    /// The ETA is steps left x `step_time_s` + checkpoints left x `checkpoint_s`.
    #[serde(default)]
    pub checkpoint_s: Option<f64>,
    /// The loss smoothed over ~20 steps (EMA, see `lorad_schema::trend`).
    #[serde(default)]
    pub loss_ema: Option<f64>,
    /// How fast the smoothed loss moves: its change per 100 steps (negative: still learning).
    #[serde(default)]
    pub loss_slope_per_100: Option<f64>,
    /// Worker restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// The device the current (or last) attempt runs on: `cpu`, `cuda:N`, or `slurm`.
    #[serde(default)]
    pub device: Option<String>,
    /// The Slurm job of the current (or last) attempt, when the job runs on Slurm: recorded as soon
    /// as it is submitted, so a restarted daemon follows it again instead of starting another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<SlurmAttempt>,
    /// Energy used so far, joules, as measured: the GPU's NVML energy counter, or the CPU package's
    /// RAPL counter (the whole package, other processes included). None: not measured.
    #[serde(default)]
    pub energy_j: Option<f64>,
    /// Where `energy_j` comes from (`nvml cuda:0`, `rapl package-0`), or why it was not measured.
    #[serde(default)]
    pub energy_source: Option<String>,
    /// What the job cost so far: kWh x `price_per_kwh` + active hours x `price_per_hour` (the daemon's
    /// config). None: no price configured, or a price per kWh with no energy measured.
    #[serde(default)]
    pub cost: Option<f64>,
}

/// A job as the journal keeps it and as `show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// Label for people.
    pub name: String,
    /// Current state.
    pub state: JobState,
    /// Why the job entered its current state (e.g. the error of a failed job).
    #[serde(default)]
    pub reason: Option<String>,
    /// Unix uid of the submitter.
    pub owner_uid: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Template the settings came from.
    pub template: String,
    /// Base model path.
    pub base_model: String,
    /// Dataset path.
    pub dataset: String,
    /// Where the final adapter goes.
    pub output_dir: String,
    /// The resolved settings: template plus overrides.
    pub settings: TrainSettings,
    /// Overrides the user gave, as given.
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
    /// Progress so far.
    pub progress: Progress,
    /// Submission time (ms since the epoch).
    pub created_at_ms: u64,
    /// When the current (or last) attempt started.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// When the job reached a terminal state.
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// The adapter directory once the job completed.
    #[serde(default)]
    pub adapter_dir: Option<String>,
    /// The pid of the job's current (or last) worker process.
    #[serde(default)]
    pub worker_pid: Option<u32>,
    /// The checkpoint the next attempt resumes from (a `step-N` name); None = the newest one.
    #[serde(default)]
    pub resume_checkpoint: Option<String>,
    /// Put back in the queue by recovery (crash, daemon restart): runs before other jobs of its priority.
    #[serde(default)]
    pub requeued: bool,
    /// The job's predicted peak memory, bytes, as checked at submit; it waits for a device with that
    /// much free. None: not estimated (a job from an older lorad).
    #[serde(default)]
    pub memory_estimate: Option<u64>,
    /// When the job's first attempt started (ms since the epoch); `wall_s` counts from here.
    #[serde(default)]
    pub first_started_at_ms: Option<u64>,
    /// Jobs that must complete before this one starts (`submit --after`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// The job does not start before this time (ms since the epoch; `submit --not-before`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// The job's own hook (`submit --on-finish`), run when it completes, fails or is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_finish: Option<String>,
}

/// GPU telemetry at the time of a metric point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    /// Utilisation, percent.
    pub util_pct: f64,
    /// Memory in use, MiB.
    pub mem_used_mb: f64,
    /// Temperature, degrees Celsius.
    pub temp_c: f64,
    /// Power draw, watts.
    pub power_w: f64,
}

/// The training process on the CPU, sampled at the end of a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuSample {
    /// Resident memory of the worker process, MiB.
    pub rss_mb: f64,
    /// Peak resident memory of the worker process so far, MiB.
    pub peak_rss_mb: f64,
    /// CPU time the worker used during the step over the step's wall time, percent (100 = one core).
    pub cpu_pct: f64,
}

/// One optimizer step's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Fractional epoch at the end of the step.
    pub epoch: f64,
    /// Mean training loss over the step's tokens.
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(default)]
    pub grad_norm: Option<f64>,
    /// Tokens (non-padding) processed per second.
    pub tokens_per_s: f64,
    /// Examples processed per second.
    pub samples_per_s: f64,
    /// Wall time of the step, ms.
    pub step_ms: f64,
    /// Time the step waited for its batch, ms.
    #[serde(default)]
    pub data_wait_ms: f64,
    /// GPU telemetry, when a GPU is present.
    #[serde(default)]
    pub gpu: Option<GpuSample>,
    /// The worker process on the CPU (every job; the host side of a GPU job).
    #[serde(default)]
    pub cpu: Option<CpuSample>,
    /// When the step ended (ms since the epoch).
    pub at_ms: u64,
}

/// Something that happened, as stored in the journal and pushed to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Journal-wide, strictly increasing sequence number.
    pub seq: u64,
    /// The job it concerns, if any.
    #[serde(default)]
    pub job: Option<JobId>,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    /// What happened.
    pub body: EventBody,
}

/// The kinds of event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A job changed state.
    StateChanged {
        /// Previous state.
        from: JobState,
        /// New state.
        to: JobState,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
    /// A training step's metrics.
    Metrics {
        /// The point.
        point: MetricPoint,
    },
    /// Text appended to the job's log.
    Log {
        /// Byte offset of `text` in job.log.
        offset: u64,
        /// The text.
        text: String,
    },
    /// A checkpoint of the job was written (resume and export can use it).
    Checkpoint {
        /// The optimizer step it holds.
        step: u64,
        /// Its name (`step-N`), as `resume --checkpoint` takes it.
        name: String,
    },
    /// Progress of an export of the job (a line the exporter printed, or its start and end).
    Export {
        /// The format being exported.
        format: String,
        /// The line.
        text: String,
    },
    /// Something worth telling people.
    Notice {
        /// "info", "warn" or "error".
        level: String,
        /// The message.
        text: String,
    },
}
