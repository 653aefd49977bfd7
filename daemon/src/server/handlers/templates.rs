use crate::core::Core;
use lorad_schema::{Response, WireError};

pub fn handle(core: &Core) -> Result<Response, WireError> {
    Ok(Response::Templates {
        templates: core.plugins().templates(),
    })
}
