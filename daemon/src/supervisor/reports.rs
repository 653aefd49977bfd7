//! What a training worker reports, recorded in the journal: its pid, the plan, each step's metrics,
//! checkpoints, the start of training and the end it says it came to.
use crate::channel::FromWorker;
use crate::core::Core;
use crate::energy::Meter;
use crate::journal::JournalError;
use crate::scheduler::Slot;
use crate::worker::{Phase, TrainEvent};
use lorad_schema::{EventBody, JobId, JobRecord, JobState, MetricPoint};
use std::sync::Arc;

/// Why a worker gave up, as it reported.
pub(super) enum Failure {
    /// The engine refused the job: failed, no restart.
    Failed(String),
    /// A disk is full: paused.
    NoSpace {
        /// The full directory.
        dir: String,
        /// The write error.
        message: String,
    },
}

/// What an attempt measures besides the worker's own reports: its device's telemetry and its energy.
#[derive(Clone)]
pub(super) struct Attempt {
    slot: Slot,
    meter: Meter,
}

impl Attempt {
    /// Starts metering job `id`'s attempt on `slot` (its energy so far counts on).
    pub(super) async fn start(core: &Arc<Core>, id: JobId, slot: Slot) -> Attempt {
        let before = core
            .read(move |j| j.job(id))
            .await
            .ok()
            .and_then(|job| job.progress.energy_j);
        let c = core.clone();
        let meter = tokio::task::spawn_blocking(move || Meter::start(&c, slot, before))
            .await
            .unwrap_or_else(|e| Meter::not_measured(format!("meter did not start: {e}")));
        tracing::info!(job = %id, device = %slot.device(), energy = %meter.source, "attempt metered");
        Attempt { slot, meter }
    }
}

/// What the worker's reports said about how the attempt ends.
#[derive(Default)]
pub(super) struct Seen {
    /// It gave up, and why.
    pub failure: Option<Failure>,
    /// It finished: the adapter is written.
    pub finished: bool,
}

/// Records one report of the worker `pid` (the process the supervisor started: what a worker says
/// about itself, it runs as the job's owner, is not trusted for anything the daemon acts on as root).
pub(super) async fn handle(
    core: &Arc<Core>,
    id: JobId,
    pid: u32,
    msg: FromWorker,
    seen: &mut Seen,
    attempt: &Attempt,
) {
    let result = match msg {
        FromWorker::Ready { pid: said } => {
            tracing::debug!(job = %id, pid, said, "worker ready");
            core.write(move |j| Ok((j.update_job(id, |job| job.worker_pid = Some(pid))?, vec![])))
                .await
                .map(|_| ())
        }
        FromWorker::Train { event } => train_event(core, id, event, attempt).await,
        FromWorker::Finished { adapter_dir, steps } => {
            seen.finished = true;
            finished(core, id, adapter_dir, steps).await
        }
        FromWorker::Stopped { step } => {
            tracing::info!(job = %id, step, "worker stopped after a checkpoint");
            Ok(())
        }
        FromWorker::Failed { message } => {
            seen.failure = Some(Failure::Failed(message));
            Ok(())
        }
        FromWorker::NoSpace { dir, message } => {
            seen.failure = Some(Failure::NoSpace { dir, message });
            Ok(())
        }
        FromWorker::Exported { .. } | FromWorker::Checked { .. } | FromWorker::Refused { .. } => {
            tracing::warn!(job = %id, "a training worker reported another task's result; ignored");
            Ok(())
        }
    };
    if let Err(e) = result {
        // E.g. a step reported after the job was cancelled: the journal refuses, nothing to do.
        tracing::debug!(job = %id, error = %e, "worker report not recorded");
    }
}

