//! `lorad worker`: reads its task from the control channel, trains, reports, exits.
//!
//! The worker exits by itself when the channel closes (the daemon died): a reader thread watches it, so
//! an orphaned worker never keeps training or holding a device.
use crate::channel::{ExportTask, FromWorker, ToWorker, CONTROL_FD};
use crate::plugins::source::PluginSource;
use crate::plugins::PluginRef;
use crate::worker::error::EngineError;
use crate::worker::{train, TrainTask};
use lorad_plugin::{methods, ExportResponse};
use lorad_schema::frame::{self, FrameError};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// fd 3 is not an open socket: `lorad worker` is internal and started only by the daemon.
    #[error("no control channel on fd {CONTROL_FD}: `lorad worker` is started by the daemon, not by hand")]
    NoChannel,
    /// The channel broke.
    #[error("control channel: {0}")]
    Channel(#[from] FrameError),
    /// The channel could not be duplicated.
    #[error("control channel: {0}")]
    Io(#[from] std::io::Error),
}

/// What a worker process was started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Train one job.
    Train,
    /// Run one export (`--export`).
    Export,
    /// Check a job's files at submit (`--check`).
    Check,
}

/// Runs the worker in `mode`; returns the process exit code.
pub fn run(mode: Mode) -> Result<i32, WorkerError> {
    crate::worker::runtime::tune_allocator();
    // Not dumpable: its owner cannot ptrace it to forge what it tells the root daemon, and it leaves
    // no core file with their data in a place they did not choose.
    // SAFETY: prctl(PR_SET_DUMPABLE) only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let stream = control_channel()?;
    run_on_stream(mode, stream)
}

/// Trains the task in `dir` (`lorad worker --channel-dir DIR`, on a node of a Slurm cluster): the
/// task is `DIR/task.msgpack` (one frame), reports are appended as frames to `DIR/events` (see
/// `crate::file_channel`). The daemon may be gone and come back meanwhile: nothing here depends on
/// it. A task not pinned to a checkpoint resumes from the job's newest one, so a run Slurm requeued
/// (preempted, or at its time limit after the pre-kill signal's checkpoint) goes on from there.
pub fn run_in_dir(dir: &std::path::Path) -> Result<i32, WorkerError> {
    crate::worker::runtime::tune_allocator();
    // SAFETY: as in `run`.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let task_path = dir.join(crate::file_channel::TASK_FILE);
    let mut file = std::fs::File::open(&task_path)?;
    let msg = frame::read_msg::<ToWorker, _>(&mut file, frame::MAX_FRAME)?;
    let events = crate::file_channel::Writer::open(dir)?;
    let send = |msg: &FromWorker| {
        if let Err(e) = events.send(msg) {
            tracing::warn!(error = %e, "cannot append a report to the events file");
        }
    };
    send(&FromWorker::Ready {
        pid: std::process::id(),
    });
    let code = match msg {
        ToWorker::Train {
            mut task,
            dataloader,
        } => {
            if !task.pin_resume {
                task.resume_from =
                    crate::worker::checkpoint::latest_checkpoint_at_most(&task.job_dir, u64::MAX)
                        .or(task.resume_from);
            }
            if let Some(from) = &task.resume_from {
                tracing::info!(checkpoint = %from.display(), "resuming");
            }
            run_train(&task, dataloader.as_ref(), &send)
        }
        _ => {
            let message = "a channel directory holds only training tasks".to_string();
            reply(&send, FromWorker::Failed { message }, 1)
        }
    };
    Ok(code)
}

/// The worker's work once its task channel is open (`run`).
fn run_on_stream(mode: Mode, stream: UnixStream) -> Result<i32, WorkerError> {
    let mut reader = stream.try_clone()?;
    let writer = Mutex::new(stream);
    let send = |msg: &FromWorker| {
        if let Ok(mut w) = writer.lock() {
            if let Err(e) = frame::write_msg(&mut *w, msg) {
                tracing::warn!(error = %e, "cannot report to the daemon");
            }
        }
    };

    let msg = frame::read_msg::<ToWorker, _>(&mut reader, frame::MAX_FRAME)?;
    send(&FromWorker::Ready {
        pid: std::process::id(),
    });
    let code = match (msg, mode) {
        (ToWorker::Train { task, dataloader }, Mode::Train) => {
            watch_channel(reader)?;
            run_train(&task, dataloader.as_ref(), &send)
        }
        (ToWorker::Export { task }, Mode::Export) => {
            watch_channel(reader)?;
            run_export(task, &send)
        }
        (ToWorker::CheckExportOut { out }, Mode::Check) => {
            watch_channel(reader)?;
            run_check_export_out(&out, &send)
        }
        (ToWorker::Check { task }, Mode::Check) => {
            watch_channel(reader)?;
            match crate::worker::preflight::check(&task) {
                Ok(c) => {
                    let msg = FromWorker::Checked {
                        examples: c.examples,
                        memory_estimate: c.memory_estimate,
                        memory: c.memory,
                        lowered_max_seq_len: c.lowered_max_seq_len,
                    };
                    reply(&send, msg, 0)
                }
                Err(error) => reply(&send, FromWorker::Refused { error }, 1),
            }
        }
        (_, _) => {
            let message = format!("the task does not match the worker's mode ({mode:?})");
            reply(&send, FromWorker::Failed { message }, 1)
        }
    };
    Ok(code)
}

