use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, Response, WireError};

/// Removes a job that has ended: its directory under the state directory, then (unless `keep_record`)
/// its record, metrics and events. An `output_dir` the user chose stays: it is theirs.
///
/// It all happens under the journal's write lock, so the job cannot be retried between the check and
/// the removal. Files go first: a failure leaves the record, and deleting again finishes the work; the
/// other order could leave a directory that `lorad recover-journal` would bring back as a job.
pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    keep_record: bool,
) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if !job.state.is_terminal() {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} is {}; only completed, failed or cancelled jobs can be deleted (cancel it first)",
                job.state
            ),
        ));
    }
    let dir = core.config.job_dir(id);
    let (removed, events) = core
        .write(move |j| {
            // Checked again under the lock: a retry may have come in since.
            let now = j.job(id)?;
            if !now.state.is_terminal() {
                return Err(crate::journal::JournalError::Refused(WireError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "job {id} is {}; only jobs that have ended can be deleted",
                        now.state
                    ),
                )));
            }
            let mut removed = Vec::new();
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(dir.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(crate::journal::JournalError::Refused(WireError::new(
                        ErrorCode::Internal,
                        format!(
                            "cannot remove {}: {e}; the job's record is kept",
                            dir.display()
                        ),
                    )))
                }
            }
            let events = if keep_record {
                None
            } else {
                Some(j.delete_job(id)?)
            };
            Ok(((removed, events), Vec::new()))
        })
        .await
        .map_err(super::journal_error)?;
    tracing::info!(job = %id, uid = peer.uid, ?removed, record_removed = events.is_some(), events = ?events, "job deleted");
    Ok(Response::Deleted {
        job: id,
        removed,
        record_removed: events.is_some(),
    })
}
