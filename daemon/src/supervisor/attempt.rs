//! One attempt of one job: spawn `lorad worker`, feed it its task, record what it reports, and record
//! how it ended.
use crate::channel::{FromWorker, ToWorker, CONTROL_FD};
use crate::core::{Core, WorkerHandle};
use crate::identity::Identity;
use crate::logs;
use crate::plugins::PluginRef;
use crate::scheduler::{self, AfterExit, Ending};
use crate::worker::process::Mode;
use crate::worker::{Phase, TrainEvent, TrainTask};
use command_fds::{CommandFdExt, FdMapping};
use lorad_schema::{frame, EventBody, JobId, JobRecord, JobState};
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A process or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The control descriptor could not be mapped.
    #[error("cannot pass the control channel: {0}")]
    Fd(String),
    /// The task could not be sent.
    #[error("cannot send the task: {0}")]
    Frame(#[from] frame::FrameError),
    /// The job's owner cannot be run as.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

impl SpawnError {
    /// Whether the disk was full (ENOSPC, or the owner's quota).
    pub fn no_space(&self) -> bool {
        matches!(self, SpawnError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Io { what, source }
}

/// A started worker.
pub struct Running {
    child: Child,
    control: UnixStream,
    stop: CancellationToken,
    /// No progress for this long while training = stalled (3x while loading or saving).
    stall_timeout: std::time::Duration,
    /// job.log, and where this attempt's part of it starts (its separator).
    log_path: PathBuf,
    log_offset: u64,
}

/// Starts the worker for `job` and registers it in `core.workers`.
pub async fn spawn(core: &Core, job: &JobRecord, why: &str) -> Result<Running, SpawnError> {
    let job_dir = core.config.job_dir(job.id);
    let log_path = logs::log_path(&job_dir);
    // Resume from the checkpoint the user named, else from the newest one (none: a fresh start).
    let resume_from = match &job.resume_checkpoint {
        Some(name) => lorad_schema::layout::JobDir::new(&job_dir)
            .checkpoint(name)
            .ok(),
        // The newest checkpoint whose steps are all in the journal: one written after a step the
        // journal could not record (a full disk, a killed daemon) would skip that step's point.
        None => crate::worker::checkpoint::latest_checkpoint_at_most(&job_dir, job.progress.step),
    };
    let from = match &resume_from {
        Some(dir) => format!(
            "resuming from {}",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
        None => "from the start".to_string(),
    };
    let separator = logs::separator(&format!("{why}; {from}"));
    let owner = job.owner_uid;
    let (who, log, log_offset) = {
        let (log_path, job_dir) = (log_path.clone(), job_dir.clone());
        tokio::task::spawn_blocking(move || -> Result<_, SpawnError> {
            let who = crate::identity::for_owner(owner)?;
            let ids = who.as_ref().map(|w| (w.uid, w.gid));
            logs::prepare_job_dir(&job_dir, ids).map_err(io("make the job directory"))?;
            let log = logs::open_append(&log_path, ids).map_err(io("open job.log"))?;
            let before = log.metadata().map(|m| m.len()).unwrap_or(0);
            (&log)
                .write_all(separator.as_bytes())
                .map_err(io("write job.log"))?;
            Ok((who, log, before))
        })
        .await
        .map_err(|e| SpawnError::Io {
            what: "open job.log",
            source: std::io::Error::other(e),
        })??
    };

    let (child, mut control) = start_worker(
        core,
        Mode::Train,
        who.as_ref(),
        Stdio::from(log.try_clone().map_err(io("dup job.log"))?),
        Stdio::from(log),
    )?;
    let pid = child.id().unwrap_or(0);
    let task = TrainTask {
        job: job.id,
        base_model: PathBuf::from(&job.base_model),
        dataset: PathBuf::from(&job.dataset),
        adapter_dir: PathBuf::from(&job.output_dir),
        job_dir,
        settings: job.settings.clone(),
        resume_from,
    };
    // A dataset whose extension a dataloader plugin claims is read by that plugin, in the worker.
    let dataloader = core
        .plugins()
        .dataloader_for(&task.dataset)
        .map(|d| PluginRef {
            library: d.lib.path.clone(),
            name: d.lib.name.clone(),
            format: d.format.name,
        });
    frame::write_msg_async(&mut control, &ToWorker::Train { task, dataloader }).await?;

    let stop = CancellationToken::new();
    if let Ok(mut workers) = core.workers.lock() {
        workers.insert(
            job.id,
            WorkerHandle {
                pid,
                stop: stop.clone(),
            },
        );
    }
    tracing::info!(job = %job.id, pid, "worker started");
    Ok(Running {
        child,
        control,
        stop,
        stall_timeout: std::time::Duration::from_secs(job.settings.stall_timeout),
        log_path,
        log_offset,
    })
}

/// Starts `lorad worker [--export|--check]` in its own process group with the control channel on fd
/// 3, as `who` (None: as the daemon) with a minimal environment.
pub(super) fn start_worker(
    core: &Core,
    mode: Mode,
    who: Option<&Identity>,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<(Child, UnixStream), SpawnError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair"))?;
    let mut cmd = tokio::process::Command::new(&core.config.worker_exe);
    cmd.arg("worker");
    match mode {
        Mode::Train => {}
        Mode::Export => {
            cmd.arg("--export");
        }
        Mode::Check => {
            cmd.arg("--check");
        }
    }
    crate::identity::apply(&mut cmd, who);
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env(
            "RUST_LOG",
            std::env::var("LORAD_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("LORAD_SOCKET")
        .process_group(0)
        .kill_on_drop(true);
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs.into(),
        child_fd: CONTROL_FD,
    }])
    .map_err(|e| SpawnError::Fd(e.to_string()))?;
    let child = cmd.spawn().map_err(io("spawn lorad worker"))?;
    // Drop our copy of the worker's end, so that its exit closes the channel.
    drop(cmd);
    ours.set_nonblocking(true).map_err(io("control channel"))?;
    let control = UnixStream::from_std(ours).map_err(io("control channel"))?;
    Ok((child, control))
}

/// Why a worker gave up, as it reported.
enum Failure {
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
async fn tail_log(
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
            if published.is_err() || (cut as u64) < logs::MAX_LOG_CHUNK / 2 {
                break;
            }
        }
        if last {
            return;
        }
    }
}

async fn watch_worker(core: &Arc<Core>, id: JobId, running: &mut Running) {
    let mut failure: Option<Failure> = None;
    let mut finished = false;
    let mut stopped = false;
    // The stall watchdog: every report from the engine (phase, plan, step, checkpoint) is progress.
    let mut last_progress = tokio::time::Instant::now();
    let mut phase = Phase::Loading;
    let mut stalled: Option<String> = None;
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
                handle(core, id, pid, msg, &mut failure, &mut finished).await
            }
            Err(frame::FrameError::Closed) => break,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "worker channel broke");
                break;
            }
        }
    }
    if !stopped {
        // The channel closed: the worker is exiting. Still honour a stop that arrives meanwhile.
        tokio::select! {
            _ = running.child.wait() => {}
            _ = running.stop.cancelled() => terminate(&mut running.child, core.config.kill_grace).await,
        }
    }
    let status = running.child.wait().await;
    let how = match &status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(0), _) => "exited normally".to_string(),
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    };
    tracing::info!(job = %id, "worker {how}");
    if finished || core.shutdown.is_cancelled() {
        return;
    }
    // A job paused or cancelled meanwhile was stopped on purpose: nothing to record.
    let Ok(job) = core.read(move |j| j.job(id)).await else {
        return;
    };
    if !job.state.is_active() {
        return;
    }
    let ending = match failure {
        Some(Failure::NoSpace { dir, message }) => Ending::NoSpace { dir, message },
        Some(Failure::Failed(msg)) => Ending::Refused(msg),
        None => match stalled {
            Some(why) => Ending::Stalled(why),
            None => Ending::Crashed(how),
        },
    };
    let (to, reason, restart) = match scheduler::after_exit(&job, ending) {
        AfterExit::Pause(reason) => (JobState::Paused, reason, false),
        AfterExit::Fail(reason) => (JobState::Failed, reason, false),
        AfterExit::Restart(reason) => (JobState::Queued, reason, true),
    };
    tracing::warn!(job = %id, state = %to, %reason, "worker ended");
    let outcome = record_until_written(core, id, to, Some(reason), move |job| {
        if restart {
            job.progress.restarts += 1;
            job.requeued = true;
        }
    })
    .await;
    if let Err(e) = outcome {
        tracing::error!(job = %id, error = %e, "cannot record how the worker ended");
    }
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
async fn pause_for_space(core: &Core, id: JobId) {
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

/// Records one report of the worker `pid` (the process the supervisor started: what a worker says
/// about itself, it runs as the job's owner, is not trusted for anything the daemon acts on as root).
async fn handle(
    core: &Core,
    id: JobId,
    pid: u32,
    msg: FromWorker,
    failure: &mut Option<Failure>,
    finished: &mut bool,
) {
    let result = match msg {
        FromWorker::Ready { pid: said } => {
            tracing::debug!(job = %id, pid, said, "worker ready");
            core.write(move |j| Ok((j.update_job(id, |job| job.worker_pid = Some(pid))?, vec![])))
                .await
                .map(|_| ())
        }
        FromWorker::Train {
            event: TrainEvent::Phase {
                phase: Phase::Training,
            },
        } => {
            let job = core.read(move |j| j.job(id)).await;
            match job {
                Ok(job) if job.state == JobState::Initializing => {
                    record_until_written(core, id, JobState::Running, None, |_| {})
                        .await
                        .map(|_| ())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        FromWorker::Train {
            event: TrainEvent::Phase { .. },
        } => Ok(()),
        FromWorker::Train {
            event: TrainEvent::Checkpoint { step, path },
        } => {
            tracing::info!(job = %id, step, path = %path.display(), "checkpoint written");
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            core.write(move |j| {
                Ok((
                    (),
                    vec![j.append_event(Some(id), EventBody::Checkpoint { step, name })?],
                ))
            })
            .await
        }
        FromWorker::Train {
            event: TrainEvent::Plan { total_steps, .. },
        } => core
            .write(move |j| {
                Ok((
                    j.update_job(id, |job| job.progress.total_steps = total_steps)?,
                    vec![],
                ))
            })
            .await
            .map(|_| ()),
        FromWorker::Train {
            event: TrainEvent::Step { point },
        } => {
            let record = |point: lorad_schema::MetricPoint| {
                core.write(move |j| {
                    Ok(match j.record_metric(id, point)? {
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
        FromWorker::Finished { adapter_dir, steps } => {
            *finished = true;
            record_until_written(
                core,
                id,
                JobState::Completed,
                Some(format!("trained {steps} steps")),
                move |job| {
                    job.adapter_dir = Some(adapter_dir.clone());
                    job.progress.eta_s = Some(0.0);
                },
            )
            .await
            .map(|_| ())
        }
        FromWorker::Stopped { step } => {
            tracing::info!(job = %id, step, "worker stopped after a checkpoint");
            Ok(())
        }
        FromWorker::Failed { message } => {
            *failure = Some(Failure::Failed(message));
            Ok(())
        }
        FromWorker::NoSpace { dir, message } => {
            *failure = Some(Failure::NoSpace { dir, message });
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