/// The control channel on fd 3, refused unless it is an open socket (instead of adopting a random
/// descriptor).
fn control_channel() -> Result<UnixStream, WorkerError> {
    // SAFETY: borrow_raw only wraps the number; fstat on a closed descriptor fails cleanly.
    let is_socket =
        nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(CONTROL_FD) })
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
            .unwrap_or(false);
    if !is_socket {
        return Err(WorkerError::NoChannel);
    }
    // SAFETY: fd 3 is open (checked above), was set up by the supervisor for this process alone, and
    // nothing else in the process owns it.
    Ok(UnixStream::from(unsafe {
        OwnedFd::from_raw_fd(CONTROL_FD)
    }))
}

/// Sends `msg` and returns `code`, the worker's exit status.
fn reply(send: &dyn Fn(&FromWorker), msg: FromWorker, code: i32) -> i32 {
    send(&msg);
    code
}

/// Trains the job, forwarding the engine's events; the exit status says how it ended.
fn run_train(task: &TrainTask, dataloader: Option<&PluginRef>, send: &dyn Fn(&FromWorker)) -> i32 {
    install_stop_handler();
    tracing::info!(job = %task.job, model = %task.base_model.display(), data = %task.dataset.display(), "worker started");
    let hang = HangAt::from_env(task);
    // Every step's point carries the worker's own CPU figures (what it measured, nothing else).
    let mut cpu = crate::worker::runtime::CpuMeter::default();
    let mut on_event = |mut event: crate::worker::TrainEvent| {
        match &mut event {
            crate::worker::TrainEvent::Step { point } => point.cpu = cpu.sample(),
            crate::worker::TrainEvent::Phase {
                phase: crate::worker::Phase::Training,
            } => {
                // Steps are timed from the start of training, not of loading.
                cpu = crate::worker::runtime::CpuMeter::default();
            }
            _ => {}
        }
        let last = hang.after(&event);
        send(&FromWorker::Train { event });
        if last {
            hang.hang();
        }
    };
    let open_source = |path: &std::path::Path| match dataloader {
        Some(plugin) => Ok(std::sync::Arc::new(PluginSource::open(plugin, path)?)
            as std::sync::Arc<dyn crate::worker::data::DataSource>),
        None => crate::worker::data::open_jsonl(path, task.settings.max_line_bytes as usize),
    };
    match train::train_with_source(task, &open_source, &mut on_event) {
        Ok(summary) => {
            tracing::info!(adapter = %task.adapter_dir.display(), peak_rss_mb = crate::worker::runtime::peak_rss_mb(), "training finished");
            let adapter_dir = task.adapter_dir.display().to_string();
            let steps = summary.steps;
            reply(send, FromWorker::Finished { adapter_dir, steps }, 0)
        }
        Err(EngineError::Stopped { step }) => reply(send, FromWorker::Stopped { step }, 0),
        Err(e) => {
            if let Some(dir) = e.no_space() {
                tracing::error!(error = %e, "no space left; stopping");
                let (dir, message) = (dir.display().to_string(), e.to_string());
                return reply(send, FromWorker::NoSpace { dir, message }, NO_SPACE_EXIT);
            }
            tracing::error!(error = %e, "training failed");
            let message = e.to_string();
            reply(send, FromWorker::Failed { message }, 1)
        }
    }
}

/// Checks, as the user, that an export may be written to `out`.
fn run_check_export_out(out: &std::path::Path, send: &dyn Fn(&FromWorker)) -> i32 {
    match check_export_out(out) {
        Ok(()) => {
            let msg = FromWorker::Checked {
                examples: None,
                memory_estimate: None,
                memory: None,
                lowered_max_seq_len: None,
            };
            reply(send, msg, 0)
        }
        Err(message) => {
            let code = if message.starts_with("permission denied") {
                lorad_schema::ErrorCode::PermissionDenied
            } else {
                lorad_schema::ErrorCode::InvalidArgument
            };
            let error = lorad_schema::WireError::new(code, message);
            reply(send, FromWorker::Refused { error }, 1)
        }
    }
}

