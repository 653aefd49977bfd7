//! Backup: a consistent copy of the journal into `<state_dir>/backups/`, admin only. The copy is made
//! from one read transaction on the blocking pool, so the daemon goes on answering and writing.
use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, Response, WireError};

pub async fn handle(core: &Core, peer: Peer) -> Result<Response, WireError> {
    if !peer.is_admin() {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            "only an admin may back up the journal",
        ));
    }
    let dir = core.config.layout().backups();
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let dest = dir.join(format!("journal-{when}.redb"));
    let path = dest.display().to_string();
    let copied = core
        .read(move |j| {
            std::fs::create_dir_all(&dir).map_err(|e| crate::journal::JournalError::Io {
                path: dir.clone(),
                detail: e.to_string(),
            })?;
            j.copy_to(&dest)
        })
        .await
        .map_err(super::journal_error)?;
    tracing::info!(uid = peer.uid, %path, "journal backed up");
    Ok(Response::Backup {
        path,
        records: copied
            .into_iter()
            .map(|(t, n)| (t.to_string(), n))
            .collect(),
    })
}
