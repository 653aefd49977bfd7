use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, Response, WireError};

/// Changes the priority of a job that has not ended; no state change.
pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    priority: i32,
) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if !peer.is_admin() {
        crate::quota::may_prioritise(priority, peer.uid, &core.config.limits)?;
    }
    if job.state.is_terminal() {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!("job {id} is already {}", job.state),
        ));
    }
    let job = core
        .write(move |j| {
            let job = j.update_job(id, |r| r.priority = priority)?;
            Ok((job, Vec::new()))
        })
        .await
        .map_err(super::journal_error)?;
    tracing::info!(job = %id, priority, "job priority");
    core.kick.notify_one();
    Ok(Response::Job(job))
}
