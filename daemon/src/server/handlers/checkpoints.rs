use super::Peer;
use crate::core::Core;
use crate::worker::checkpoint::list_checkpoints;
use lorad_schema::{CheckpointInfo, ErrorCode, JobId, Response, WireError};

/// The job's complete `step-N` checkpoints (temp directories ignored), oldest first.
pub async fn handle(core: &Core, peer: Peer, id: JobId) -> Result<Response, WireError> {
    super::job_for(core, peer, id).await?;
    let job_dir = core.config.job_dir(id);
    let checkpoints = tokio::task::spawn_blocking(move || {
        list_checkpoints(&job_dir)
            .into_iter()
            .map(|(step, path)| CheckpointInfo {
                name: lorad_schema::layout::checkpoint_name(step),
                step,
                created_at_ms: modified_ms(&path),
                pinned: crate::worker::checkpoint::is_pinned(&path),
                path: path.display().to_string(),
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| WireError::new(ErrorCode::Internal, format!("listing checkpoints: {e}")))?;
    Ok(Response::Checkpoints { checkpoints })
}

/// The directory's modification time in ms since the epoch (0 if unknown).
fn modified_ms(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
