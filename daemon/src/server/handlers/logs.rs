use super::Peer;
use crate::core::Core;
use crate::logs;
use lorad_schema::{ErrorCode, JobId, Response, WireError};

pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    offset: u64,
    max: Option<u64>,
) -> Result<Response, WireError> {
    super::job_for(core, peer, id).await?;
    let path = logs::log_path(&core.config.job_dir(id));
    let max = max.unwrap_or(logs::MAX_LOG_CHUNK);
    let read = tokio::task::spawn_blocking(move || logs::read_chunk(&path, offset, max)).await;
    match read {
        Ok(Ok((text, next_offset, size))) => Ok(Response::Logs {
            offset,
            text,
            next_offset,
            size,
        }),
        Ok(Err(e)) => Err(WireError::new(
            ErrorCode::Internal,
            format!("cannot read job {id}'s log: {e}"),
        )),
        Err(e) => Err(WireError::new(ErrorCode::Internal, e.to_string())),
    }
}
