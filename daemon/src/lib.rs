//! lorad: a LoRA fine-tuning daemon. See DESIGN.md for the architecture.
//!
//! [`run`] is the daemon: it takes its listener and a shutdown token as arguments, so tests and the demo
//! can run a private daemon on a temp socket.
#![deny(clippy::unwrap_used)]

pub mod channel;
pub mod config;
pub mod core;
pub mod demo;
pub mod devices;
pub mod energy;
pub mod file_channel;
pub mod hooks;
pub mod identity;
pub mod journal;
pub mod logging;
pub mod logs;
pub mod plugins;
pub mod progress;
pub mod queue;
pub mod quota;
pub mod reserve;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod statelock;
pub mod supervisor;
pub mod systemd;
pub mod worker;

/// Greedy generation with a base model (and an adapter), for checks and benches.
pub use lorad_engine::generate;

use crate::core::Core;
use config::Config;
use journal::{Journal, JournalError};
use lorad_schema::JobState;
use tokio_util::sync::CancellationToken;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory could not be made.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal could not be opened or recovered.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another lorad owns the state directory.
    #[error(transparent)]
    Locked(#[from] statelock::LockError),
}

/// Runs the daemon on `listener` until `shutdown` is cancelled (by a signal, a client's `shutdown`
/// request, or the caller), then stops workers and closes connections.
pub async fn run(
    config: Config,
    listener: interprocess::local_socket::tokio::Listener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with(config, listener, shutdown, || {}).await
}

/// [`run`], calling `on_ready` once the daemon serves: the state directory is locked, the journal
/// replayed (jobs of a dead daemon requeued) and the listener accepting. systemd hears READY=1 at the
/// same moment; `--daemonize` lets its parent exit then.
pub async fn run_with(
    config: Config,
    listener: interprocess::local_socket::tokio::Listener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) -> Result<(), RunError> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(config.layout().jobs()).map_err(|source| RunError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Before anything reads or writes the state: one daemon per state directory.
    let _lock = statelock::StateLock::acquire(&state_dir)?;
    if nix::unistd::geteuid().is_root() {
        open_state_dir(&state_dir).map_err(|source| RunError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
    }
    let journal_path = config.journal_path();
    let jobs_dir = config.layout().jobs();
    let journal = tokio::task::spawn_blocking(move || {
        journal::recover::guard(&journal_path, &jobs_dir)?;
        Journal::open(&journal_path)
    })
    .await
    .map_err(|e| JournalError::Task(e.to_string()))??;
    let core = Core::new(config, journal, shutdown);
    if nix::unistd::geteuid().is_root() {
        secure_job_dirs(&core).await;
    }
    core.rescan_plugins().await;
    tokio::spawn(rescan_on_sighup(core.clone()));
    tokio::spawn(keep_reserve(core.clone()));
    recover(&core).await?;
    tracing::info!(socket = %core.config.socket.display(), state_dir = %state_dir.display(), "lorad ready");
    let status = match core.read(|j| j.jobs()).await {
        Ok(jobs) => systemd::status_line(&jobs),
        Err(_) => String::new(),
    };
    systemd::ready(&status);
    on_ready();
    tokio::spawn(systemd::keep_status(core.clone()));
    tokio::spawn(systemd::keep_watchdog(core.clone()));

    tokio::spawn(hooks::run(core.clone()));
    let supervisor = tokio::spawn(supervisor::run(core.clone()));
    server::serve(core.clone(), listener).await;
    let _ = supervisor.await;
    tracing::info!("lorad stopped");
    Ok(())
}

/// A root daemon's workers run as the jobs' owners and must reach their own job directories
/// (`jobs/<id>`, 0700, owned by the user) but list nothing else: the state dir and `jobs/` are made
/// traversable (0711). The journal stays 0600.
fn open_state_dir(state_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let layout = lorad_schema::layout::StateDir::new(state_dir);
    for dir in [state_dir.to_path_buf(), layout.jobs()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

/// A state dir written by an older lorad (no umask, no owners): the journal becomes 0600 and every
/// existing job directory its owner's, 0700. Blocking work on the blocking pool; failures are logged,
/// never fatal.
async fn secure_job_dirs(core: &Core) {
    use std::os::unix::fs::PermissionsExt;
    let journal = core.config.journal_path();
    let Ok(jobs) = core.read(|j| j.jobs()).await else {
        return;
    };
    let dirs: Vec<(u32, std::path::PathBuf)> = jobs
        .iter()
        .map(|j| (j.owner_uid, core.config.job_dir(j.id)))
        .collect();
    let done = tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %journal.display(), error = %e, "cannot make the journal private");
        }
        for (owner, dir) in dirs {
            if !dir.exists() {
                continue;
            }
            let ids = match identity::for_owner(owner) {
                Ok(who) => who.map(|w| (w.uid, w.gid)),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "job directory left as it is");
                    continue;
                }
            };
            if let Err(e) = logs::prepare_job_dir(&dir, ids) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot give the job directory to its owner");
            }
        }
    })
    .await;
    if done.is_err() {
        tracing::warn!("securing the job directories did not finish");
    }
}