/// The exit status of a worker that stopped because a disk is full (EX_TEMPFAIL: try again later).
pub const NO_SPACE_EXIT: i32 = 75;

/// Test hook for the stall watchdog, kept out of the engine: the daemon's environment (never a
/// client's request) can make a fresh (not resumed) run hang before step `LORAD_TEST_HANG_AT_STEP`,
/// as a wedged kernel or deadlocked loader would. It hangs in the event callback, after the last
/// report before that step: the previous step's point, or its checkpoint when one is due.
struct HangAt {
    step: Option<u64>,
    checkpoint_every: u64,
}

impl HangAt {
    fn from_env(task: &crate::worker::TrainTask) -> HangAt {
        let step = std::env::var("LORAD_TEST_HANG_AT_STEP")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| task.resume_from.is_none());
        HangAt {
            step,
            checkpoint_every: task.settings.checkpoint_every,
        }
    }

    /// Whether `event` is the last report before the step to hang at.
    fn after(&self, event: &crate::worker::TrainEvent) -> bool {
        use crate::worker::TrainEvent;
        let Some(at) = self.step else { return false };
        let prev = at.saturating_sub(1);
        let due = self.checkpoint_every > 0 && prev > 0 && prev % self.checkpoint_every == 0;
        match event {
            TrainEvent::Step { point } => point.step == prev && !due,
            TrainEvent::Checkpoint { step, .. } => *step == prev && due,
            _ => false,
        }
    }

    fn hang(&self) -> ! {
        tracing::warn!(step = ?self.step, "LORAD_TEST_HANG_AT_STEP: hanging on purpose");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Watches the control channel: EOF means the daemon is gone, and a worker without a daemon must not
/// go on.
fn watch_channel(mut reader: UnixStream) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || loop {
            match frame::read_msg::<ToWorker, _>(&mut reader, frame::MAX_FRAME) {
                Ok(msg) => tracing::warn!(?msg, "unexpected control message while working"),
                Err(_) => {
                    tracing::error!("control channel closed: the daemon is gone; exiting");
                    std::process::exit(3);
                }
            }
        })?;
    Ok(())
}

/// Opens the exporter plugin and runs `export.run`; reports the files or the error.
fn run_export(task: ExportTask, send: &dyn Fn(&FromWorker)) -> i32 {
    let out = std::path::Path::new(&task.request.out);
    let result = check_export_out(out)
        .and_then(|()| task.plugin.open())
        .and_then(|lib| {
            lib.call::<_, ExportResponse>(methods::EXPORT_RUN, &task.request)
                .map_err(|e| format!("exporter {} ({}): {e}", lib.name, task.plugin.format))
        });
    match result {
        Ok(reply) => {
            tracing::info!(files = reply.files.len(), out = %task.request.out, "export written");
            send(&FromWorker::Exported { files: reply.files });
            0
        }
        Err(message) => {
            tracing::error!(error = %message, "export failed");
            send(&FromWorker::Failed { message });
            1
        }
    }
}

/// An export target must be new, in an existing directory this user may write: exporters never replace
/// or write into what exists. Checked as the job's owner, not in the daemon: by a check worker before
/// the export starts, and again by the export worker before the exporter runs.
fn check_export_out(out: &std::path::Path) -> Result<(), String> {
    if out.symlink_metadata().is_ok() {
        return Err(format!(
            "out: {} already exists; choose a new path",
            out.display()
        ));
    }
    let parent = out.parent().unwrap_or(std::path::Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("out: {} is not a directory", parent.display())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "permission denied reading {} as uid {}",
                parent.display(),
                nix::unistd::getuid()
            ))
        }
        Err(_) => {
            return Err(format!(
                "out: directory {} does not exist",
                parent.display()
            ))
        }
    }
    nix::unistd::access(
        parent,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|_| {
        format!(
            "permission denied writing to {} as uid {}",
            parent.display(),
            nix::unistd::getuid()
        )
    })
}

extern "C" fn on_sigterm(_: libc::c_int) {
    crate::worker::request_stop();
}

/// SIGTERM (from the supervisor: pause, cancel, daemon shutdown) asks the training loop to checkpoint
/// and stop after the current step; the supervisor follows with SIGKILL after its grace if it must.
fn install_stop_handler() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    if let Err(e) = unsafe { sigaction(Signal::SIGTERM, &action) } {
        tracing::warn!(error = %e, "cannot install the SIGTERM handler; a stop will not checkpoint");
    }
}
