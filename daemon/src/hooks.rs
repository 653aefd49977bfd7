//! Hooks: commands run when a job reaches a moment people want to hear about (it completed, failed,
//! was cancelled, paused, or restarted after a crash or a stall).
//!
//! Two sources: `[[hooks]]` in the daemon's config (the admin's, for every job) and a job's own
//! `on_finish` (`submit --on-finish`, for completed, failed and cancelled). Each runs through `/bin/sh
//! -c` as the job's owner, in the environment a worker gets plus the job's facts in `LORAD_*`
//! variables, with its output appended to the job's log, under a timeout after which its whole
//! process group is killed. A hook that fails, hangs or cannot start is logged and told to
//! subscribers as a notice; it never changes the job or stops the daemon.
//!
//! Hooks follow the journal's `state_changed` events (live, with a catch-up from the journal when the
//! live stream lags), so each moment runs its hooks once while the daemon runs.
use crate::core::Core;
use lorad_schema::{Event, EventBody, JobRecord, JobState};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The moments a hook can be run for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// The job completed; its adapter is written.
    Completed,
    /// The job failed.
    Failed,
    /// The job was cancelled (by a user, or because a prerequisite failed).
    Cancelled,
    /// The job was paused (or held).
    Paused,
    /// A worker crashed or stalled and the job was put back in the queue to restart.
    Restarted,
}

impl HookEvent {
    /// Its name in the config and in `LORAD_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::Completed => "completed",
            HookEvent::Failed => "failed",
            HookEvent::Cancelled => "cancelled",
            HookEvent::Paused => "paused",
            HookEvent::Restarted => "restarted",
        }
    }

    /// The moment a transition is, if it is one. Back to the queue from a running attempt is a
    /// restart; the queue's other entries (submit, resume, retry, release) are not moments.
    pub fn of(from: JobState, to: JobState) -> Option<HookEvent> {
        match to {
            JobState::Completed => Some(HookEvent::Completed),
            JobState::Failed => Some(HookEvent::Failed),
            JobState::Cancelled => Some(HookEvent::Cancelled),
            JobState::Paused => Some(HookEvent::Paused),
            JobState::Queued if from.is_active() => Some(HookEvent::Restarted),
            _ => None,
        }
    }

    /// The moments a job's own `on_finish` runs for.
    pub fn finishes(self) -> bool {
        matches!(
            self,
            HookEvent::Completed | HookEvent::Failed | HookEvent::Cancelled
        )
    }
}

/// One `[[hooks]]` entry of the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// The moments it runs for.
    pub events: Vec<HookEvent>,
    /// A shell command (`/bin/sh -c`).
    pub command: String,
    /// Seconds it may run before its process group is killed (default 60).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT.as_secs()
}

/// How long a hook may run unless its config says otherwise (a job's `on_finish` always).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One command to run for one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The shell command.
    pub command: String,
    /// Its time limit.
    pub timeout: Duration,
    /// Where it comes from, for the log: `config` or `on_finish`.
    pub origin: &'static str,
}

/// The hooks to run for `event` on `job`: the config's that list it, in order, then the job's own.
pub fn planned(hooks: &[HookConfig], job: &JobRecord, event: HookEvent) -> Vec<Planned> {
    let mut out: Vec<Planned> = hooks
        .iter()
        .filter(|h| h.events.contains(&event))
        .map(|h| Planned {
            command: h.command.clone(),
            timeout: Duration::from_secs(h.timeout_s.max(1)),
            origin: "config",
        })
        .collect();
    if let Some(cmd) = job.on_finish.as_ref().filter(|_| event.finishes()) {
        out.push(Planned {
            command: cmd.clone(),
            timeout: DEFAULT_TIMEOUT,
            origin: "on_finish",
        });
    }
    out
}

/// The variables a hook gets: the moment, and the job's id, name, state, reason, adapter, progress.
/// `state` and `reason` are the event's (the record may have moved on since).
pub fn env(
    job: &JobRecord,
    event: HookEvent,
    state: JobState,
    reason: Option<&str>,
) -> Vec<(&'static str, String)> {
    let p = &job.progress;
    let mut vars = vec![
        ("LORAD_EVENT", event.as_str().to_string()),
        ("LORAD_JOB_ID", job.id.to_string()),
        ("LORAD_JOB_NAME", job.name.clone()),
        ("LORAD_JOB_STATE", state.as_str().to_string()),
        ("LORAD_JOB_REASON", reason.unwrap_or_default().to_string()),
        ("LORAD_JOB_STEP", p.step.to_string()),
        ("LORAD_JOB_TOTAL_STEPS", p.total_steps.to_string()),
        ("LORAD_JOB_OUTPUT_DIR", job.output_dir.clone()),
        ("LORAD_BASE_MODEL", job.base_model.clone()),
        ("LORAD_DATASET", job.dataset.clone()),
    ];
    // The adapter exists only once the job completed.
    let adapter = match (event, &job.adapter_dir) {
        (HookEvent::Completed, Some(dir)) => dir.clone(),
        _ => String::new(),
    };
    vars.push(("LORAD_ADAPTER_DIR", adapter));
    if let Some(loss) = p.loss {
        vars.push(("LORAD_JOB_LOSS", format!("{loss}")));
    }
    vars
}

