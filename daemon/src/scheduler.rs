//! Scheduling decisions, free of I/O: which queued job runs next.
use lorad_schema::{JobId, JobRecord, JobState};

/// The queued job to start next: highest priority first, then jobs put back by recovery (they were
/// already running), then the oldest (lowest id). A job whose owner already has
/// `max_running_per_user` jobs initializing or running waits.
pub fn next_job<'a>(
    jobs: impl IntoIterator<Item = &'a JobRecord>,
    max_running_per_user: usize,
) -> Option<JobId> {
    let jobs: Vec<&JobRecord> = jobs.into_iter().collect();
    let mut running: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for j in &jobs {
        if matches!(j.state, JobState::Initializing | JobState::Running) {
            *running.entry(j.owner_uid).or_insert(0) += 1;
        }
    }
    jobs.into_iter()
        .filter(|j| j.state == JobState::Queued)
        .filter(|j| running.get(&j.owner_uid).copied().unwrap_or(0) < max_running_per_user)
        .min_by_key(|j| (std::cmp::Reverse(j.priority), !j.requeued, j.id))
        .map(|j| j.id)
}

/// How a worker ended, as the supervisor saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The engine refused the job (bad data, bad model): the message.
    Refused(String),
    /// A disk was full.
    NoSpace {
        /// The full directory.
        dir: String,
        /// The write error.
        message: String,
    },
    /// The watchdog killed it: why.
    Stalled(String),
    /// It died on its own: how ("exited with code 101", "was killed by signal 9 (SIGKILL)").
    Crashed(String),
}

/// What becomes of a job whose worker ended without finishing, with the reason to record.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterExit {
    /// Paused: it resumes from its newest checkpoint when asked.
    Pause(String),
    /// Failed for good.
    Fail(String),
    /// Queued again at the front, one restart more.
    Restart(String),
}

/// The decision after a worker of `job` ended: a full disk pauses (not the job's fault, nothing
/// incomplete kept); a refusal fails (a restart would fail the same way); a stall or a crash restarts
/// until `max_restarts`, then fails.
pub fn after_exit(job: &JobRecord, ending: Ending) -> AfterExit {
    let id = job.id;
    let max = job.settings.max_restarts;
    match ending {
        Ending::NoSpace { dir, message } => AfterExit::Pause(format!(
            "no space left on device in {dir}: free some space, then `loractl resume {id}` ({message})"
        )),
        Ending::Refused(message) => AfterExit::Fail(message),
        Ending::Stalled(cause) if job.progress.restarts < max => AfterExit::Restart(format!(
            "{cause}; restart {} of {max}",
            job.progress.restarts + 1
        )),
        Ending::Crashed(how) if job.progress.restarts < max => AfterExit::Restart(format!(
            "crashed: worker {how}; restart {} of {max}",
            job.progress.restarts + 1
        )),
        Ending::Stalled(cause) => AfterExit::Fail(format!("{cause}; gave up after {max} restarts")),
        Ending::Crashed(how) => {
            AfterExit::Fail(format!("worker {how}; gave up after {max} restarts"))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use lorad_schema::{Progress, TrainSettings};

    /// A job record with every field but these at a plain value.
    pub(crate) fn job(id: u64, state: JobState, priority: i32) -> JobRecord {
        JobRecord {
            id: JobId(id),
            name: format!("j{id}"),
            state,
            reason: None,
            owner_uid: 0,
            priority,
            template: "t".into(),
            base_model: "m".into(),
            dataset: "d".into(),
            output_dir: "o".into(),
            settings: TrainSettings::default(),
            overrides: Default::default(),
            progress: Progress::default(),
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            adapter_dir: None,
            worker_pid: None,
            resume_checkpoint: None,
            requeued: false,
        }
    }

    #[test]
    fn priority_then_age() {
        let jobs = [
            job(1, JobState::Queued, 0),
            job(2, JobState::Queued, 5),
            job(3, JobState::Queued, 5),
        ];
        assert_eq!(next_job(&jobs, 4), Some(JobId(2)));
    }

    #[test]
    fn requeued_jobs_go_first_within_their_priority() {
        let mut back = job(9, JobState::Queued, 0);
        back.requeued = true;
        let jobs = [
            job(1, JobState::Queued, 0),
            back,
            job(3, JobState::Queued, 1),
        ];
        assert_eq!(next_job(&jobs, 4), Some(JobId(3)));
        assert_eq!(next_job(&jobs[..2], 4), Some(JobId(9)));
    }

    #[test]
    fn an_owner_at_the_running_limit_waits_and_others_go_first() {
        let mut mine = job(1, JobState::Running, 0);
        mine.owner_uid = 7;
        let mut next = job(2, JobState::Queued, 9);
        next.owner_uid = 7;
        let mut other = job(3, JobState::Queued, 0);
        other.owner_uid = 8;
        let jobs = [mine, next, other];
        assert_eq!(next_job(&jobs, 1), Some(JobId(3)));
        assert_eq!(next_job(&jobs, 2), Some(JobId(2)));
        assert_eq!(next_job(&jobs[..2], 1), None);
    }

    #[test]
    fn after_exit_pauses_on_a_full_disk_fails_on_refusal_and_restarts_crashes_until_the_limit() {
        let mut j = job(3, JobState::Running, 0);
        j.settings.max_restarts = 2;
        let full = Ending::NoSpace {
            dir: "/var/lib/lorad/jobs/3".into(),
            message: "No space left on device (os error 28)".into(),
        };
        assert!(matches!(after_exit(&j, full),
            AfterExit::Pause(r) if r.starts_with("no space left on device in /var/lib/lorad/jobs/3") && r.contains("loractl resume 3")));
        assert_eq!(
            after_exit(&j, Ending::Refused("dataset line 4: not JSON".into())),
            AfterExit::Fail("dataset line 4: not JSON".into())
        );
        assert_eq!(
            after_exit(
                &j,
                Ending::Crashed("was killed by signal 9 (SIGKILL)".into())
            ),
            AfterExit::Restart(
                "crashed: worker was killed by signal 9 (SIGKILL); restart 1 of 2".into()
            )
        );
        assert_eq!(
            after_exit(
                &j,
                Ending::Stalled("stalled: no progress for 180 s while training".into())
            ),
            AfterExit::Restart(
                "stalled: no progress for 180 s while training; restart 1 of 2".into()
            )
        );
        j.progress.restarts = 2;
        assert_eq!(
            after_exit(&j, Ending::Crashed("exited with code 101".into())),
            AfterExit::Fail("worker exited with code 101; gave up after 2 restarts".into())
        );
        assert_eq!(
            after_exit(&j, Ending::Stalled("stalled: x".into())),
            AfterExit::Fail("stalled: x; gave up after 2 restarts".into())
        );
    }

    #[test]
    fn only_queued_jobs_run() {
        let jobs = [
            job(1, JobState::Completed, 9),
            job(2, JobState::Paused, 9),
            job(3, JobState::Running, 0),
        ];
        assert_eq!(next_job(&jobs, 4), None);
    }
}
