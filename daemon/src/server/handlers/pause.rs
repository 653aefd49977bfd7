use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobState, Response, WireError};

/// A queued job is held; an initializing or running one is committed `paused`, then its worker is
/// stopped (the supervisor lets it checkpoint first). The reply never waits for the process.
pub async fn handle(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if job.state.is_terminal() || job.state == JobState::Paused {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} is {}; only queued, initializing or running jobs can be paused",
                job.state
            ),
        ));
    }
    let was_active = job.state.is_active();
    let who = format!("paused by uid {}", peer.uid);
    let job = core
        .transition(id, JobState::Paused, Some(who), |_| {})
        .await
        .map_err(super::journal_error)?;
    if was_active {
        crate::supervisor::stop(core, id);
    }
    core.kick.notify_one();
    Ok(Response::Job(job))
}
