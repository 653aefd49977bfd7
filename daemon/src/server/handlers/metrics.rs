//! Metrics: a job's points in step order, in pages of at most [`PAGE_POINTS`].
use super::Peer;
use crate::core::Core;
use lorad_schema::{JobId, Response, WireError};

/// Points in one reply at most (a point encodes to ~250 bytes: ~2.5 MiB a page).
pub const PAGE_POINTS: usize = 10_000;

pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    since: Option<u64>,
) -> Result<Response, WireError> {
    super::job_for(core, peer, id).await?;
    let mut points = core
        .read(move |j| j.metrics(id, since))
        .await
        .map_err(super::journal_error)?;
    let next = (points.len() > PAGE_POINTS).then(|| {
        points.truncate(PAGE_POINTS);
        points.last().map(|p| p.step)
    });
    Ok(Response::Metrics {
        points,
        next: next.flatten(),
    })
}
