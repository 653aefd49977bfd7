use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobState, Response, WireError};

pub async fn handle(
    core: &Core,
    peer: Peer,
    state: Option<JobState>,
    all: bool,
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
        .filter(|j| state.is_none_or(|s| j.state == s))
        .filter(|j| all || j.owner_uid == peer.uid)
        .collect();
    Ok(Response::Jobs { jobs })
}
