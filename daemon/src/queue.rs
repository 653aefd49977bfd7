//! Queue control, free of I/O: which queued jobs may start now (`--after`, `--not-before`), which
//! must be cancelled because a prerequisite will never complete, when the supervisor must look again,
//! and what a submit's prerequisites may be.
use lorad_schema::{ErrorCode, JobId, JobRecord, JobState, WireError};
use std::collections::HashMap;

/// Most prerequisites one job may name.
pub const MAX_AFTER: usize = 64;

/// Why a queued job cannot start yet, if it cannot: a prerequisite that has not completed, or a
/// start time still ahead. A prerequisite that is gone (deleted) counts as not completed: the job is
/// cancelled by [`doomed`], never started on a guess.
pub fn waiting_for(
    job: &JobRecord,
    states: &HashMap<JobId, JobState>,
    now_ms: u64,
) -> Option<String> {
    if let Some(t) = job.not_before_ms.filter(|t| *t > now_ms) {
        return Some(format!("not before {}", format_ms(t)));
    }
    let pending: Vec<String> = job
        .after
        .iter()
        .filter(|id| states.get(id) != Some(&JobState::Completed))
        .map(|id| id.to_string())
        .collect();
    (!pending.is_empty()).then(|| format!("after job {}", pending.join(", ")))
}

/// A time on the wire (ms since the epoch) as people read it in reasons and logs: RFC 3339, UTC.
pub fn format_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// True when `job` is queued and nothing holds it back.
pub fn may_start(job: &JobRecord, states: &HashMap<JobId, JobState>, now_ms: u64) -> bool {
    job.state == JobState::Queued && waiting_for(job, states, now_ms).is_none()
}

/// Every job's state by id, for [`may_start`] and [`doomed`].
pub fn states<'a>(jobs: impl IntoIterator<Item = &'a JobRecord>) -> HashMap<JobId, JobState> {
    jobs.into_iter().map(|j| (j.id, j.state)).collect()
}

/// Queued (or held) jobs that can never start because a prerequisite failed, was cancelled or was
/// deleted, each with the reason to cancel it with. A dependant of a dependant follows one round later
/// (once the first is cancelled), so a chain unwinds in order.
pub fn doomed(jobs: &[JobRecord]) -> Vec<(JobId, String)> {
    let by_id: HashMap<JobId, &JobRecord> = jobs.iter().map(|j| (j.id, j)).collect();
    jobs.iter()
        .filter(|j| matches!(j.state, JobState::Queued | JobState::Paused) && !j.after.is_empty())
        .filter_map(|j| {
            j.after.iter().find_map(|p| {
                let why = match by_id.get(p) {
                    None => format!("prerequisite job {p} was deleted"),
                    Some(pre) if matches!(pre.state, JobState::Failed | JobState::Cancelled) => {
                        match &pre.reason {
                            Some(r) => format!("prerequisite job {p} {}: {r}", pre.state),
                            None => format!("prerequisite job {p} {}", pre.state),
                        }
                    }
                    Some(_) => return None,
                };
                Some((j.id, why))
            })
        })
        .collect()
}

/// The next moment a queued job's `not_before` passes, if any is still ahead: the supervisor sleeps no
/// longer than that.
pub fn next_wake(jobs: &[JobRecord], now_ms: u64) -> Option<u64> {
    jobs.iter()
        .filter(|j| j.state == JobState::Queued)
        .filter_map(|j| j.not_before_ms)
        .filter(|t| *t > now_ms)
        .min()
}