/// Follows the journal's events until the daemon stops, running hooks for each moment.
pub async fn run(core: Arc<Core>) {
    let mut live = core.live_events();
    let mut last = core.read(|j| j.last_seq()).await.unwrap_or(0);
    loop {
        let event = tokio::select! {
            e = live.recv() => e,
            _ = core.shutdown.cancelled() => return,
        };
        let events = match event {
            Ok(e) => vec![e],
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Missed some: read them from the journal instead.
                match core
                    .read(move |j| j.events_since(last, None, 100_000))
                    .await
                {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(error = %e, "hooks cannot catch up with the journal");
                        continue;
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        for e in events {
            if e.seq <= last {
                continue;
            }
            last = e.seq;
            moment(&core, e).await;
        }
    }
}

/// Starts the hooks of one event, if it is a moment (each on its own task).
async fn moment(core: &Arc<Core>, e: Event) {
    let (EventBody::StateChanged { from, to, reason }, Some(id)) = (e.body, e.job) else {
        return;
    };
    let Some(event) = HookEvent::of(from, to) else {
        return;
    };
    let job = match core.read(move |j| j.job(id)).await {
        Ok(job) => job,
        Err(_) => return,
    };
    for hook in planned(&core.config.hooks, &job, event) {
        let vars = env(&job, event, to, reason.as_deref());
        let (core, job) = (core.clone(), job.clone());
        tokio::spawn(async move {
            let outcome = run_one(&core, &job, event, &hook, vars).await;
            report(&core, &job, event, &hook, outcome).await;
        });
    }
}

/// How a hook ended.
#[derive(Debug)]
enum Outcome {
    Exited(std::process::ExitStatus, Duration),
    TimedOut(Duration),
    NotStarted(String),
}

async fn run_one(
    core: &Core,
    job: &JobRecord,
    event: HookEvent,
    hook: &Planned,
    vars: Vec<(&'static str, String)>,
) -> Outcome {
    let log_path = crate::logs::log_path(&core.config.job_dir(job.id));
    let owner = job.owner_uid;
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let separator = format!(
        "\n===== lorad: hook ({}) for {} started {when}: {} =====\n",
        hook.origin,
        event.as_str(),
        hook.command
    );
    // The owner's identity and the log (opened as the job's log is: owned by them), off the runtime.
    let opened = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let who = crate::identity::for_owner(owner).map_err(|e| e.to_string())?;
        let ids = who.as_ref().map(|w| (w.uid, w.gid));
        let mut log = crate::logs::open_append(&log_path, ids)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        std::io::Write::write_all(&mut log, separator.as_bytes()).map_err(|e| e.to_string())?;
        Ok((who, log))
    })
    .await;
    let (who, log) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Outcome::NotStarted(e),
        Err(e) => return Outcome::NotStarted(e.to_string()),
    };
    let err = match log.try_clone() {
        Ok(f) => f,
        Err(e) => return Outcome::NotStarted(e.to_string()),
    };
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(&hook.command);
    crate::identity::apply(&mut cmd, who.as_ref());
    cmd.envs(vars)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(log))
        .stderr(std::process::Stdio::from(err))
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(false);
    let started = std::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::NotStarted(format!("cannot start /bin/sh: {e}")),
    };
    match tokio::time::timeout(hook.timeout, child.wait()).await {
        Ok(Ok(status)) => Outcome::Exited(status, started.elapsed()),
        Ok(Err(e)) => Outcome::NotStarted(format!("cannot wait for the hook: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                // The group's id is the shell's pid (process_group(0)).
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Outcome::TimedOut(hook.timeout)
        }
    }
}

/// The hook's ending, in words.
fn describe(outcome: &Outcome) -> (bool, String) {
    use std::os::unix::process::ExitStatusExt;
    match outcome {
        Outcome::Exited(status, took) if status.success() => (
            true,
            format!("exited with code 0 after {:.1} s", took.as_secs_f64()),
        ),
        Outcome::Exited(status, took) => {
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with code {code}"),
                (_, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "ended".to_string(),
            };
            (false, format!("{how} after {:.1} s", took.as_secs_f64()))
        }
        Outcome::TimedOut(limit) => (
            false,
            format!(
                "timed out after {} s; its process group was killed",
                limit.as_secs()
            ),
        ),
        Outcome::NotStarted(why) => (false, format!("did not start: {why}")),
    }
}

