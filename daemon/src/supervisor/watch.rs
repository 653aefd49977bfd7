//! Following a training worker: its reports, the stall watchdog, stops on request, its log tailed
//! into `log` events, and what its exit means for the job (`scheduler::after_exit`).
use super::attempt::Running;
use super::reports::{self, record_until_written, Failure, Seen};
use crate::channel::FromWorker;
use crate::core::Core;
use crate::logs;
use crate::scheduler::{self, AfterExit, Ending};
use crate::worker::{Phase, TrainEvent};
use lorad_schema::{frame, EventBody, JobId, JobState};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// Follows the worker until it exits, recording its reports; stops it when asked.
pub async fn watch(core: Arc<Core>, id: JobId, mut running: Running) {
    let log_done = CancellationToken::new();
    let tail = tokio::spawn(tail_log(
        core.clone(),
        id,
        running.log_path.clone(),
        running.log_offset,
        log_done.clone(),
    ));
    watch_worker(&core, id, &mut running).await;
    log_done.cancel();
    let _ = tail.await;
}

/// Publishes what the worker appends to job.log as `log` events (whole lines; the rest at the end),
/// so that subscribers follow the log live, across attempts.
pub(super) async fn tail_log(
    core: Arc<Core>,
    id: JobId,
    path: PathBuf,
    mut offset: u64,
    done: CancellationToken,
) {
    loop {
        let last = tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => false,
            _ = done.cancelled() => true,
        };
        loop {
            let p = path.clone();
            let Ok(Ok((text, _, _))) = tokio::task::spawn_blocking(move || {
                logs::read_chunk(&p, offset, logs::MAX_LOG_CHUNK)
            })
            .await
            else {
                break;
            };
            // Whole lines only, unless the attempt is over.
            let cut = if last {
                text.len()
            } else {
                text.rfind('\n').map(|i| i + 1).unwrap_or(0)
            };
            if cut == 0 {
                break;
            }
            let chunk = text[..cut].to_string();
            let at = offset;
            offset += chunk.len() as u64;
            let published = core
                .write(move |j| {
                    Ok((
                        (),
                        vec![j.append_event(
                            Some(id),
                            EventBody::Log {
                                offset: at,
                                text: chunk,
                            },
                        )?],
                    ))
                })
                .await;
            if let Err(e) = &published {
                // The write gave the reserve back to record this: the disk is full. Pause as a
                // step's lost point does, instead of training on into the reserve's space.
                if crate::journal::is_storage_error(e) && !last {
                    super::reports::pause_for_space(&core, id).await;
                }
            }
            if published.is_err() || (cut as u64) < logs::MAX_LOG_CHUNK / 2 {
                break;
            }
        }
        if last {
            return;
        }
    }
}

/// How an attempt's worker was followed to its end.
struct Followed {
    seen: Seen,
    /// The supervisor stopped it (a stop request, or the watchdog).
    stopped: bool,
    /// The watchdog killed it, and why.
    stalled: Option<String>,
}

async fn watch_worker(core: &Arc<Core>, id: JobId, running: &mut Running) {
    let followed = follow(core, id, running).await;
    if !followed.stopped {
        // The channel closed: the worker is exiting. Still honour a stop that arrives meanwhile.
        tokio::select! {
            _ = running.child.wait() => {}
            _ = running.stop.cancelled() => terminate(&mut running.child, core.config.kill_grace).await,
        }
    }
    let how = describe_exit(&running.child.wait().await);
    tracing::info!(job = %id, "worker {how}");
    if followed.seen.finished {
        return;
    }
    let ending = match (followed.seen.failure, followed.stalled) {
        (Some(Failure::NoSpace { dir, message }), _) => Ending::NoSpace { dir, message },
        (Some(Failure::Failed(msg)), _) => Ending::Refused(msg),
        (None, Some(why)) => Ending::Stalled(why),
        (None, None) => Ending::Crashed(how),
    };
    conclude(core, id, ending).await;
}

/// Records what the end of an attempt means for job `id` (`scheduler::after_exit`), unless the daemon
/// is shutting down or the job was paused or cancelled meanwhile (stopped on purpose).
pub(super) async fn conclude(core: &Arc<Core>, id: JobId, ending: Ending) {
    if core.shutdown.is_cancelled() {
        return;
    }
    let Ok(job) = core.read(move |j| j.job(id)).await else {
        return;
    };
    if !job.state.is_active() {
        return;
    }
    let (to, reason, restart) = match scheduler::after_exit(&job, ending) {
        AfterExit::Pause(reason) => (JobState::Paused, reason, false),
        AfterExit::Fail(reason) => (JobState::Failed, reason, false),
        AfterExit::Restart(reason) => (JobState::Queued, reason, true),
        AfterExit::Resume(reason) => (JobState::Queued, reason, false),
    };
    tracing::warn!(job = %id, state = %to, %reason, "worker ended");
    let outcome = record_until_written(core, id, to, Some(reason), move |job| {
        if restart {
            job.progress.restarts += 1;
        }
        if to == JobState::Queued {
            job.requeued = true;
        }
    })
    .await;
    if let Err(e) = outcome {
        tracing::error!(job = %id, error = %e, "cannot record how the worker ended");
    }
}

/// Reads the worker's reports until its channel closes, stopping it when asked or when it makes no
/// progress (every report from the engine is progress) for the phase's bound.
async fn follow(core: &Arc<Core>, id: JobId, running: &mut Running) -> Followed {
    let (mut seen, mut stopped, mut stalled) = (Seen::default(), false, None);
    let attempt = reports::Attempt::start(core, id, running.slot).await;
    let mut last_progress = tokio::time::Instant::now();
    let mut phase = Phase::Loading;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        let msg = tokio::select! {
            msg = frame::read_msg_async::<FromWorker, _>(&mut running.control, frame::MAX_FRAME) => msg,
            _ = running.stop.cancelled(), if !stopped => {
                stopped = true;
                terminate(&mut running.child, core.config.kill_grace).await;
                continue;
            }
            _ = tick.tick(), if !stopped => {
                let bound = match phase {
                    Phase::Training => running.stall_timeout,
                    Phase::Loading | Phase::Saving => running.stall_timeout * 3,
                };
                if last_progress.elapsed() > bound {
                    let reason = format!("stalled: no progress for {} s while {phase:?}", bound.as_secs()).to_lowercase();
                    tracing::warn!(job = %id, %reason, "killing the worker");
                    stalled = Some(reason);
                    stopped = true;
                    terminate(&mut running.child, core.config.kill_grace).await;
                }
                continue;
            }
        };
        if let Ok(FromWorker::Train { event }) = &msg {
            last_progress = tokio::time::Instant::now();
            if let TrainEvent::Phase { phase: p } = event {
                phase = *p;
            }
        }
        match msg {
            Ok(msg) => {
                let pid = running.child.id().unwrap_or(0);
                reports::handle(core, id, pid, msg, &mut seen, &attempt).await
            }
            Err(frame::FrameError::Closed) => break,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "worker channel broke");
                break;
            }
        }
    }
    Followed {
        seen,
        stopped,
        stalled,
    }
}

/// How a process ended, in words for the log and the job's reason.
fn describe_exit(status: &std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(0), _) => "exited normally".to_string(),
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// SIGTERM to the worker's process group, SIGKILL after `grace`.
async fn terminate(child: &mut Child, grace: std::time::Duration) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let Some(pid) = child.id() else { return };
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| format!(" ({s})"))
        .unwrap_or_default()
}
