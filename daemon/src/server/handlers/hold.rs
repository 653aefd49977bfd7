use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobState, Response, WireError};

/// `hold`: a queued job becomes paused ("held by uid N") and does not start; `release` lets it go.
/// Unlike `pause`, a job that has started is refused: hold never stops running work.
pub async fn hold(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if job.state != JobState::Queued {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} is {}; only queued jobs can be held (`loractl pause` stops a running one)",
                job.state
            ),
        ));
    }
    let who = format!("held by uid {}", peer.uid);
    let job = core
        .transition(id, JobState::Paused, Some(who), |_| {})
        .await
        .map_err(super::journal_error)?;
    core.kick.notify_one();
    Ok(Response::Job(job))
}

/// `release`: a held (paused) job goes back to the queue, where it keeps its place by priority and id.
pub async fn release(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if job.state != JobState::Paused {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} is {}; only held (paused) jobs can be released",
                job.state
            ),
        ));
    }
    let who = format!("released by uid {}", peer.uid);
    let job = core
        .transition(id, JobState::Queued, Some(who), |j| {
            j.resume_checkpoint = None;
        })
        .await
        .map_err(super::journal_error)?;
    core.kick.notify_one();
    Ok(Response::Job(job))
}
