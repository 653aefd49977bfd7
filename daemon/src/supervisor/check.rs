//! The submit-time check of a job's files: a `lorad worker --check` process as the job's owner, under a
//! deadline, so that the daemon never opens a path a client named, and a FIFO, a device or a slow file
//! system stalls only that process. Checks are limited in number, in total and per user.
use super::attempt::start_worker;
use crate::channel::{FromWorker, ToWorker};
use crate::core::Core;
use crate::worker::preflight::{CheckTask, Checked};
use crate::worker::process::Mode;
use lorad_schema::{frame, ErrorCode, WireError};
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// Checks in flight: a semaphore for all, a count per uid.
#[derive(Debug)]
pub struct Checks {
    all: Semaphore,
    per_user: Mutex<HashMap<u32, usize>>,
}

impl Checks {
    /// Room for `max` checks at once.
    pub fn new(max: usize) -> Checks {
        Checks {
            all: Semaphore::new(max.max(1)),
            per_user: Mutex::new(HashMap::new()),
        }
    }
}

/// A user's place among the checks in flight.
struct UserSlot<'a> {
    checks: &'a Checks,
    uid: u32,
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        let mut per_user = self
            .checks
            .per_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_user.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.uid);
            }
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// Checks a submit's files as `owner_uid`: the number of examples, or the refusal as the client gets it.
pub async fn submit(core: &Core, owner_uid: u32, task: CheckTask) -> Result<Checked, WireError> {
    let what = format!("dataset {}", task.dataset.display());
    run(core, owner_uid, ToWorker::Check { task }, what).await
}

/// Checks as `owner_uid` that an export may write `out` (new, in a directory they may write).
pub async fn export_out(core: &Core, owner_uid: u32, out: &str) -> Result<(), WireError> {
    let what = format!("export target {out}");
    let msg = ToWorker::CheckExportOut { out: out.into() };
    run(core, owner_uid, msg, what).await.map(|_| ())
}

/// Runs one check (`msg`, about `what`) as `owner_uid`.
async fn run(
    core: &Core,
    owner_uid: u32,
    msg: ToWorker,
    what: String,
) -> Result<Checked, WireError> {
    let limits = &core.config.limits;
    let _mine = user_slot(core, owner_uid)?;
    // One deadline for waiting for a slot and for the check itself.
    let deadline = Duration::from_secs(limits.check_timeout_s);
    let until = tokio::time::Instant::now() + deadline;
    let _all = tokio::time::timeout_at(until, core.checks.all.acquire())
        .await
        .map_err(|_| {
            WireError::new(
                ErrorCode::Busy,
                "too many submissions are being checked; try again later",
            )
        })?
        .map_err(|e| internal("check slots", e))?;

    let who = tokio::task::spawn_blocking(move || crate::identity::for_owner(owner_uid))
        .await
        .map_err(|e| internal("user lookup", e))?
        .map_err(|e| WireError::new(ErrorCode::PermissionDenied, e.to_string()))?;
    let (mut child, mut control) = start_worker(
        core,
        Mode::Check,
        None,
        who.as_ref(),
        Stdio::null(),
        Stdio::null(),
    )
    .map_err(|e| internal("cannot start the check", e))?;
    let result = match tokio::time::timeout_at(until, verdict(&mut control, &msg)).await {
        Ok(result) => result,
        Err(_) => Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "the check of {what} did not finish within {} s (check_timeout_s): is it on a slow or hung file system?",
                deadline.as_secs()
            ),
        )),
    };
    // The process group: the check may have started threads or be blocked in a read.
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait().await;
    result
}

/// One of `owner_uid`'s `max_checks_per_user` slots, held until the guard drops.
fn user_slot(core: &Core, owner_uid: u32) -> Result<UserSlot<'_>, WireError> {
    let mut per_user = core
        .checks
        .per_user
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let n = per_user.entry(owner_uid).or_insert(0);
    if *n >= core.config.limits.max_checks_per_user {
        return Err(WireError::new(
            ErrorCode::Busy,
            format!(
                "uid {owner_uid} already has {n} submissions being checked (max_checks_per_user); try again when they are done"
            ),
        ));
    }
    *n += 1;
    Ok(UserSlot {
        checks: &core.checks,
        uid: owner_uid,
    })
}

/// Sends the check to the worker and reads its verdict.
async fn verdict(control: &mut UnixStream, msg: &ToWorker) -> Result<Checked, WireError> {
    frame::write_msg_async(control, msg)
        .await
        .map_err(|e| internal("cannot send the check", e))?;
    loop {
        match frame::read_msg_async::<FromWorker, _>(control, frame::MAX_FRAME).await {
            Ok(FromWorker::Checked {
                examples,
                memory_estimate,
                memory,
                lowered_max_seq_len,
            }) => {
                return Ok(Checked {
                    examples,
                    memory_estimate,
                    memory,
                    lowered_max_seq_len,
                })
            }
            Ok(FromWorker::Refused { error }) => return Err(error),
            Ok(FromWorker::Failed { message }) => {
                return Err(WireError::new(ErrorCode::InvalidArgument, message))
            }
            Ok(_) => continue,
            Err(e) => return Err(internal("the check ended without a verdict", e)),
        }
    }
}