/// A submit's prerequisites: at most [`MAX_AFTER`], no repeats, each an existing job the submitter may
/// see (their own; an admin's any) that has not failed or been cancelled (a dependant of one would
/// be cancelled at once).
pub fn check_after(
    after: &[JobId],
    jobs: &[JobRecord],
    uid: u32,
    admin: bool,
) -> Result<(), WireError> {
    let invalid = |m: String| WireError::new(ErrorCode::InvalidArgument, m);
    if after.len() > MAX_AFTER {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("after names {} jobs; the limit is {MAX_AFTER}", after.len()),
        ));
    }
    for (i, id) in after.iter().enumerate() {
        if after[..i].contains(id) {
            return Err(invalid(format!("after: job {id} is named twice")));
        }
        let job = jobs
            .iter()
            .find(|j| j.id == *id && (admin || j.owner_uid == uid))
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("after: no job {id}")))?;
        if matches!(job.state, JobState::Failed | JobState::Cancelled) {
            return Err(WireError::new(
                ErrorCode::InvalidState,
                format!(
                    "after: job {id} is {}; a job after it would never start (retry it first)",
                    job.state
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::job;

    fn after(id: u64, pre: &[u64]) -> JobRecord {
        let mut j = job(id, JobState::Queued, 0);
        j.after = pre.iter().map(|&p| JobId(p)).collect();
        j
    }

    #[test]
    fn a_job_waits_for_its_prerequisites_to_complete() {
        let mut pre = job(1, JobState::Running, 0);
        let dep = after(2, &[1]);
        let jobs = vec![pre.clone(), dep.clone()];
        assert_eq!(
            waiting_for(&dep, &states(&jobs), 0).as_deref(),
            Some("after job 1")
        );
        assert!(!may_start(&dep, &states(&jobs), 0));
        pre.state = JobState::Completed;
        let jobs = vec![pre, dep.clone()];
        assert!(may_start(&dep, &states(&jobs), 0));
        assert!(doomed(&jobs).is_empty());
    }

    #[test]
    fn a_failed_cancelled_or_deleted_prerequisite_dooms_its_dependants() {
        let mut failed = job(1, JobState::Failed, 0);
        failed.reason = Some("loss became NaN at step 3".into());
        let cancelled = job(2, JobState::Cancelled, 0);
        let jobs = vec![
            failed,
            cancelled,
            after(3, &[1]),
            after(4, &[2]),
            after(5, &[9]),
            {
                let mut held = after(6, &[1]);
                held.state = JobState::Paused;
                held
            },
            {
                let mut done = after(7, &[1]);
                done.state = JobState::Cancelled;
                done
            },
        ];
        let d = doomed(&jobs);
        assert_eq!(
            d,
            vec![
                (
                    JobId(3),
                    "prerequisite job 1 failed: loss became NaN at step 3".into()
                ),
                (JobId(4), "prerequisite job 2 cancelled".into()),
                (JobId(5), "prerequisite job 9 was deleted".into()),
                (
                    JobId(6),
                    "prerequisite job 1 failed: loss became NaN at step 3".into()
                ),
            ]
        );
    }

    #[test]
    fn not_before_holds_a_job_until_its_time_and_sets_the_wake_up() {
        let mut j = job(1, JobState::Queued, 0);
        j.not_before_ms = Some(10_000);
        let jobs = vec![j.clone()];
        assert!(!may_start(&j, &states(&jobs), 9_999));
        assert!(may_start(&j, &states(&jobs), 10_000));
        assert_eq!(next_wake(&jobs, 5_000), Some(10_000));
        assert_eq!(next_wake(&jobs, 10_000), None);
    }

    #[test]
    fn prerequisites_are_checked_at_submit() {
        let mut other = job(1, JobState::Running, 0);
        other.owner_uid = 7;
        let jobs = vec![
            other,
            job(2, JobState::Failed, 0),
            job(3, JobState::Queued, 0),
        ];
        assert!(check_after(&[JobId(3)], &jobs, 0, false).is_ok());
        let e = check_after(&[JobId(1)], &jobs, 0, false).unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::NotFound,
            "another user's job reads as absent"
        );
        assert!(
            check_after(&[JobId(1)], &jobs, 0, true).is_ok(),
            "admins see all"
        );
        let e = check_after(&[JobId(2)], &jobs, 0, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        assert!(e.message.contains("job 2 is failed"), "{}", e.message);
        let e = check_after(&[JobId(3), JobId(3)], &jobs, 0, false).unwrap_err();
        assert!(e.message.contains("named twice"));
        let many: Vec<JobId> = (0..65).map(JobId).collect();
        assert_eq!(
            check_after(&many, &jobs, 0, false).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }
}
