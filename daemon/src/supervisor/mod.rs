//! The supervisor: starts the next queued job when the device is free, and stops workers on request.
//!
//! One job runs at a time (one device). The loop sleeps until something kicks it (a submit, a worker
//! that ended, a cancel) and never polls.
mod attempt;
pub mod check;
pub mod export;
mod reports;
pub mod slurm;
mod watch;

use crate::core::Core;
use crate::scheduler::{self, Slot};
use lorad_schema::{JobId, JobState};
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Runs until the daemon shuts down; then stops every worker and waits for them.
pub async fn run(core: Arc<Core>) {
    let tracker = TaskTracker::new();
    reattach(&core, &tracker).await;
    loop {
        if core.shutdown.is_cancelled() {
            break;
        }
        let busy: Vec<Slot> = core
            .workers
            .lock()
            .map(|w| w.values().map(|h| h.slot).collect())
            .unwrap_or_default();
        let mut waiting = false;
        let mut wake = None;
        match core.read(|j| j.jobs()).await {
            Ok(jobs) => {
                if !crate::queue::doomed(&jobs).is_empty() {
                    cancel_dependants(&core).await;
                    continue;
                }
                let cap = capacity(&core).await;
                let max = core.config.limits.max_running_per_user;
                let now = lorad_schema::now_ms();
                if let Some((id, slot)) = scheduler::next_start(&jobs, &busy, &cap, max, now) {
                    start(&core, &tracker, id, slot).await;
                    continue;
                }
                let states = crate::queue::states(&jobs);
                waiting = jobs
                    .iter()
                    .any(|j| crate::queue::may_start(j, &states, now));
                wake = crate::queue::next_wake(&jobs, now).map(|t| t.saturating_sub(now));
            }
            Err(e) => tracing::error!(error = %e, "cannot read the queue"),
        }
        // Free memory changes without an event (other processes): a job waiting for it is looked at
        // again every few seconds; a job with a start time is looked at when it comes; otherwise the
        // loop sleeps until kicked (a submit, a worker's end, a prerequisite's end).
        let recheck = std::time::Duration::from_secs(if waiting { 5 } else { 3600 });
        let recheck = wake
            .map(|ms| std::time::Duration::from_millis(ms + 1).min(recheck))
            .unwrap_or(recheck);
        tokio::select! {
            _ = core.kick.notified() => {}
            _ = tokio::time::sleep(recheck) => {}
            _ = core.shutdown.cancelled() => break,
        }
    }
    crate::systemd::stopping();
    // Shutdown: stop the workers. Their jobs stay initializing/running in the journal, and the next
    // start of the daemon deals with them (recovery).
    if let Ok(workers) = core.workers.lock() {
        for handle in workers.values() {
            handle.stop.cancel();
        }
    }
    tracker.close();
    // The workers are writing their stop checkpoints (each gets `kill_grace` before SIGKILL): systemd
    // hears that the stop takes longer, for as long as any of them runs.
    let extend = core.config.kill_grace + std::time::Duration::from_secs(10);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    while !tracker.is_empty() {
        tokio::select! {
            _ = tick.tick() => crate::systemd::extend_timeout(extend),
            _ = tracker.wait() => break,
        }
    }
}

/// What the devices offer now: CPU slots and the memory available to a new job (MemAvailable), each
/// GPU with its free memory.
async fn capacity(core: &Arc<Core>) -> scheduler::Capacity {
    let c = core.clone();
    tokio::task::spawn_blocking(move || scheduler::Capacity {
        cpu_slots: c.config.cpu_slots,
        cpu_free: crate::devices::meminfo("MemAvailable"),
        gpus: c
            .devices
            .gpus
            .iter()
            .map(|g| (g.index, c.devices.free_memory(g.index)))
            .collect(),
        auto_cpu: c.config.auto_cpu,
        slurm_default: c.config.executor == crate::config::Executor::Slurm,
    })
    .await
    .unwrap_or(scheduler::Capacity {
        cpu_slots: core.config.cpu_slots,
        cpu_free: None,
        gpus: Vec::new(),
        auto_cpu: core.config.auto_cpu,
        slurm_default: core.config.executor == crate::config::Executor::Slurm,
    })
}

