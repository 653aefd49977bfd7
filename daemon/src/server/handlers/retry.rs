use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobState, Response, WireError};

/// Puts a failed or cancelled job back in the queue; its next attempt resumes from the newest checkpoint.
pub async fn handle(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} is {}; only failed or cancelled jobs can be retried",
                job.state
            ),
        ));
    }
    if !peer.is_admin() {
        let jobs = core
            .read(|j| j.jobs())
            .await
            .map_err(super::journal_error)?;
        crate::quota::may_queue(&jobs, peer.uid, &core.config.limits)?;
    }
    let who = format!("retried by uid {}", peer.uid);
    let job = core
        .transition(id, JobState::Queued, Some(who), |j| {
            j.resume_checkpoint = None;
            j.finished_at_ms = None;
        })
        .await
        .map_err(super::journal_error)?;
    core.kick.notify_one();
    Ok(Response::Job(job))
}
