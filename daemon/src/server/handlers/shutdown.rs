use super::Peer;
use crate::core::Core;
use lorad_schema::{ErrorCode, Response, WireError};

pub fn handle(core: &Core, peer: Peer) -> Result<Response, WireError> {
    if !peer.is_admin() {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            "only an admin may stop the daemon",
        ));
    }
    tracing::info!(uid = peer.uid, "shutdown requested by a client");
    core.shutdown.cancel();
    Ok(Response::Done)
}
