use super::Peer;
use crate::core::Core;
use lorad_schema::{JobId, Response, WireError};

pub async fn handle(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    Ok(Response::Job(super::job_for(core, peer, id).await?))
}