/// Holds the journal's reserved space, and takes it again once a full disk has room; opens the journal
/// again if a reopen after an I/O error failed (checked every 5 s).
async fn keep_reserve(core: std::sync::Arc<Core>) {
    loop {
        if !core.journal_open() {
            core.reopen_journal(false).await;
        }
        if !core.reserve.held() {
            let c = core.clone();
            let filled = tokio::task::spawn_blocking(move || c.reserve.fill())
                .await
                .unwrap_or(false);
            if filled {
                tracing::info!("space for the journal is held in reserve");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = core.shutdown.cancelled() => return,
        }
    }
}

/// SIGHUP: scan the plugin directories again.
async fn rescan_on_sighup(core: std::sync::Arc<Core>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; plugins are scanned only at start");
        return;
    };
    loop {
        tokio::select! {
            Some(()) = hup.recv() => {
                tracing::info!("SIGHUP: scanning plugin directories");
                systemd::reloading();
                core.rescan_plugins().await;
                let status = match core.read(|j| j.jobs()).await {
                    Ok(jobs) => systemd::status_line(&jobs),
                    Err(_) => String::new(),
                };
                systemd::ready(&status);
            }
            _ = core.shutdown.cancelled() => return,
        }
    }
}

/// Jobs a dead daemon left initializing or running have no worker any more: put them back at the front
/// of the queue; their next attempt resumes from their newest checkpoint.
async fn recover(core: &Core) -> Result<(), JournalError> {
    let jobs = core.read(|j| j.jobs()).await?;
    for job in jobs.into_iter().filter(|j| j.state.is_active()) {
        if job.progress.slurm.is_some() {
            // Its attempt is a Slurm job, which a daemon's death does not end: the supervisor
            // follows it again (`supervisor::slurm::reattach`).
            continue;
        }
        if let Some(pid) = job.worker_pid {
            reap_orphan(pid, &core.config.worker_exe).await;
        }
        let reason = Some("daemon restarted".to_string());
        core.transition(job.id, JobState::Queued, reason, |job| job.requeued = true)
            .await?;
    }
    Ok(())
}

/// A worker of a dead daemon exits by itself when its channel closes, but it may still be finishing a
/// step or a checkpoint: make sure it is gone before a new attempt writes to the same job directory.
async fn reap_orphan(pid: u32, worker_exe: &std::path::Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    // Only a `lorad worker` process of this lorad: the pid may have been reused by something else.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let ours = exe.is_some_and(|e| {
        worker_exe.canonicalize().is_ok_and(|w| {
            e == w || e.to_string_lossy().trim_end_matches(" (deleted)") == w.to_string_lossy()
        })
    });
    if args.get(1) != Some(&&b"worker"[..]) || !ours {
        return;
    }
    tracing::warn!(pid, "killing the worker of the previous daemon");
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..500 {
        let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                stat.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    == Some("Z")
            }
            Err(_) => true,
        };
        if gone {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tracing::error!(pid, "the previous daemon's worker did not die");
}
