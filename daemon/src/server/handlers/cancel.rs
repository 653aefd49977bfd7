use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobState, Response, WireError};

/// Commits `cancelled` first, then stops the worker (if any) in the background: the reply never waits
/// for a process, and the worker is gone within the kill grace.
pub async fn handle(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if job.state.is_terminal() {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!("job {id} is already {}", job.state),
        ));
    }
    let who = format!("cancelled by uid {}", peer.uid);
    let job = core
        .transition(id, JobState::Cancelled, Some(who), |_| {})
        .await
        .map_err(super::journal_error)?;
    crate::supervisor::stop(core, id);
    core.kick.notify_one();
    Ok(Response::Job(job))
}