/// Follows again the Slurm jobs of attempts a previous daemon started (`recover` left those jobs
/// running): no second attempt is submitted while Slurm still has one.
async fn reattach(core: &Arc<Core>, tracker: &TaskTracker) {
    let Ok(jobs) = core.read(|j| j.jobs()).await else {
        return;
    };
    for job in jobs
        .into_iter()
        .filter(|j| j.state.is_active() && j.progress.slurm.is_some())
    {
        if let Some(running) = slurm::reattach(core, &job).await {
            let (core, id) = (core.clone(), job.id);
            tracker.spawn(async move {
                slurm::watch(core.clone(), id, running).await;
                if let Ok(mut w) = core.workers.lock() {
                    w.remove(&id);
                }
                core.kick.notify_one();
            });
        }
    }
}

/// A started attempt, by executor.
enum Started {
    Local(attempt::Running),
    Slurm(slurm::SlurmRunning),
}

async fn start(core: &Arc<Core>, tracker: &TaskTracker, id: JobId, slot: Slot) {
    // Why the job was queued (resumed, retried, crashed, daemon restarted), for the log's separator.
    let why = match core.read(move |j| j.job(id)).await {
        Ok(job) => job.reason.unwrap_or_else(|| "fresh start".into()),
        Err(_) => "fresh start".into(),
    };
    let job = match core
        .transition(id, JobState::Initializing, None, move |job| {
            job.requeued = false;
            job.progress.device = Some(slot.device());
            // Set again once a Slurm attempt is submitted.
            job.progress.slurm = None;
        })
        .await
    {
        Ok(job) => job,
        Err(e) => {
            // Cancelled between the read and now: nothing to start. Or the journal cannot write (a
            // full disk): wait before the loop tries again, instead of spinning.
            tracing::warn!(job = %id, error = %e, "cannot start job");
            if crate::journal::is_storage_error(&e) {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            return;
        }
    };
    let started = match slot {
        Slot::Slurm => slurm::spawn(core, &job, &why).await.map(Started::Slurm),
        _ => attempt::spawn(core, &job, &why, slot)
            .await
            .map(Started::Local),
    };
    match started {
        Ok(running) => {
            // A cancel that committed before the worker was registered found nothing to stop: look again.
            if let Ok(job) = core.read(move |j| j.job(id)).await {
                if !job.state.is_active() {
                    stop(core, id);
                }
            }
            let core = core.clone();
            tracker.spawn(async move {
                match running {
                    Started::Local(r) => watch::watch(core.clone(), id, r).await,
                    Started::Slurm(r) => slurm::watch(core.clone(), id, r).await,
                }
                if let Ok(mut w) = core.workers.lock() {
                    w.remove(&id);
                }
                core.kick.notify_one();
            });
        }
        Err(e) => {
            // A full disk (the job's log cannot be written) pauses the job like a worker's full
            // disk does; anything else fails it.
            let (to, reason) = if e.no_space() {
                let dir = core.config.job_dir(id).display().to_string();
                (
                    JobState::Paused,
                    format!("no space left on device in {dir}: free some space, then `loractl resume {id}` (cannot start worker: {e})"),
                )
            } else {
                (JobState::Failed, format!("cannot start worker: {e}"))
            };
            tracing::error!(job = %id, %reason);
            if let Err(e) = reports::record_until_written(core, id, to, Some(reason), |_| {}).await
            {
                tracing::error!(job = %id, error = %e, "cannot record why the job did not start");
            }
            core.kick.notify_one();
        }
    }
}

/// Cancels jobs whose prerequisites will never complete, each with its reason. The loop's snapshot
/// only says that there are some: which ones is decided again under the journal's write lock, so a
/// prerequisite retried (or a dependant cancelled by its owner) since the snapshot is seen.
async fn cancel_dependants(core: &Arc<Core>) {
    let cancelled = core
        .write(|j| {
            let mut records = Vec::new();
            let mut events = Vec::new();
            for (id, reason) in crate::queue::doomed(&j.jobs()?) {
                let (job, event) = j.transition(id, JobState::Cancelled, Some(reason), |_| {})?;
                records.push(job);
                events.push(event);
            }
            Ok((records, events))
        })
        .await;
    match cancelled {
        Ok(records) => {
            for job in records {
                tracing::info!(job = %job.id, reason = job.reason.as_deref().unwrap_or(""), "dependant cancelled");
                core.keep_record(&job).await;
            }
        }
        Err(e) => {
            // The loop comes straight back here: not in a spin.
            tracing::warn!(error = %e, "cannot cancel dependants");
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    }
}

/// Stops the worker of `job`, if one runs (SIGTERM, then SIGKILL after the grace). Returns at once.
pub fn stop(core: &Core, job: JobId) {
    if let Some(handle) = core.worker(job) {
        handle.stop.cancel();
    }
}