/// Writes the hook's ending to the job's log, the daemon's log and the job's subscribers.
async fn report(core: &Core, job: &JobRecord, event: HookEvent, hook: &Planned, outcome: Outcome) {
    let (ok, words) = describe(&outcome);
    let text = format!(
        "hook ({}) for {} {words}: {}",
        hook.origin,
        event.as_str(),
        hook.command
    );
    if ok {
        tracing::info!(job = %job.id, event = event.as_str(), "{text}");
    } else {
        tracing::warn!(job = %job.id, event = event.as_str(), "{text}");
    }
    let log_path = crate::logs::log_path(&core.config.job_dir(job.id));
    let line = format!("lorad: {text}\n");
    let _ =
        tokio::task::spawn_blocking(move || crate::logs::append(&log_path, line.as_bytes())).await;
    let id = job.id;
    let level = if ok { "info" } else { "warn" };
    let body = EventBody::Notice {
        level: level.into(),
        text,
    };
    if let Err(e) = core
        .write(move |j| {
            let event = j.append_event(Some(id), body)?;
            Ok(((), vec![event]))
        })
        .await
    {
        tracing::warn!(job = %id, error = %e, "cannot record a hook's outcome");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::job;
    use JobState::*;

    #[test]
    fn moments_are_the_ends_pauses_and_restarts() {
        assert_eq!(
            HookEvent::of(Running, Completed),
            Some(HookEvent::Completed)
        );
        assert_eq!(HookEvent::of(Initializing, Failed), Some(HookEvent::Failed));
        assert_eq!(HookEvent::of(Queued, Cancelled), Some(HookEvent::Cancelled));
        assert_eq!(HookEvent::of(Running, Paused), Some(HookEvent::Paused));
        assert_eq!(HookEvent::of(Running, Queued), Some(HookEvent::Restarted));
        assert_eq!(
            HookEvent::of(Initializing, Queued),
            Some(HookEvent::Restarted)
        );
        for (from, to) in [
            (Paused, Queued),
            (Failed, Queued),
            (Queued, Initializing),
            (Initializing, Running),
        ] {
            assert_eq!(HookEvent::of(from, to), None, "{from} -> {to}");
        }
    }

    #[test]
    fn config_hooks_that_list_the_event_then_the_jobs_own_for_its_end() {
        let hooks = vec![
            HookConfig {
                events: vec![HookEvent::Completed, HookEvent::Failed],
                command: "a".into(),
                timeout_s: 5,
            },
            HookConfig {
                events: vec![HookEvent::Paused],
                command: "b".into(),
                timeout_s: 60,
            },
        ];
        let mut j = job(1, Running, 0);
        j.on_finish = Some("mine".into());
        let got: Vec<(String, &str)> = planned(&hooks, &j, HookEvent::Completed)
            .into_iter()
            .map(|p| (p.command, p.origin))
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), "config"), ("mine".into(), "on_finish")]
        );
        let paused = planned(&hooks, &j, HookEvent::Paused);
        assert_eq!(paused.len(), 1, "on_finish is for the end only");
        assert_eq!(paused[0].command, "b");
        assert!(planned(&hooks, &j, HookEvent::Restarted).is_empty());
    }

    #[test]
    fn the_environment_names_the_job() {
        let mut j = job(7, Completed, 0);
        j.name = "n".into();
        j.adapter_dir = Some("/a".into());
        let vars: std::collections::HashMap<_, _> =
            env(&j, HookEvent::Completed, Completed, Some("done"))
                .into_iter()
                .collect();
        assert_eq!(vars["LORAD_JOB_ID"], "7");
        assert_eq!(vars["LORAD_JOB_NAME"], "n");
        assert_eq!(vars["LORAD_JOB_STATE"], "completed");
        assert_eq!(vars["LORAD_JOB_REASON"], "done");
        assert_eq!(vars["LORAD_ADAPTER_DIR"], "/a");
        assert_eq!(vars["LORAD_EVENT"], "completed");
        let failed: std::collections::HashMap<_, _> = env(&j, HookEvent::Failed, Failed, None)
            .into_iter()
            .collect();
        assert_eq!(
            failed["LORAD_ADAPTER_DIR"], "",
            "no adapter unless completed"
        );
        assert_eq!(failed["LORAD_JOB_REASON"], "");
    }

    #[test]
    fn the_config_names_unknown_events() {
        let err = toml::from_str::<HookConfig>("events = [\"finished\"]\ncommand = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("finished") && err.contains("completed"),
            "{err}"
        );
        let ok: HookConfig = toml::from_str("events = [\"restarted\"]\ncommand = \"x\"").unwrap();
        assert_eq!(ok.timeout_s, 60);
    }
}
