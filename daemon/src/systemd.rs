//! systemd integration: the listener that socket activation passes, and what the daemon tells the
//! service manager (`sd_notify`): READY once the journal is replayed and the socket listens, a one-line
//! STATUS kept current, WATCHDOG pings when the unit asks for them, RELOADING around a SIGHUP rescan,
//! STOPPING, and EXTEND_TIMEOUT while workers write their stop checkpoints.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or a test's in-process daemon) every notification is
//! a no-op; without `LISTEN_FDS` the daemon binds its own socket.
use crate::core::Core;
use lorad_schema::{EventBody, JobRecord, JobState};
use sd_notify::NotifyState;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why a socket passed by the service manager cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// LISTEN_FDS/LISTEN_PID could not be read.
    #[error("socket activation: {0}")]
    Env(std::io::Error),
    /// The passed descriptor is not a listening Unix stream socket.
    #[error("socket activation: descriptor {fd} ({name}) is not a listening Unix stream socket")]
    NotAListener {
        /// The descriptor.
        fd: i32,
        /// Its name from LISTEN_FDNAMES.
        name: String,
    },
    /// More than one socket was passed; lorad listens on one.
    #[error("socket activation: {0} sockets were passed; lorad listens on one (one ListenStream= in lorad.socket)")]
    TooMany(usize),
}

/// The listening socket systemd passed (LISTEN_FDS for this pid), if any, and its path. Checked to be
/// a listening Unix stream socket; it is the service manager's, so the daemon never unlinks its path.
pub fn activated_listener() -> Result<Option<(OwnedFd, Option<PathBuf>)>, ActivationError> {
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Env)?
        .collect();
    let (fd, name) = match fds.len() {
        0 => return Ok(None),
        1 => fds.into_iter().next().ok_or(ActivationError::TooMany(0))?,
        n => return Err(ActivationError::TooMany(n)),
    };
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched) for it to own; no
    // other code in lorad knows of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .unwrap_or(false);
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd).ok();
    let unix = addr.is_some();
    let stream = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::SockType)
        .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
    if !(listening && unix && stream) {
        return Err(ActivationError::NotAListener { fd, name });
    }
    let path = addr.and_then(|a| a.path().map(PathBuf::from));
    Ok(Some((owned, path)))
}

/// Sends `states` to the service manager, if there is one. A failure is logged, never fatal: the
/// daemon works the same without systemd.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// READY=1, with the first status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STOPPING=1.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// RELOADING=1 with the monotonic time systemd asks for (it pairs the reload with this message).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The stop timeout extended to `by` from now (workers are writing their checkpoints).
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// The one-line queue summary for STATUS= (and `systemctl status`): what runs and how far it is, then
/// the count of jobs in each other live state. Pure.
pub fn status_line(jobs: &[JobRecord]) -> String {
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    let mut parts = Vec::new();
    let running: Vec<&JobRecord> = jobs
        .iter()
        .filter(|j| matches!(j.state, JobState::Running | JobState::Initializing))
        .collect();
    match running.as_slice() {
        [] => parts.push("idle".to_string()),
        [job] => parts.push(running_text(job)),
        many => parts.push(format!("{} running", many.len())),
    }
    for (state, word) in [(JobState::Queued, "queued"), (JobState::Paused, "paused")] {
        let n = count(state);
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    parts.join(", ")
}

fn running_text(job: &JobRecord) -> String {
    let p = &job.progress;
    match (job.state, p.total_steps) {
        (JobState::Initializing, _) => format!("job {} starting", job.id),
        (_, 0) => format!("job {} running", job.id),
        _ => format!("job {} step {}/{}", job.id, p.step, p.total_steps),
    }
}

/// Keeps STATUS= current: recomputed after every state change and step, at most once a second.
pub async fn keep_status(core: Arc<Core>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut events = core.live_events();
    let mut last = String::new();
    loop {
        let status = match core.read(|j| j.jobs()).await {
            Ok(jobs) => status_line(&jobs),
            Err(_) => "journal unreadable".to_string(),
        };
        if status != last {
            notify(&[NotifyState::Status(&status)]);
            last = status;
        }
        // Wait for something that changes the line, then a second to gather what follows it.
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = core.shutdown.cancelled() => return,
            };
            match event {
                Ok(e)
                    if !matches!(
                        e.body,
                        EventBody::StateChanged { .. } | EventBody::Metrics { .. }
                    ) =>
                {
                    continue
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                _ => break,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = core.shutdown.cancelled() => return,
        }
        events = events.resubscribe();
    }
}

/// WATCHDOG=1 at half the interval the unit set (WatchdogSec=), from the runtime: a daemon whose
/// runtime is stuck stops pinging and systemd restarts it.
pub async fn keep_watchdog(core: Arc<Core>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => notify(&[NotifyState::Watchdog]),
            _ = core.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lorad_schema::Progress;

    fn job(id: u64, state: JobState, step: u64, total: u64) -> JobRecord {
        JobRecord {
            progress: Progress {
                step,
                total_steps: total,
                ..Progress::default()
            },
            ..crate::scheduler::tests::job(id, state, 0)
        }
    }

    #[test]
    fn the_status_line_says_what_runs_and_what_waits() {
        assert_eq!(status_line(&[]), "idle");
        let done = job(1, JobState::Completed, 10, 10);
        assert_eq!(status_line(std::slice::from_ref(&done)), "idle");
        let run = job(2, JobState::Running, 3, 60);
        let q = job(3, JobState::Queued, 0, 0);
        let p = job(4, JobState::Paused, 5, 60);
        assert_eq!(
            status_line(&[done, run.clone(), q.clone(), q.clone(), p]),
            "job 2 step 3/60, 2 queued, 1 paused"
        );
        let init = job(5, JobState::Initializing, 0, 0);
        assert_eq!(status_line(&[init.clone(), q]), "job 5 starting, 1 queued");
        assert_eq!(status_line(&[init, run]), "2 running");
        assert_eq!(
            status_line(&[job(6, JobState::Running, 0, 0)]),
            "job 6 running"
        );
    }
}
