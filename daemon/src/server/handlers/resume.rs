use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, JobId, JobState, Response, WireError};

/// Puts a paused job back in the queue, optionally naming the checkpoint (`step-N`) it continues from.
/// A bad or missing checkpoint is refused and nothing changes.
pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    checkpoint: Option<String>,
) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    if job.state != JobState::Paused {
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!("job {id} is {}; only paused jobs can be resumed", job.state),
        ));
    }
    if let Some(name) = &checkpoint {
        validate_checkpoint(core, id, name).await?;
    }
    let who = match &checkpoint {
        Some(name) => format!("resumed by uid {} from {name}", peer.uid),
        None => format!("resumed by uid {}", peer.uid),
    };
    let job = core
        .transition(id, JobState::Queued, Some(who), move |j| {
            j.resume_checkpoint = checkpoint;
        })
        .await
        .map_err(super::journal_error)?;
    core.kick.notify_one();
    Ok(Response::Job(job))
}

/// `name` must be `step-<digits>` and exist as a complete checkpoint of job `id`.
pub(super) async fn validate_checkpoint(
    core: &Core,
    id: JobId,
    name: &str,
) -> Result<(), WireError> {
    let dir = core
        .config
        .layout()
        .job(id)
        .checkpoint(name)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let state = dir.join(crate::worker::checkpoint::STATE_FILE);
    let exists = tokio::task::spawn_blocking(move || dir.is_dir() && state.is_file())
        .await
        .unwrap_or(false);
    if exists {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::NotFound,
            format!("job {id} has no checkpoint '{name}'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkpoint_names() {
        for ok in ["step-0", "step-12"] {
            assert!(lorad_schema::layout::valid_checkpoint_name(ok), "{ok}");
        }
        for bad in [
            "",
            "step-",
            "../x",
            "step-1/..",
            "step-1a",
            "Step-1",
            "step--1",
            "step-99999999999999999999999",
        ] {
            assert!(!lorad_schema::layout::valid_checkpoint_name(bad), "{bad}");
        }
    }
}