/// Records one of the engine's events: the start of training, the plan, a step, a checkpoint.
async fn train_event(
    core: &Arc<Core>,
    id: JobId,
    event: TrainEvent,
    attempt: &Attempt,
) -> Result<(), JournalError> {
    match event {
        TrainEvent::Phase {
            phase: Phase::Training,
        } => match core.read(move |j| j.job(id)).await? {
            job if job.state == JobState::Initializing => {
                record_until_written(core, id, JobState::Running, None, |_| {})
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        },
        TrainEvent::Phase { .. } => Ok(()),
        TrainEvent::Checkpoint { step, path } => {
            tracing::info!(job = %id, step, path = %path.display(), "checkpoint written");
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            core.write(move |j| {
                let event = j.append_event(Some(id), EventBody::Checkpoint { step, name })?;
                Ok(((), vec![event]))
            })
            .await
        }
        TrainEvent::Plan { total_steps, .. } => core
            .write(move |j| {
                let job = j.update_job(id, |job| job.progress.total_steps = total_steps)?;
                Ok((job, vec![]))
            })
            .await
            .map(|_| ()),
        TrainEvent::Step { point } => step(core, id, point, attempt).await,
    }
}

/// Records a step's metrics, with its GPU's telemetry and the job's energy and cost so far; on a full
/// disk, once more after the journal freed its reserve, then the job pauses.
async fn step(
    core: &Arc<Core>,
    id: JobId,
    mut point: MetricPoint,
    attempt: &Attempt,
) -> Result<(), JournalError> {
    let (c, a) = (core.clone(), attempt.clone());
    let measured = tokio::task::spawn_blocking(move || {
        let gpu = match a.slot {
            Slot::Gpu(n) => c.devices.sample(n),
            // A Slurm node's devices are not this machine's: not sampled here.
            Slot::Cpu | Slot::Slurm => None,
        };
        (gpu, a.meter.joules(&c))
    })
    .await;
    let (gpu, joules) = measured.unwrap_or((None, None));
    point.gpu = gpu;
    let source = attempt.meter.source.clone();
    let (per_kwh, per_hour) = (core.config.price_per_kwh, core.config.price_per_hour);
    let record = |point: MetricPoint| {
        let source = source.clone();
        core.write(move |j| {
            let usage = move |job: &mut JobRecord| {
                let p = &mut job.progress;
                p.energy_j = joules;
                p.energy_source = Some(source);
                p.cost = crate::energy::cost(joules, p.active_s, per_kwh, per_hour);
            };
            Ok(match j.record_metric_and(id, point, usage)? {
                Some((_, event)) => ((), vec![event]),
                None => ((), vec![]),
            })
        })
    };
    match record(point.clone()).await {
        Err(e) if crate::journal::is_storage_error(&e) => {
            // The write reopened the journal and freed the reserve: once more, then stop.
            let again = record(point).await;
            pause_for_space(core, id).await;
            again
        }
        other => other,
    }
}

/// The adapter is written: the job is complete.
async fn finished(
    core: &Core,
    id: JobId,
    adapter_dir: String,
    steps: u64,
) -> Result<(), JournalError> {
    let reason = Some(format!("trained {steps} steps"));
    record_until_written(core, id, JobState::Completed, reason, move |job| {
        job.adapter_dir = Some(adapter_dir.clone());
        job.progress.eta_s = Some(0.0);
    })
    .await
    .map(|_| ())
}

/// A transition that must not be lost: one that fails in the storage (a full disk) is tried again
/// every 2 s until it is written or the daemon shuts down, so a job is never left running without a
/// worker. Other refusals (the state machine's) return at once.
pub(super) async fn record_until_written(
    core: &Core,
    id: JobId,
    to: JobState,
    reason: Option<String>,
    edit: impl Fn(&mut JobRecord) + Clone + Send + 'static,
) -> Result<JobRecord, crate::journal::JournalError> {
    loop {
        let edit = edit.clone();
        match core
            .transition(id, to, reason.clone(), move |j| edit(j))
            .await
        {
            Err(e) if crate::journal::is_storage_error(&e) && !core.shutdown.is_cancelled() => {
                tracing::warn!(job = %id, error = %e, "cannot record the job's state yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            other => return other,
        }
    }
}

/// The journal could not record a step of job `id` for lack of space: pause the job (its reason says
/// where space ran out) and stop its worker, which checkpoints if it can. A job resumes from its
/// newest checkpoint no later than its last recorded step, so a step whose point was lost is done
/// again, and every step's point is recorded exactly once in the end.
pub(super) async fn pause_for_space(core: &Core, id: JobId) {
    let dir = core.config.state_dir.display().to_string();
    let reason = format!(
        "no space left on device in {dir}: the journal cannot record progress; free some space, then `loractl resume {id}`"
    );
    // Stop first: the worker must not go on filling the space just freed for this record. (The
    // watch loop acts on the stop only after this returns, when the job is already paused.)
    if let Some(worker) = core.worker(id) {
        worker.stop.cancel();
    }
    let paused = record_until_written(core, id, JobState::Paused, Some(reason), |_| {}).await;
    if let Err(e) = paused {
        tracing::warn!(job = %id, error = %e, "cannot pause the job");
    }
}
