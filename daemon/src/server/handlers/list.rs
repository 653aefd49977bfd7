//! List: the caller's jobs (an admin's `all`: everyone's) in id order, in pages that stay well under
//! the frame limit.
use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobRecord, JobState, Response, WireError};

/// Encoded bytes of job records in one page at most (a quarter of the default frame limit).
pub const PAGE_BYTES: usize = 4 << 20;

pub async fn handle(
    core: &Core,
    peer: Peer,
    state: Option<JobState>,
    all: bool,
    after: Option<JobId>,
) -> Result<Response, WireError> {
    if all && !peer.is_admin() {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            "only an admin may list every user's jobs",
        ));
    }
    let jobs = core
        .read(|j| j.jobs())
        .await
        .map_err(super::journal_error)?;
    let jobs = jobs
        .into_iter()
        .filter(|j| after.is_none_or(|a| j.id > a))
        .filter(|j| state.is_none_or(|s| j.state == s))
        .filter(|j| all || j.owner_uid == peer.uid);
    let budget = PAGE_BYTES.min(core.config.max_frame / 4);
    let (jobs, next) = page(jobs, budget, |j| {
        lorad_schema::frame::encode(j).map(|b| b.len()).unwrap_or(0)
    });
    Ok(Response::Jobs { jobs, next })
}

/// Takes records while their encoded sizes fit `budget` (always at least one); `next` is the id of
/// the last one taken when more remain.
pub fn page(
    jobs: impl Iterator<Item = JobRecord>,
    budget: usize,
    size: impl Fn(&JobRecord) -> usize,
) -> (Vec<JobRecord>, Option<JobId>) {
    let mut out: Vec<JobRecord> = Vec::new();
    let mut used = 0;
    for job in jobs {
        let n = size(&job);
        if !out.is_empty() && used + n > budget {
            let next = out.last().map(|j| j.id);
            return (out, next);
        }
        used += n;
        out.push(job);
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64) -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": "n", "state": "queued", "owner_uid": 1, "priority": 0,
            "template": "t", "base_model": "/m", "dataset": "/d", "output_dir": "/o",
            "settings": lorad_schema::TrainSettings::default(), "overrides": {},
            "progress": {"step": 0, "total_steps": 0, "epoch": 0.0}, "created_at_ms": 0
        }))
        .unwrap()
    }

    #[test]
    fn pages_fit_the_budget_and_say_where_to_go_on() {
        let all = (1..=10).map(job);
        let (p, next) = page(all.clone(), 35, |_| 10);
        assert_eq!(p.iter().map(|j| j.id.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(next, Some(JobId(3)));
        let (p, next) = page(all.clone(), 1000, |_| 10);
        assert_eq!((p.len(), next), (10, None));
        // A record larger than the budget still goes out, alone.
        let (p, next) = page(all, 5, |_| 10);
        assert_eq!((p.len(), next), (1, Some(JobId(1))));
    }
}
