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

#[cfg(test)]
mod tests {
    use super::*;
    use lorad_schema::{Progress, TrainSettings};

    fn job(id: u64, state: JobState, priority: i32) -> JobRecord {
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
    fn only_queued_jobs_run() {
        let jobs = [
            job(1, JobState::Completed, 9),
            job(2, JobState::Paused, 9),
            job(3, JobState::Running, 0),
        ];
        assert_eq!(next_job(&jobs, 4), None);
    }
}
