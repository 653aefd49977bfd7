use super::Peer;
use crate::core::Core;
use lorad_schema::{JobId, Response, WireError};

pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    since: Option<u64>,
) -> Result<Response, WireError> {
    super::job_for(core, peer, id).await?;
    let points = core
        .read(move |j| j.metrics(id, since))
        .await
        .map_err(super::journal_error)?;
    Ok(Response::Metrics { points })
}
